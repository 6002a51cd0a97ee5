"""`make demo`: run the flagship workflow headlessly and say where its image and caption went.

Real weights are used when the host's model folders hold every model the workflow names. Otherwise the graph runs
on the scene world's trained models (devtools/world/demo.py): a world scene and the instruction "Make the circle
blue." go in, and the scorer (devtools.world.score) says whether the image and the caption that come out match the
instruction. `python -m devtools.demo --tiny` runs the random tiny models instead (every node runs; the outputs
mean nothing).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from devtools.host import HostServer
from devtools.paths import REPO_ROOT
from devtools.run import missing_models, run_workflow
from devtools.tiny_models import ensure_tiny_models
from devtools.workflows import api_path

FLAGSHIP = "mmig_full"  # MMIG Eqs. 1-5: image + prompt in, edited image + its caption out
OUT_DIR = REPO_ROOT / "out" / "demo"


def _report(files: list[Path]) -> tuple[list[Path], list[Path]]:
    images = [f for f in files if f.suffix == ".png"]
    captions = [f for f in files if f.suffix == ".txt"]
    for f in images:
        print(f"image:   {f}")
    for f in captions:
        print(f"caption: {f}\n         \"{f.read_text().strip()}\"")
    return images, captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the random tiny models instead of the world models")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    api = json.loads(api_path(FLAGSHIP).read_text())
    from devtools.world import demo as world
    edit = None if args.tiny else world.demo_edit()
    world_dir = None if args.tiny else world.world_models_dir()
    # The tiny and world models sit beside the host's own folders, so the host lists all of them and we can tell.
    with HostServer([ensure_tiny_models()] + ([world_dir] if world_dir else []), with_tiny_support=True,
                    output_dir=OUT_DIR) as host:
        failure = host.pack_import_failure()
        if failure:
            print(f"error: the host failed to import the pack:\n{failure}", file=sys.stderr)
            return 1
        missing = missing_models(api, host.object_info())
        tiny = bool(missing) and args.tiny
        if not missing:
            edit = None
            print("demo: using the real weights in the host's model folders")
        elif tiny:
            print(f"demo: real weights not found ({'; '.join(missing)}); using the random tiny models (--tiny)")
        else:
            print(f"demo: real weights not found ({'; '.join(missing)}); using the scene world's trained models "
                  f"({world_dir}). See README.md, 'Models', for where real weights go.")
            api = world.world_graph(api, edit, world_dir)
            world.write_scene(edit, host.input_dir)
            print(f"demo: scene {world.SCENE_IMAGE} ({host.input_dir}), instruction {edit.instruction!r}")
        print(f"demo: running workflows/api/{FLAGSHIP}.api.json (example_workflows/{FLAGSHIP}.json in the "
              f"frontend) through ComfyUI at {host.host}")
        code, files = run_workflow(host, api, tiny=tiny, log=print)
        if code:
            print(host.log_tail(40), file=sys.stderr)
            return code
    images, captions = _report(files)
    if not images or not captions or not all(c.read_text().strip() for c in captions):
        print("error: the demo did not write both an image and a non-empty caption", file=sys.stderr)
        return 1
    if edit is not None:
        from PIL import Image
        import numpy as np
        image = np.asarray(Image.open(images[0]).convert("RGB"))
        for line in world.describe(world.verdict(image, captions[0].read_text().strip(), edit), edit):
            print(line)
        rates = world.DEMO_RATES
        print(f"demo: a chosen scene; on the first {rates['scenes']} evaluation scenes with a circle this graph made "
              f"the edit {rates['edit_made']} times and the edit with a right caption {rates['edit_and_caption']} "
              f"times (DEMO_MEASURED in devtools/world/demo.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
