"""A tiny random-weight DiffRIR saved like a trained one, for tests and demos.

    python -m devtools.tiny_diffrir OUT.safetensors

The interfaces are the real ones (6-channel input, pixel-unshuffle 4, 256-d prior, 4 diffusion steps);
only the widths inside are tiny. `mmig_core.diffrir.load_diffrir` reads it like any DiffRIR file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmig_core.diffrir import DiffRIR, save_diffrir, tiny_config


def build_tiny_diffrir(path: Path, seed: int = 0) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiffRIR(tiny_config()).eval()
        with torch.no_grad():  # a small residual, as a trained restorer predicts: outputs stay image-like
            model.restorer.tail[-1].weight.mul_(0.1)
            model.restorer.tail[-1].bias.zero_()
    return save_diffrir(model, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_diffrir(args.out, seed=args.seed)
    print(f"tiny DiffRIR written to {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
