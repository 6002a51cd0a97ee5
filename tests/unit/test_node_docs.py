"""Every node has a help page in web/docs/ (the newer frontend's node library shows it), up to date with the node's
own description and tooltips, naming the paper equation it implements."""
import pytest

from devtools import node_docs


@pytest.fixture(scope="module")
def expected(load_tiny_sdxl_in_host):  # the fixture skips where no host is installed
    return node_docs.pages()


def test_every_node_has_its_page_and_no_page_is_stale(expected):
    assert len(expected) >= 15
    assert node_docs.stale(expected) == [], "run `python -m devtools.node_docs` to rewrite web/docs/"


def test_a_page_says_what_the_node_does_its_inputs_and_its_equation(expected, load_tiny_sdxl_in_host):
    from devtools.pack import import_pack_module
    mappings = import_pack_module("nodes").NODE_CLASS_MAPPINGS
    for node_id, text in expected.items():
        cls = mappings[node_id]
        assert cls.DESCRIPTION.strip() in text
        assert "## Paper equation\n\n" + node_docs.PAPER[node_id] in text
        inputs = cls.INPUT_TYPES()
        for name in [*inputs["required"], *inputs.get("optional", {})]:
            assert f"| `{name}` |" in text, f"{node_id}: input {name} missing from its page"
    assert "Eqs. 19-20" in expected["MMIG_AStarGuidance"] and "start_percent" in expected["MMIG_AStarGuidance"]


def test_a_node_without_an_equation_entry_is_named():
    class Fake:
        DESCRIPTION = "x"
    with pytest.raises(KeyError):
        node_docs.page("MMIG_NoSuchNode", Fake, "No Such Node")
