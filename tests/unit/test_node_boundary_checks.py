"""nodes/_checks.py, in-process: the VALIDATE_INPUTS it gives a node class (as both hosts read and call it) and the
checks at the start of the node's FUNCTION. The same checks against the real server: tests/host/test_hostile_inputs.py."""
import importlib.util
import inspect
import math

import pytest
import torch

from devtools.paths import REPO_ROOT


def load_checks():
    spec = importlib.util.spec_from_file_location("mmig_node_checks_under_test", REPO_ROOT / "nodes" / "_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checks = load_checks()


def make_node(with_own_validation=True):
    class Node:
        FUNCTION = "run"
        calls = []

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": (["a", "b"],), "strength": ("FLOAT", {"min": -1.0, "max": 1.0}),
                                 "image": ("IMAGE",)},
                    "optional": {"mask": ("MASK",), "latent": ("LATENT",), "fraction": ("FLOAT", {"default": 1.0})}}

        def run(self, name, strength, image, mask=None, latent=None, fraction=1.0):
            return (name, strength, fraction)

    if with_own_validation:
        def own(cls, name, extra="x"):
            Node.calls.append((name, extra))
            return True if name == "a" else f"{name!r} is not a known name"
        Node.VALIDATE_INPUTS = classmethod(own)
    checks.check_node_inputs({"Node": Node}, {"Node": "Test Node"})
    return Node


def host_call(node_class, inputs):
    """As both hosts do: only the arguments getfullargspec names are passed, by keyword."""
    names = inspect.getfullargspec(node_class.VALIDATE_INPUTS).args
    return node_class.VALIDATE_INPUTS(**{k: v for k, v in inputs.items() if k in names})


def test_validate_inputs_names_the_float_inputs_and_keeps_the_nodes_own_arguments():
    spec = inspect.getfullargspec(make_node().VALIDATE_INPUTS)
    assert spec.args == ["cls", "name", "extra", "strength", "fraction"] and spec.varkw is None
    # A node without its own VALIDATE_INPUTS gets one naming only its FLOAT inputs: combos stay the host's to check.
    assert inspect.getfullargspec(make_node(False).VALIDATE_INPUTS).args == ["cls", "strength", "fraction"]


@pytest.mark.parametrize("value, words", [(math.nan, "strength is NaN"), (math.inf, "strength is inf (infinite)"),
                                          (-math.inf, "strength is -inf"), ("abc", "not a number"),
                                          (1.5, "above its maximum 1.0"), (-2, "below its minimum -1.0")])
def test_a_bad_float_widget_is_refused_naming_the_node_and_the_input(value, words):
    node = make_node()
    message = host_call(node, {"name": "a", "strength": value, "image": None})
    assert isinstance(message, str) and message.startswith("Test Node: ") and words in message
    assert node.calls == []  # refused before the node's own validation


def test_good_floats_leave_the_verdict_to_the_nodes_own_validation():
    node = make_node()
    assert host_call(node, {"name": "a", "strength": 0.5, "fraction": 1}) is True
    assert host_call(node, {"name": "c", "strength": 0.5}) == "'c' is not a known name"
    assert node.calls == [("a", "x"), ("c", "x")]  # its own arguments only, its defaults kept
    # A linked FLOAT is None (newest host) or absent (pinned host) while validating: checked when the node runs.
    assert host_call(node, {"name": "a", "strength": None}) is True and host_call(make_node(False), {}) is True


def test_the_function_refuses_non_finite_values_linked_or_not():
    node = make_node()()
    image = torch.rand(1, 8, 8, 3)
    assert node.run(name="a", strength=0.5, image=image) == ("a", 0.5, 1.0)
    assert node.run("a", 0.5, image, torch.ones(1, 8, 8)) == ("a", 0.5, 1.0)  # positional calls are checked too
    bad = image.clone()
    bad[0, 1, 2, 0] = math.nan
    cases = [({"strength": math.nan}, "Test Node: strength is NaN"),
             ({"fraction": math.inf}, "Test Node: fraction is inf .*look at the node connected to fraction"),
             ({"image": bad}, "Test Node: image (IMAGE) has 1 NaN value(s) out of 192; look at the node connected to image"),
             ({"mask": torch.full((1, 8, 8), -math.inf)}, "mask (MASK) has 64 Inf value(s)"),
             ({"latent": {"samples": torch.tensor([math.nan, math.inf])}}, "latent (LATENT) has 2 NaN and Inf value(s)")]
    for change, words in cases:
        with pytest.raises(checks.NodeInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
            node.run(**{"name": "a", "strength": 0.5, "image": image, **change})
    with pytest.raises(checks.NodeInputError, match="strength is NaN"):
        node.run("a", math.nan, image)
    # Large but finite values whose sum overflows are not mistaken for Inf; half precision is checked too.
    assert checks.tensor_problem("N", "latent", "LATENT", {"samples": torch.full((4,), 3e38)}) is None
    assert "1 NaN" in checks.tensor_problem("N", "image", "IMAGE", bad.half())


def test_input_lists_are_checked_item_by_item_and_installing_twice_wraps_once():
    class ListNode:
        FUNCTION = "run"
        INPUT_IS_LIST = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"strength": ("FLOAT",)}}

        def run(self, strength):
            return (strength,)

    checks.check_node_inputs({"L": ListNode}, {})
    wrapped = ListNode.run
    checks.check_node_inputs({"L": ListNode}, {})
    assert ListNode.run is wrapped
    assert ListNode().run(strength=[0.1, 0.2]) == ([0.1, 0.2],)
    with pytest.raises(checks.NodeInputError, match="L: strength is NaN"):
        ListNode().run(strength=[0.1, math.nan])


def test_every_pack_node_validates_each_of_its_float_inputs():
    from devtools import tiny_sdxl
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from devtools.paths import pack_module
    nodes = pack_module("nodes")
    seen = 0
    for node_id, node_class in nodes.NODE_CLASS_MAPPINGS.items():
        types = node_class.INPUT_TYPES()
        floats = [name for section in ("required", "optional") for name, spec in types.get(section, {}).items()
                  if spec[0] == "FLOAT"]
        if floats:
            seen += 1
            args = inspect.getfullargspec(node_class.VALIDATE_INPUTS).args
            assert set(floats) <= set(args), node_id
            given = {name: math.nan for name in floats}
            assert "is NaN" in str(host_call(node_class, given)), node_id
    assert seen >= 6  # MMSM Apply, LoRA Merge, MUMU Loader, A-STAR, Layered Embeddings, VLM Loader


def test_a_node_whose_input_types_fail_is_left_unchecked_and_the_rest_installed(caplog):
    class Broken:
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            raise OSError("models folder unreadable")

    good = make_node(False)
    del good._mmig_checked_inputs
    checks.check_node_inputs({"B": Broken, "G": good}, {"B": "Broken Node"})
    assert not hasattr(Broken, "VALIDATE_INPUTS") and "Broken Node" in caplog.text
    assert "G: strength is NaN" in host_call(good, {"strength": math.nan})
