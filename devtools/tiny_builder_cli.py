"""The command line every Hugging Face tiny-model builder shares: `python -m devtools.tiny_X OUT_DIR [--seed S]`."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def run_builder(build: Callable[..., Path], what: str, description: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = build(args.out_dir, seed=args.seed)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(f"{what} written to {folder} ({size / 1e6:.2f} MB)")
