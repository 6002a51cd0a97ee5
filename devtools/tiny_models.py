"""The tiny demo/test models, built once into a models folder laid out like ComfyUI/models/.

Tests, `make demo`, `make run TINY=1` and `make bench` all call `ensure_tiny_models()`. Each model is
random-weight, saved in its real on-disk format, and read back by the same loaders as real weights.
"""
from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from devtools.paths import REPO_ROOT, TINY_MODELS_DIR, offline_env

TINY_SDXL = "checkpoints/mmig-tiny-sdxl.safetensors"
# SD1.x; named to sort after the SDXL: `make run TINY=1` swaps a checkpoint picker to the first tiny one.
TINY_SD15 = "checkpoints/mmig-tiny-stable-diffusion-1.safetensors"
TINY_BLIP2 = "blip2/mmig-tiny-blip2"
TINY_IDEFICS2 = "vlm/mmig-tiny-idefics2"
TINY_MUMU_ADAPTER = "mmig/mmig-tiny-mumu-adapter.safetensors"
TINY_DIFFRIR = "diffrir/mmig-tiny-diffrir.safetensors"
TINY_LORA = "loras/mmig-tiny-lora.safetensors"
TINY_MUMU_BUNDLE = "mmig/mmig-tiny-mumu-bundle"
TINY_MMSM = "mmig/mmig-tiny-mmsm.safetensors"
TINY_VLM_FAMILIES = "vlm"  # one vlm/mmig-tiny-<family> folder per devtools.tiny_vlm_families.FAMILY_MODULES
TINY_GROUNDING_DINO = "grounding-dino/mmig-tiny-grounding-dino"  # training-only: the dataset bootstrapper
# Each tiny model: (builder module, run as `python -m MODULE OUT_PATH`; its path under the models folder).
# Names start with "mmig-tiny" so `make run TINY=1` can tell a tiny model in any model picker.
TINY_MODELS = [
    ("devtools.tiny_sdxl", TINY_SDXL),
    ("devtools.tiny_sd15", TINY_SD15),
    ("devtools.tiny_lora", TINY_LORA),  # after the SDXL: it reads the UNet's shapes
    ("devtools.tiny_diffrir", TINY_DIFFRIR),
    ("devtools.tiny_blip2", TINY_BLIP2),
    ("devtools.tiny_idefics2", TINY_IDEFICS2),
    ("devtools.tiny_vlm_families", TINY_VLM_FAMILIES),
    ("devtools.tiny_mumu_adapter", TINY_MUMU_ADAPTER),
    ("devtools.tiny_mmsm", TINY_MMSM),
    ("devtools.tiny_grounding_dino", TINY_GROUNDING_DINO),
    ("devtools.tiny_mumu_bundle", TINY_MUMU_BUNDLE),  # last: it reads the SDXL, Idefics2 and adapter
]
_BUILDERS = ["devtools/tiny_models.py", "devtools/tiny_host_support/__init__.py", "mmig_core/diffrir/network.py",
             "mmig_core/diffrir/weights.py", "mmig_core/diffrir/config.py", "mmig_core/mumu_adapter.py",
             "mmig_core/mmsm.py", "mmig_core/lora.py", "mmig_core/mumu_bundle.py",
             *(module.replace(".", "/") + ".py" for module, _ in TINY_MODELS),
             *sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "devtools" / "tiny_vlm_families").glob("*.py"))]


def _builders_hash() -> str:
    """Changes when a builder or a library that writes the files changes (formats move between versions)."""
    from importlib.metadata import version
    digest = hashlib.sha256(f"{version('transformers')} {version('safetensors')} {version('torch')}".encode())
    for name in _BUILDERS:
        path = REPO_ROOT / name
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()[:16]


def ensure_tiny_models(root: Path = TINY_MODELS_DIR) -> Path:
    """Build the tiny models under `root` unless the same builders already did; returns `root`."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test sessions build once, and never see half a folder
        stamp = root / "built-by"
        if stamp.exists() and stamp.read_text() == _builders_hash():
            return root
        staging = root.with_name(root.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        # Separate processes: the SDXL builder imports the host's `comfy`, which tests keep out of theirs.
        for module, target in TINY_MODELS:
            (staging / target).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", module, str(staging / target)], cwd=REPO_ROOT,
                           env=offline_env(), check=True)
        (staging / "built-by").write_text(_builders_hash())
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    return root


if __name__ == "__main__":
    print(ensure_tiny_models())
