"""Importing the pack, as the host does at start-up, loads none of the heavy libraries: they load when a node
first runs. (How long the import takes is a benchmark figure, bench/host.py `import_seconds`, not a test.)"""
import json
import subprocess
import sys

from devtools.paths import REPO_ROOT, host_dir

HEAVY = ("transformers", "diffusers", "peft", "kornia", "accelerate", "einops", "safetensors")

PROBE = """
import importlib.util, json, sys
sys.path.insert(0, sys.argv[1])
import folder_paths, torch  # what the host has imported before it loads custom nodes
before = {m.split('.')[0] for m in sys.modules}
spec = importlib.util.spec_from_file_location('ComfyUI_MMIG', sys.argv[2] + '/__init__.py',
                                              submodule_search_locations=[sys.argv[2]])
pack = importlib.util.module_from_spec(spec)
sys.modules['ComfyUI_MMIG'] = pack
spec.loader.exec_module(pack)
print(json.dumps({'nodes': sorted(pack.NODE_CLASS_MAPPINGS),
                  'new': sorted({m.split('.')[0] for m in sys.modules} - before)}))
"""


def test_pack_import_loads_no_heavy_library():
    done = subprocess.run([sys.executable, "-c", PROBE, str(host_dir()), str(REPO_ROOT)], capture_output=True,
                          text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "MMIG_VLMLoader" in found["nodes"] and "MMIG_BLIP2Caption" in found["nodes"], found["nodes"]
    assert [m for m in found["new"] if m in HEAVY] == [], found["new"]
