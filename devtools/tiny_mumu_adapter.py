"""A tiny random-weight MUMU adapter for the tiny Idefics2, saved in the pack's real adapter format.

Input width = the tiny Idefics2's hidden size; outputs keep SDXL's real widths (2048-d context, 1280-d
pooled) and the 77-token padding, with 2 layers of width 32 inside.

    python -m devtools.tiny_mumu_adapter OUT_FILE
"""
from __future__ import annotations

import argparse
from pathlib import Path

from devtools.tiny_idefics2 import TEXT_HIDDEN


def build_tiny_mumu_adapter(path: Path, seed: int = 0) -> Path:
    from mmig_core.mumu_adapter import MUMUAdapter, MUMUAdapterConfig, init_adapter, save_adapter
    config = MUMUAdapterConfig(input_dim=TEXT_HIDDEN, width=32, num_layers=2, num_heads=2)
    # A larger std than a fresh adapter's, so that different prompts give visibly different conditioning.
    return save_adapter(init_adapter(MUMUAdapter(config), seed=seed, std=0.2), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_file", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_mumu_adapter(args.out_file, seed=args.seed)
    print(f"tiny MUMU adapter written to {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
