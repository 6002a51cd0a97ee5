"""Tiny random-weight VLMs of every transformers image-text-to-text family the pack supports, one module each.

Each family module defines:
- `FAMILY`: the folder suffix (`vlm/mmig-tiny-<FAMILY>`), e.g. "qwen2_vl";
- `MODEL_TYPE`: the `model_type` in its config.json, e.g. "qwen2_vl";
- `build(folder, seed=0) -> Path`: writes config.json, *.safetensors and the processor (tokenizer, image
  processor, chat template) with `save_pretrained`, as the real checkpoint's folder holds them; only the widths are
  tiny. Special tokens, the chat template and the processor class are the real family's.
- `FACTS`: what the real checkpoint has that the tests check against (hub id, image token, native image size, ...).

    python -m devtools.tiny_vlm_families VLM_DIR [--only FAMILY ...]   # writes VLM_DIR/mmig-tiny-<FAMILY>
"""
from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Module names under devtools.tiny_vlm_families; a family is listed once its builder exists.
FAMILY_MODULES: list[str] = ["idefics3", "smolvlm", "llava", "llava_next", "llava_onevision", "qwen2_vl",
                             "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "mllama", "internvl", "mistral3"]


def folder_name(family: str) -> str:
    return f"mmig-tiny-{family.replace('_', '-')}"


def family_module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


# The builders are written for (and tested on, `make test-transformers`) the pack's floor
# (mmig_core.hf_compat.MIN_TRANSFORMERS), 4.57 and 5.x; older releases build no family. A family whose model_type
# is newer than the floor (FAMILY_MIN_TRANSFORMERS) is built from that release on.
BUILDERS_MIN_TRANSFORMERS = "4.47"


def too_old_for(module) -> str | None:
    """The transformers release a family needs when the installed one is older: the family's own
    FACTS["min_transformers"], the release that added its model_type (mmig_core.hf_compat), or the builders'."""
    from importlib.metadata import version

    from mmig_core.hf_compat import FAMILY_MIN_TRANSFORMERS

    def release(text):
        return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())

    have = release(version("transformers"))
    needed = [BUILDERS_MIN_TRANSFORMERS, module.FACTS.get("min_transformers"),
              FAMILY_MIN_TRANSFORMERS.get(module.MODEL_TYPE)]
    needed = max((n for n in needed if n), key=release)
    return needed if have < release(needed) else None


def build_all(vlm_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Every family's tiny folder; a family the installed transformers lacks is left out (said on stdout)."""
    written = []
    for name in FAMILY_MODULES:
        module = family_module(name)
        if only and module.FAMILY not in only:
            continue
        needed = too_old_for(module)
        if needed:
            print(f"tiny {module.FAMILY}: skipped, the family needs transformers >= {needed}")
            continue
        written.append(module.build(Path(vlm_dir) / folder_name(module.FAMILY)))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny VLM of each family into VLM_DIR/mmig-tiny-<family>.")
    parser.add_argument("vlm_dir", type=Path)
    parser.add_argument("--only", nargs="*", help="family names (default: all)")
    args = parser.parse_args(argv)
    for path in build_all(args.vlm_dir, args.only):
        print(f"tiny VLM written to {path}")


if __name__ == "__main__":
    main()
