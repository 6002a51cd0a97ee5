"""Run a workflow's API twin headlessly through a real ComfyUI host (`make run`).

    python -m devtools.run --workflow workflows/<name>.json --out <dir> [--tiny]

`workflows/<name>.json`, `example_workflows/<name>.json`, a bare `<name>` or any `*.api.json` file:
the pack's own names resolve to the API twin in `workflows/api/`.

Exit 0 when every output node wrote its outputs; otherwise the host's error is printed and the
exit code is 1 (2 when the graph does not fit the host's nodes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from devtools.host import HostServer
from devtools.workflows import TINY_PREFIX, api_path, combo_options, validate_api


NO_MODEL = ("none", "")  # an optional model picker left empty: nothing to swap


def _same_family(value: str, tiny: list) -> str:
    """The tiny model of the asked model's family (idefics2-8b -> mmig-tiny-idefics2, where a picker lists a tiny
    model of each VLM family), else the first tiny one."""
    def key(text: str) -> str:
        return "".join(c for c in text.lower() if c.isalnum())
    asked = key(value)
    matching = [o for o in tiny if key(str(o)[len(TINY_PREFIX):]) and key(str(o)[len(TINY_PREFIX):]) in asked]
    return max(matching, key=lambda o: len(str(o))) if matching else tiny[0]


def swap_to_tiny(api: dict, object_info: dict) -> list[str]:
    """Point every model picker at the tiny model the host lists for it; returns what was swapped."""
    swapped = []
    for node_id, node in api.items():
        info = object_info.get(node["class_type"], {}).get("input", {})
        specs = {**info.get("required", {}), **info.get("optional", {})}
        for name, value in node["inputs"].items():
            options = combo_options(specs.get(name))
            if options is None or isinstance(value, list):
                continue
            tiny = [o for o in options if str(o).startswith(TINY_PREFIX)]
            if tiny and value not in tiny and value not in NO_MODEL:
                node["inputs"][name] = pick = _same_family(str(value), tiny)
                swapped.append(f"node {node_id} {node['class_type']}.{name}: {value} -> {pick}")
    return swapped


def missing_models(api: dict, object_info: dict) -> list[str]:
    """The model names the workflow asks for that the host does not list."""
    missing = []
    for node in api.values():
        info = object_info.get(node["class_type"], {}).get("input", {})
        specs = {**info.get("required", {}), **info.get("optional", {})}
        for name, value in node["inputs"].items():
            options = combo_options(specs.get(name))
            if options is not None and any(str(o).startswith(TINY_PREFIX) for o in options) \
                    and value not in options and value not in NO_MODEL:
                missing.append(f"{value} ({node['class_type']}.{name})")
    return missing


def output_node_ids(api: dict, object_info: dict) -> list[str]:
    return [i for i, n in api.items() if object_info.get(n["class_type"], {}).get("output_node")]


TINY_MAX_SIDE = 128   # px: tiny models only smoke-test a graph, and a 1024 px latent takes minutes on a CPU
TINY_MAX_STEPS = 4


def shrink_for_tiny(api: dict) -> list[str]:
    """Cap every width/height and steps value, so a graph written for real SDXL runs in seconds."""
    shrunk = []
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            cap = TINY_MAX_SIDE if name in ("width", "height") else TINY_MAX_STEPS if name == "steps" else None
            if cap is not None and isinstance(value, int) and not isinstance(value, bool) and value > cap:
                node["inputs"][name] = cap
                shrunk.append(f"node {node_id} {node['class_type']}.{name}: {value} -> {cap}")
    return shrunk


def run_workflow(host: HostServer, api: dict, *, tiny: bool, log=print) -> tuple[int, list[Path]]:
    object_info = host.object_info()
    if tiny:
        for line in swap_to_tiny(api, object_info) + shrink_for_tiny(api):
            log(f"tiny: {line}")
    problems = validate_api(api, object_info)
    if problems:
        log("the workflow does not fit this host:\n  " + "\n  ".join(problems))
        return 2, []
    result = host.run_graph(api, timeout=3600)
    if not result.ok:
        log(f"error: {result.error}")
        return 1, []
    silent = [i for i in output_node_ids(api, object_info) if not result.outputs.get(i)]
    files = host.output_files(result)
    absent = [f for f in files if not f.exists()]
    if silent or absent:
        log(f"error: output nodes without outputs: {silent}; files reported but not written: {absent}")
        return 1, files
    return 0, files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", required=True, help="workflows/<name>.json, example_workflows/<name>.json, <name>, or an .api.json file")
    parser.add_argument("--out", required=True, help="output folder for the host's outputs")
    parser.add_argument("--tiny", action="store_true", help="swap every model for the tiny demo models")
    args = parser.parse_args(argv)

    path = api_path(args.workflow)
    if not path.exists():
        print(f"error: no API-format twin {path} for {args.workflow}", file=sys.stderr)
        return 2
    api = json.loads(path.read_text())
    models = []
    if args.tiny:
        from devtools.tiny_models import ensure_tiny_models
        models.append(ensure_tiny_models())
    with HostServer(models, with_tiny_support=args.tiny, output_dir=Path(args.out).resolve()) as host:
        failure = host.pack_import_failure()
        if failure:
            print(f"error: the host failed to import the pack:\n{failure}", file=sys.stderr)
            return 1
        code, files = run_workflow(host, api, tiny=args.tiny, log=lambda m: print(m, file=sys.stderr))
        if code:
            print(host.log_tail(40), file=sys.stderr)
        for f in files:
            print(f"wrote {f}")
        return code


if __name__ == "__main__":
    sys.exit(main())
