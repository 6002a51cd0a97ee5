"""The command line the tiny-model builders share: `python -m devtools.tiny_X OUT [--seed S]` (a folder or a file)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def run_builder(build: Callable[..., Path], what: str, description: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out", type=Path, help="where to write it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = build(args.out, seed=args.seed)
    files = [p for p in written.iterdir() if p.is_file()] if written.is_dir() else [written]
    print(f"{what} written to {written} ({sum(p.stat().st_size for p in files) / 1e6:.2f} MB)")
