"""The repository imported as a package, as the host's custom_nodes loader imports it, so in-process
tests and benches can reach node-side modules (nodes/*.py use relative imports). Needs the host's
`comfy` and `folder_paths` importable: call devtools.tiny_sdxl.import_host() first."""
from __future__ import annotations

import importlib
import importlib.util
import sys

from devtools.paths import REPO_ROOT

PACK = "mmig_pack_under_test"


def import_pack_module(name: str):
    """`import_pack_module("nodes._guidance")` -> that module of the pack imported as a package."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, REPO_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(REPO_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK}.{name}")
