"""The example workflows as a user opens them: stage groups, a note, node sizes, a `models` list.

Node sizes follow LiteGraph's `computeSize` (14 px text at 0.6 em per character, 20 px slot rows,
20 px widgets with 4 px gaps, a 30 px title bar drawn above `pos`), with room added for what the
frontend grows later (image previews, the pack's text results) and for the newer frontend's larger
text boxes. The frontend draws a node at max(saved size, computeSize), so saving at least that keeps
the layout free of overlaps in both the pinned and the newest frontend.
"""
from __future__ import annotations

import math
import textwrap

from devtools.workflow_specs import COLORS, FOLDER_MODELS, MODEL_DIRS, MODEL_URLS, NODE_BLURBS, SPECS
from devtools.workflows import TINY_PREFIX, _combo_options, _inputs, _is_widget, _widget_layout

TITLE_H, SLOT_H, WIDGET_H, WIDGET_GAP, CHAR_W = 30, 20, 20, 4, 14 * 0.6
MULTILINE_H = 100     # the pinned frontend's text box is at least 50 px; the newest one draws ~100
PREVIEW_H = 260       # Save/Preview Image show the image under their widgets after a run
TEXT_RESULT_H = 140   # the pack's web extension shows a caption/description under the node's widgets
GROUP_TITLE_H, GROUP_PAD, COL_GAP, ROW_GAP, STAGE_GAP = 44, 24, 50, 40, 70
NOTE_W = 460
FRONTEND_ONLY = ("Note", "MarkdownNote")  # node types the frontend draws and never sends to the host
NO_MODEL = ("none", "")


def _round_up(value: float, step: int = 10) -> int:
    return int(math.ceil(value / step) * step)


def _is_multiline(kind, options: dict) -> bool:
    return kind == "STRING" and bool(options.get("multiline"))


def node_size(node: dict, info: dict) -> list[int]:
    """[width, height] (the body, without the title bar) at least as large as the frontend draws it."""
    linked_widgets = {i["name"] for i in node.get("inputs", []) if "widget" in i}
    slots = [n for n, k, o in _inputs(info) if not _is_widget(k, o) or n in linked_widgets]
    outputs = info.get("output_name") or info["output"]
    text_w = lambda s: len(s) * CHAR_W
    width = max(text_w(node.get("title", "")) + 40, max(map(text_w, slots), default=0) +
                max(map(text_w, outputs), default=0) + 10 + 40, 300)
    height = max(len(slots), len(outputs), 1) * SLOT_H
    layout = _widget_layout(info)
    for name, kind, options, control in layout:
        height += (MULTILINE_H if _is_multiline(kind, options) else WIDGET_H) + WIDGET_GAP
        height += control * (WIDGET_H + WIDGET_GAP)
        if _is_multiline(kind, options):
            width = max(width, 400)
    height += 8 + 6 if layout else 6
    if info.get("output_node"):
        height += PREVIEW_H if "IMAGE" in [k for _, k, _ in _inputs(info)] and not info["output"] \
            else TEXT_RESULT_H
    return [_round_up(width), _round_up(height + 20)]


def model_widgets(node: dict, info: dict) -> list[tuple[str, str]]:
    """(input name, value) of every model-file widget of a UI node that names a model."""
    values = list(node.get("widgets_values", []))
    linked = {i["name"] for i in node.get("inputs", []) if "widget" in i}
    found = []
    for name, kind, options, control in _widget_layout(info):
        if not values:
            break
        value = values.pop(0)
        del values[:control]
        combo = _combo_options(kind, options)
        is_model = (node["type"], name) in MODEL_DIRS or (
            combo is not None and any(str(c).startswith(TINY_PREFIX) for c in combo))
        if is_model and name not in linked and isinstance(value, str) and value not in NO_MODEL:
            found.append((name, value))
    return found


def model_entry(node_type: str, input_name: str, value: str) -> dict:
    directory = MODEL_DIRS.get((node_type, input_name))
    if directory is None:
        raise KeyError(f"{node_type}.{input_name}: no model folder known: add it to MODEL_DIRS in "
                       f"devtools/workflow_specs.py")
    if value not in MODEL_URLS:
        raise KeyError(f"{value} ({node_type}.{input_name}): no download link: add it to MODEL_URLS in "
                       f"devtools/workflow_specs.py")
    return {"name": value, "url": MODEL_URLS[value], "directory": directory}


def _stages(name: str, api: dict, object_info: dict) -> list[tuple[str, str, list[int]]]:
    if name in SPECS:
        return SPECS[name]["stages"]
    loaders = [int(i) for i, n in api.items() if n["class_type"].endswith(("Loader", "LoaderSimple"))]
    rest = [int(i) for i in api if int(i) not in loaders]
    return [s for s in (("Models", "models", loaders), ("Graph", "generate", rest)) if s[2]]


def _note_text(name: str, ui: dict, models: list[dict], object_info: dict) -> str:
    spec = SPECS.get(name, {})
    lines = [spec.get("summary", name.replace("_", " ")), "", "Models: put each in ComfyUI/models/<folder>/"]
    for m in models:
        kind = "a folder" if m["name"] in FOLDER_MODELS else "a file"
        lines.append(f"- {m['name']} ({kind}) -> models/{m['directory']}/  from {m['url']}")
    lines += ["", "The pack's nodes here:"]
    for node_type in sorted({n["type"] for n in ui["nodes"] if n["type"] in NODE_BLURBS}):
        title = object_info[node_type].get("display_name") or node_type
        lines.append(f"- {title}: {NODE_BLURBS[node_type]}")
    lines += ["", f"Without weights, in a git clone of the pack: make run WORKFLOW=workflows/{name}.json "
              f"OUT=out/{name} TINY=1 runs it on tiny random models."]
    return "\n".join(lines)


def _note_size(text: str) -> list[int]:
    per_line = int((NOTE_W - 24) / 7.2)
    wrapped = sum(max(1, len(textwrap.wrap(line, per_line))) for line in text.split("\n"))
    return [NOTE_W, _round_up(40 + wrapped * 17)]


def lay_out(name: str, ui: dict, api: dict, object_info: dict) -> dict:
    """Adds sizes, positions, stage groups, a Note node and the `models` lists to api_to_ui's graph."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    for node in nodes.values():
        node["size"] = node_size(node, object_info[node["type"]])
    stages = _stages(name, api, object_info)
    placed = [i for _, _, ids in stages for i in ids]
    if sorted(placed) != sorted(nodes) or len(set(placed)) != len(placed):
        raise ValueError(f"{name}: the stages in devtools/workflow_specs.py must name every node once "
                         f"(nodes {sorted(nodes)}, stages name {sorted(placed)})")

    models, seen = [], set()
    for node in sorted(nodes.values(), key=lambda n: n["id"]):
        entries = [model_entry(node["type"], i, v) for i, v in model_widgets(node, object_info[node["type"]])]
        if entries:
            node["properties"]["models"] = entries
        for entry in entries:
            if entry["name"] not in seen:
                seen.add(entry["name"])
                models.append(entry)
    note_text = _note_text(name, ui, models, object_info)
    note_size = _note_size(note_text)

    parents = {n: [int(v[0]) for v in api[str(n)]["inputs"].values() if isinstance(v, list)] for n in nodes}
    columns_of_stage, stage_height = [], 0
    for _, _, ids in stages:
        local: dict[int, int] = {}

        def depth(n: int) -> int:
            if n not in local:
                local[n] = 1 + max((depth(p) for p in parents[n] if p in ids), default=-1)
            return local[n]

        columns = [[] for _ in range(1 + max(depth(n) for n in ids))]
        for n in ids:
            columns[depth(n)].append(n)
        columns_of_stage.append(columns)
        stage_height = max(stage_height, max(sum(TITLE_H + nodes[n]["size"][1] for n in col) +
                                             ROW_GAP * (len(col) - 1) for col in columns))

    top = 0
    group_h = GROUP_TITLE_H + stage_height + GROUP_PAD
    x = NOTE_W + STAGE_GAP
    groups = []
    for (title, kind, _), columns in zip(stages, columns_of_stage):
        gx, cx = x, x + GROUP_PAD
        for col in columns:
            y = top + GROUP_TITLE_H
            for n in col:
                nodes[n]["pos"] = [cx, y + TITLE_H]
                y += TITLE_H + nodes[n]["size"][1] + ROW_GAP
            cx += max(nodes[n]["size"][0] for n in col) + COL_GAP
        width = cx - COL_GAP + GROUP_PAD - gx
        groups.append({"id": len(groups) + 1, "title": title, "bounding": [gx, top, width, group_h],
                       "color": COLORS[kind], "font_size": 24, "flags": {}})
        x = gx + width + STAGE_GAP

    note_id = max(nodes) + 1
    ui["nodes"].append({"id": note_id, "type": "Note", "pos": [0, top + TITLE_H], "size": note_size,
                        "flags": {}, "order": len(ui["nodes"]), "mode": 0, "properties": {"text": ""},
                        "widgets_values": [note_text], "title": "Read me: models and nodes",
                        "color": "#432", "bgcolor": "#653"})
    ui["last_node_id"] = note_id
    ui["groups"] = groups
    ui["models"] = models
    ui["extra"] = {"ds": {"scale": round(min(1.0, 1800 / x), 2), "offset": [40, 80]}}
    return ui


# -- checks shared by the tests and the generator -------------------------------------------------

def node_rect(node: dict) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a node as drawn, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_H, x + w, y + h


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def layout_problems(ui: dict, object_info: dict | None = None) -> list[str]:
    """Overlapping nodes, nodes outside their group, groups overlapping, links drawn right to left,
    and (with object_info) nodes saved smaller than the size the frontend computes."""
    problems = []
    nodes = ui["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if _overlap(node_rect(a), node_rect(b)):
                problems.append(f"nodes {a['id']} ({a.get('title')}) and {b['id']} ({b.get('title')}) overlap")
    rects = [(g["title"], (g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
                           g["bounding"][1] + g["bounding"][3])) for g in ui.get("groups", [])]
    for i, (ta, a) in enumerate(rects):
        for tb, b in rects[i + 1:]:
            if _overlap(a, b):
                problems.append(f"groups {ta!r} and {tb!r} overlap")
    for node in nodes:
        if node["type"] in FRONTEND_ONLY:
            continue
        x0, y0, x1, y1 = node_rect(node)
        inside = [t for t, g in rects if g[0] <= x0 and g[1] + GROUP_TITLE_H <= y0 and x1 <= g[2] and y1 <= g[3]]
        if len(inside) != 1:
            problems.append(f"node {node['id']} ({node.get('title')}) is inside {len(inside)} groups, not one")
        if object_info is not None and node["type"] in object_info:
            need = node_size(node, object_info[node["type"]])
            if node["size"][0] < need[0] or node["size"][1] < need[1]:
                problems.append(f"node {node['id']} saved at {node['size']}, smaller than {need} (did the node "
                                f"gain inputs? run `python -m devtools.workflows regenerate`)")
    by_id = {n["id"]: n for n in nodes}
    for link in ui["links"]:
        src, dst = by_id[link[1]], by_id[link[3]]
        if node_rect(src)[2] > node_rect(dst)[0]:
            problems.append(f"link {link[0]} runs right to left: node {src['id']} -> node {dst['id']}")
    return problems


def models_problems(ui: dict, object_info: dict) -> list[str]:
    """Every model a UI workflow's widgets name is in its `models` list, with its folder and a link."""
    problems = []
    listed = {m["name"]: m for m in ui.get("models", [])}
    for node in ui["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            continue
        for input_name, value in model_widgets(node, info):
            entry = listed.get(value)
            where = f"node {node['id']} ({node['type']}.{input_name}) names {value}"
            if entry is None:
                problems.append(f"{where}, missing from the workflow's models list")
                continue
            if entry.get("directory") != MODEL_DIRS.get((node["type"], input_name)):
                problems.append(f"{where}: models list says folder {entry.get('directory')}")
            if not str(entry.get("url", "")).startswith("https://"):
                problems.append(f"{where}: no https download link")
            if entry not in node["properties"].get("models", []):
                problems.append(f"{where}: not in the node's properties.models")
    for m in ui.get("models", []):
        if set(m) != {"name", "url", "directory"}:
            problems.append(f"models entry {m}: needs exactly name, url, directory")
    return problems
