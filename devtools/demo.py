"""`make demo`: run the flagship workflow headlessly and say where its image and caption went.

Real weights are used when the host's model folders hold every model the workflow names; otherwise
the tiny demo models stand in (random weights: the image is noise and the caption gibberish, but
every node of the pipeline really runs).
"""
from __future__ import annotations

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


def main() -> int:
    api = json.loads(api_path(FLAGSHIP).read_text())
    # The tiny models sit beside the host's own folders, so the host lists both and we can tell.
    with HostServer([ensure_tiny_models()], with_tiny_support=True, output_dir=OUT_DIR) as host:
        failure = host.pack_import_failure()
        if failure:
            print(f"error: the host failed to import the pack:\n{failure}", file=sys.stderr)
            return 1
        missing = missing_models(api, host.object_info())
        tiny = bool(missing)
        if tiny:
            print(f"demo: real weights not found ({'; '.join(missing)}); using the tiny demo models. "
                  f"See README.md, 'Models', for where real weights go.")
        else:
            print("demo: using the real weights in the host's model folders")
        print(f"demo: running workflows/api/{FLAGSHIP}.api.json (example_workflows/{FLAGSHIP}.json in the "
              f"frontend) through ComfyUI at {host.host}")
        code, files = run_workflow(host, api, tiny=tiny, log=print)
        if code:
            print(host.log_tail(40), file=sys.stderr)
            return code
    images = [f for f in files if f.suffix == ".png"]
    captions = [f for f in files if f.suffix == ".txt"]
    for f in images:
        print(f"image:   {f}")
    for f in captions:
        print(f"caption: {f}\n         \"{f.read_text().strip()}\"")
    if not images or not captions or not all(c.read_text().strip() for c in captions):
        print("error: the demo did not write both an image and a non-empty caption", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
