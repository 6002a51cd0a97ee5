"""The two formats of a workflow, and checks of both against a running host's /object_info.

`workflows/api/<name>.api.json` is the API format (what /prompt takes; `make run` runs it);
`example_workflows/<name>.json` is the UI format the ComfyUI frontend loads, and the folder its
Template Browser lists for a custom node pack (with `<name>.jpg` as the thumbnail). The host also
lists any `*.json` directly in `workflows/`, so nothing but the `api/` folder lives there. The UI
workflow is generated from the API twin (`python -m devtools.workflows regenerate`: stage groups, a
note, sizes and the `models` list from devtools/workflow_layout.py) so the two never drift;
`python -m devtools.workflows thumbnails` runs each on the tiny models and writes its thumbnail.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from devtools.paths import REPO_ROOT

LEGACY_DIR = REPO_ROOT / "workflows"          # where both twins lived before; `regenerate` moves them
WORKFLOWS_DIR = LEGACY_DIR / "api"            # API twins, <name>.api.json
EXAMPLES_DIR = REPO_ROOT / "example_workflows"  # UI workflows and thumbnails, for the Template Browser
FRONTEND_ONLY = ("Note", "MarkdownNote")      # drawn by the frontend, never sent to the host
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
TINY_PREFIX = "mmig-tiny"


def api_path(workflow: str | Path) -> Path:
    """The API twin of a workflow named by any of its paths or by its bare name.

    `workflows/x.json` (where both twins lived before), `example_workflows/x.json`, `x.api.json`
    anywhere, or `x` -> `workflows/api/x.api.json`; an existing `.api.json` file outside the pack
    is its own twin.
    """
    path = Path(workflow)
    if path.name.endswith(".api.json") and path.is_file():
        return path.resolve()
    name = path.name.removesuffix(".json").removesuffix(".api")
    return WORKFLOWS_DIR / f"{name}.api.json"


def workflow_names() -> list[str]:
    return sorted(p.name.removesuffix(".api.json") for p in WORKFLOWS_DIR.glob("*.api.json"))


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES_DIR.glob("*.json"))


def _inputs(info: dict) -> list[tuple[str, object, dict]]:
    """(name, type, options) of a node's inputs, required first, in declaration order."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, spec[0], options))
    return out


def _is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind == "COMBO" or kind in WIDGET_TYPES) and not options.get("forceInput")


def _combo_options(kind, options: dict) -> list | None:
    # Hosts describe a combo either as a bare list of values (V1 nodes) or, since the V3 node
    # schema, as ("COMBO", {"options": [...]}); one host's /object_info can hold both.
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return options.get("options", [])
    return None


def combo_options(spec) -> list | None:
    """The values of a combo input from its /object_info spec (either form), else None."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    return _combo_options(spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})


def _control_widgets(name: str, kind, options: dict) -> int:
    """How many widgets the frontend adds after this one to control its value after each run.

    Each saves its value in widgets_values right after the input's own. An INT gets a "control after
    generate" combo when its spec asks for one, and a seed/noise_seed INT unless its spec says
    control_after_generate: false (the newest frontend honours that; older hosts never send it). A
    combo that asks gets the control combo and a filter-list text widget; a FLOAT (newer hosts only)
    gets the control combo.
    """
    control = options.get("control_after_generate")
    if kind == "INT":
        return int(bool(name in ("seed", "noise_seed") if control is None else control))
    if _combo_options(kind, options) is not None:
        return 2 if control else 0
    if kind == "FLOAT":
        return 1 if control else 0
    return 0


def _control_defaults(count: int) -> list:
    return ["fixed", ""][:count]  # the control combo, then a combo's (empty) filter list


def _widget_layout(info: dict) -> list[tuple[str, object, dict, int]]:
    return [(n, k, o, _control_widgets(n, k, o)) for n, k, o in _inputs(info) if _is_widget(k, o)]


def _widgets_covered(layout: list, value_count: int) -> int:
    """How many widgets of `layout` a list of `value_count` saved values fills completely."""
    used = 0
    for index, (*_, control) in enumerate(layout):
        used += 1 + control
        if used > value_count:
            return index
    return len(layout)


def api_to_ui(api: dict, object_info: dict) -> dict:
    """The UI-format graph of an API-format graph, laid out left to right by dependency depth."""
    depth: dict[str, int] = {}

    def node_depth(node_id: str) -> int:
        if node_id not in depth:
            parents = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((node_depth(p) for p in parents), default=-1)
        return depth[node_id]

    nodes, links, rows = [], [], {}
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for node_id in sorted(api, key=int):
        node = api[node_id]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, kind, options, control in _widget_layout(info):
            if name in node["inputs"] and not isinstance(node["inputs"][name], list):
                widgets.append(node["inputs"][name])
                widgets += _control_defaults(control)
            elif name in node["inputs"]:
                # A widget converted to an input: the frontend keeps a value for it and adds an input slot.
                widgets.append(options.get("default", ""))
                widgets += _control_defaults(control)
        # Widgets converted to inputs come after the node's own input slots, as the frontend adds them.
        for name, kind, options in sorted(_inputs(info), key=lambda i: _is_widget(i[1], i[2])):
            value = node["inputs"].get(name)
            linked_widget = _is_widget(kind, options) and isinstance(value, list)
            if (_is_widget(kind, options) and not linked_widget) or \
                    (value is None and name not in info["input"].get("required", {})):
                continue
            link_id = len(links) + 1
            if isinstance(value, list):
                source, slot = value
                out_type = object_info[api[source]["class_type"]]["output"][slot]
                links.append([link_id, int(source), slot, int(node_id), len(inputs), out_type])
                outputs_links.setdefault((source, slot), []).append(link_id)
            else:
                link_id = None
            inputs.append({"name": name, "type": kind, "link": link_id, **({"widget": {"name": name}}
                                                                         if linked_widget else {})})
        d = node_depth(node_id)
        row = rows.get(d, 0)
        rows[d] = row + 1
        nodes.append({"id": int(node_id), "type": node["class_type"], "pos": [40 + 380 * d, 60 + 320 * row],
                      "size": [340, 260], "flags": {}, "order": 0, "mode": 0, "inputs": inputs,
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
                      "title": node.get("_meta", {}).get("title", node["class_type"])})
    for node in nodes:
        info = object_info[node["type"]]
        node["outputs"] = [{"name": (info.get("output_name") or info["output"])[slot], "type": kind,
                            "links": outputs_links.get((str(node["id"]), slot), []), "slot_index": slot}
                           for slot, kind in enumerate(info["output"])]
    for order, node_id in enumerate(sorted(api, key=lambda n: (node_depth(n), int(n)))):
        next(n for n in nodes if n["id"] == int(node_id))["order"] = order
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _check_value(where: str, name: str, kind, options: dict, value) -> list[str]:
    combo = _combo_options(kind, options)
    if combo is not None:
        if any(str(c).startswith(TINY_PREFIX) for c in combo):
            # A model picker (the host lists a tiny model in it): any model name is valid, as shared
            # workflows name models the host may not have; `make run TINY=1` swaps them.
            return [] if isinstance(value, str) and value else [f"{where}: {name}: model name must be a string"]
        return [] if value in combo else [f"{where}: {name}: {value!r} is not one of {combo[:10]}"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {name}: {value!r} is not a boolean"]
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "INT" and not isinstance(value, int)):
            return [f"{where}: {name}: {value!r} is not {kind}"]
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        return [] if low <= value <= high else [f"{where}: {name}: {value} outside [{low}, {high}]"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {name}: {value!r} is not a string"]
    return []


def validate_api(api: dict, object_info: dict) -> list[str]:
    problems = []
    for node_id, node in api.items():
        where = f"node {node_id} ({node.get('class_type')})"
        info = object_info.get(node.get("class_type"))
        if info is None:
            problems.append(f"{where}: node type not in this host (missing custom node?)")
            continue
        required = info["input"].get("required", {})
        for name, kind, options in _inputs(info):
            value = node["inputs"].get(name)
            if value is None:
                if name in required:
                    problems.append(f"{where}: required input {name} missing")
            elif isinstance(value, list):
                source = api.get(str(value[0]))
                if source is None or source.get("class_type") not in object_info:
                    problems.append(f"{where}: {name} links to missing node {value[0]}")
                    continue
                out_types = object_info[source["class_type"]]["output"]
                if value[1] >= len(out_types):
                    problems.append(f"{where}: {name} links to missing output {value[1]} of node {value[0]}")
                elif kind != "*" and out_types[value[1]] != "*" and out_types[value[1]] != kind:
                    problems.append(f"{where}: {name} expects {kind}, linked to {out_types[value[1]]}")
            else:
                problems += _check_value(where, name, kind, options, value)
    return problems


def validate_ui(ui: dict, object_info: dict) -> list[str]:
    problems = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link in ui["links"]:
        link_id, src, src_slot, dst, dst_slot, kind = link[:6]
        if src not in nodes or dst not in nodes:
            problems.append(f"link {link_id}: connects a missing node")
            continue
        src_info, dst_info = object_info.get(nodes[src]["type"]), object_info.get(nodes[dst]["type"])
        if src_info is None or dst_info is None:
            continue  # reported below
        out_type = src_info["output"][src_slot] if src_slot < len(src_info["output"]) else None
        in_slot = nodes[dst]["inputs"][dst_slot] if dst_slot < len(nodes[dst]["inputs"]) else None
        in_type = dict((n, k) for n, k, _ in _inputs(dst_info)).get(in_slot["name"]) if in_slot else None
        if out_type is None or in_type is None:
            problems.append(f"link {link_id}: slot out of range")
        elif not (out_type == in_type == kind or "*" in (out_type, in_type)):
            problems.append(f"link {link_id}: {nodes[src]['type']} {out_type} -> {nodes[dst]['type']} {in_type} "
                            f"(link says {kind})")
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        where = f"node {node['id']} ({node['type']})"
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"{where}: node type not in this host (missing custom node?)")
            continue
        values = list(node.get("widgets_values", []))
        layout = _widget_layout(info)
        expected = len(layout) + sum(control for *_, control in layout)
        optional = set(info["input"].get("optional", {}))
        # A workflow saved before a node gained optional inputs (always added last) has fewer values;
        # the frontend gives the missing trailing widgets their defaults.
        saved_before_optional = len(values) < expected and all(
            name in optional for name, *_ in layout[_widgets_covered(layout, len(values)):])
        if len(values) != expected and not saved_before_optional:
            problems.append(f"{where}: {len(values)} widget values, the node has {expected} widgets")
            continue
        for name, kind, options, control in layout:
            if not values:
                break
            problems += _check_value(where, name, kind, options, values.pop(0))
            if control and values and values.pop(0) not in ("fixed", "increment", "decrement", "randomize",
                                                            "increment-wrap"):
                problems.append(f"{where}: {name}: bad control_after_generate value")
            if control > 1 and values and not isinstance(values.pop(0), str):
                problems.append(f"{where}: {name}: bad control_filter_list value")
    return problems


def ui_matches_api(ui: dict, api: dict, object_info: dict) -> list[str]:
    """Whether the UI twin is the API twin's graph (same nodes, widget values and links)."""
    expected = api_to_ui(api, object_info)
    strip = lambda g: ([(n["id"], n["type"], n["widgets_values"], [i["link"] for i in n["inputs"]]) for n in
                        sorted(g["nodes"], key=lambda n: n["id"]) if n["type"] not in FRONTEND_ONLY],
                       sorted(map(tuple, g["links"])))
    return [] if strip(ui) == strip(expected) else ["the UI twin differs from the API twin: regenerate it"]


def migrate_legacy() -> list[str]:
    """Moves `workflows/<name>.api.json` into `workflows/api/` and drops the old UI twin beside it.

    A workflow written in the old layout (both twins in `workflows/`) is converted by `regenerate`;
    its UI twin is rebuilt from the API twin, so nothing of the old one is kept.
    """
    moved = []
    WORKFLOWS_DIR.mkdir(parents=True, exist_ok=True)
    for api_file in sorted(LEGACY_DIR.glob("*.api.json")):
        name = api_file.name.removesuffix(".api.json")
        api_file.replace(WORKFLOWS_DIR / api_file.name)
        (LEGACY_DIR / f"{name}.json").unlink(missing_ok=True)
        moved.append(name)
    for path in sorted(LEGACY_DIR.glob("*.json")):
        # An API-format graph saved as plain <name>.json (no twin): it is the API twin.
        graph = json.loads(path.read_text())
        if "nodes" not in graph and all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
            path.replace(WORKFLOWS_DIR / f"{path.stem}.api.json")
            moved.append(path.stem)
    return sorted(moved)


def build_example(name: str, object_info: dict) -> dict:
    """The UI workflow of an API twin, laid out for the frontend (groups, note, models list)."""
    from devtools.workflow_layout import lay_out
    api = json.loads((WORKFLOWS_DIR / f"{name}.api.json").read_text())
    return lay_out(name, api_to_ui(api, object_info), api, object_info)


def regenerate(object_info: dict) -> list[Path]:
    written = []
    EXAMPLES_DIR.mkdir(exist_ok=True)
    for name in workflow_names():
        ui_path = EXAMPLES_DIR / f"{name}.json"
        ui_path.write_text(json.dumps(build_example(name, object_info), indent=1) + "\n")
        written.append(ui_path)
    return written


def _main_regenerate() -> int:
    for name in migrate_legacy():
        print(f"moved workflows/{name}.api.json to workflows/api/ (its old UI twin is rebuilt)")
    from devtools.host import HostServer
    from devtools.tiny_models import ensure_tiny_models
    with HostServer([ensure_tiny_models()], with_tiny_support=True) as host:
        for path in regenerate(host.object_info()):
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    for name in workflow_names():
        if not (EXAMPLES_DIR / f"{name}.jpg").is_file():
            print(f"note: example_workflows/{name}.jpg missing: run `python -m devtools.workflows thumbnails {name}`")
    stale = sorted(set(example_names()) - set(workflow_names()))
    for name in stale:
        print(f"warning: example_workflows/{name}.json has no API twin in workflows/api/", file=sys.stderr)
    return 1 if stale else 0


def main(argv: list[str]) -> int:
    """`python -m devtools.workflows regenerate`: move old-layout twins, rebuild every UI workflow.
    `python -m devtools.workflows thumbnails [--reuse] [name...]`: run each on the tiny models, write its .jpg."""
    if argv[:1] == ["regenerate"]:
        return _main_regenerate()
    if argv[:1] == ["thumbnails"]:
        from devtools.thumbnails import main as thumbnails_main
        return thumbnails_main(argv[1:])
    print(main.__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
