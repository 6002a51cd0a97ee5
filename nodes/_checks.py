"""Checks at every pack node's boundary, installed once for all nodes at registration (`check_node_inputs`).

From a node's INPUT_TYPES, every FLOAT input must be a finite number and every IMAGE, MASK or LATENT free of NaN
and Inf. A NaN passes the host's own min/max checks (every comparison with NaN is false) and JSON carries it, so
without this it gives an all-NaN image or silently changes what a node does. The checks run twice:
- in VALIDATE_INPUTS, for FLOAT widgets: the host refuses the graph before anything runs;
- at the start of the node's FUNCTION, for everything, linked inputs included (a FLOAT from another node, and
  tensors, exist only once the graph runs).
"""
import functools
import inspect
import logging
import math

import torch

TENSOR_TYPES = ("IMAGE", "MASK", "LATENT")
_INSTALLED = "_mmig_checked_inputs"


class NodeInputError(ValueError):
    """A node received a value it cannot compute with; the message names the node and the input."""


def _declared_inputs(node_class) -> dict:
    """{input name: (type, options)} for the required and optional inputs of a node."""
    declared = {}
    types = node_class.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            kind = spec[0] if isinstance(spec, (tuple, list)) and spec else spec
            options = spec[1] if isinstance(spec, (tuple, list)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, str):
                declared[name] = (kind, options)
    return declared


def float_problem(node: str, name: str, value, options: dict | None = None) -> str | None:
    """Why a FLOAT input cannot be used (None if it can). Also checks min/max, which the newest host skips for
    an input that VALIDATE_INPUTS names."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"{node}: {name} is {value!r}, not a number; give a finite number"
    if math.isnan(number):
        return f"{node}: {name} is NaN; give a finite number"
    if math.isinf(number):
        return f"{node}: {name} is {number} (infinite); give a finite number"
    options = options or {}
    if options.get("min") is not None and number < options["min"]:
        return f"{node}: {name} is {number}, below its minimum {options['min']}"
    if options.get("max") is not None and number > options["max"]:
        return f"{node}: {name} is {number}, above its maximum {options['max']}"
    return None


def tensor_problem(node: str, name: str, kind: str, value) -> str | None:
    """Why an IMAGE / MASK / LATENT input cannot be used (None if it can): NaN or Inf values."""
    tensor = value.get("samples") if kind == "LATENT" and isinstance(value, dict) else value
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.numel() == 0:
        return None  # other shapes of bad input are the node's own checks
    # Any NaN or Inf makes the sum non-finite; one reduction is cheaper than a mask. Overflow alone goes on to
    # the exact count, which then finds nothing.
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32 if tensor.dtype != torch.float64 else None))):
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    bad = int((~finite).sum())
    nan = int(torch.isnan(tensor).sum())
    what = ("NaN" if nan == bad else "Inf" if nan == 0 else "NaN and Inf")
    return (f"{node}: {name} ({kind}) has {bad} {what} value(s) out of {tensor.numel()}; look at the node "
            f"connected to {name}, which produced them")


def _problems(node: str, declared: dict, values: dict, is_list: bool, running: bool = False):
    for name, value in values.items():
        if name not in declared or value is None:
            continue
        kind, options = declared[name]
        items = value if is_list and isinstance(value, (list, tuple)) else [value]
        for item in items:
            if item is None:
                continue
            if kind == "FLOAT":
                problem = float_problem(node, name, item, options)
                if problem and running:  # widgets were refused before the run: this one is most likely linked
                    problem += f" (if {name} is linked, look at the node connected to {name})"
            elif kind in TENSOR_TYPES:
                problem = tensor_problem(node, name, kind, item)
            else:
                continue
            if problem:
                yield problem


def _with_validation(node_class, node: str, floats: dict) -> None:
    """Give the class a VALIDATE_INPUTS naming its FLOAT inputs, calling the node's own one with its arguments.

    The host passes VALIDATE_INPUTS only the inputs its signature names (read with getfullargspec, which honours
    __signature__), and a linked input as None (newest host) or not at all (pinned host)."""
    own = getattr(node_class, "VALIDATE_INPUTS", None)  # bound to the class already
    params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    own_names, own_takes_all = set(), False
    if own is not None:
        spec = inspect.signature(own)
        for param in spec.parameters.values():
            if param.kind == inspect.Parameter.VAR_KEYWORD:
                own_takes_all = True
            elif param.name not in floats:
                own_names.add(param.name)
                params.append(param.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD))
            else:
                own_names.add(param.name)
    # Parameters with defaults must follow those without: the FLOAT ones all default to None.
    params = [p for p in params if p.default is inspect.Parameter.empty] + \
             [p for p in params if p.default is not inspect.Parameter.empty]
    params += [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None) for name in floats]
    if own_takes_all:
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))

    def validate(cls, **inputs):
        for problem in _problems(node, floats, inputs, is_list=False):
            return problem
        if own is None:
            return True
        passed = inputs if own_takes_all else {k: v for k, v in inputs.items() if k in own_names}
        return own(**passed)

    validate.__signature__ = inspect.Signature(params)
    validate.__name__ = validate.__qualname__ = "VALIDATE_INPUTS"
    node_class.VALIDATE_INPUTS = classmethod(validate)


def _with_checked_function(node_class, node: str, checked: dict) -> None:
    name = node_class.FUNCTION
    original = inspect.getattr_static(node_class, name)
    if isinstance(original, (staticmethod, classmethod)):
        return  # no pack node has one; its inputs are then the node's own checks
    signature = inspect.signature(original)
    is_list = bool(getattr(node_class, "INPUT_IS_LIST", False))

    @functools.wraps(original)
    def run(self, *args, **kwargs):
        values = kwargs
        if args:
            values = signature.bind_partial(self, *args, **kwargs).arguments
        for problem in _problems(node, checked, values, is_list, running=True):
            raise NodeInputError(problem)
        return original(self, *args, **kwargs)

    setattr(node_class, name, run)


def check_node_inputs(class_mappings: dict, display_names: dict) -> None:
    """Install the boundary checks on every node class of the mappings (once per class)."""
    for node_id, node_class in class_mappings.items():
        if node_class.__dict__.get(_INSTALLED):  # not inherited: a subclass gets its own
            continue
        node = display_names.get(node_id, node_id)
        try:
            declared = _declared_inputs(node_class)
        except Exception as exc:  # e.g. an unreadable model folder: the pack must still load
            logging.warning("MMIG: %s: inputs not checked, INPUT_TYPES failed: %s", node, exc)
            continue
        floats = {k: v for k, v in declared.items() if v[0] == "FLOAT"}
        checked = {k: v for k, v in declared.items() if v[0] == "FLOAT" or v[0] in TENSOR_TYPES}
        if floats:
            _with_validation(node_class, node, floats)
        if checked:
            _with_checked_function(node_class, node, checked)
        setattr(node_class, _INSTALLED, True)
