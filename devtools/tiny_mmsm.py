"""A tiny untrained MMSM for the tiny SDXL and the tiny Idefics2, saved in the pack's MMSM format.

e_0 width = the tiny Idefics2's hidden size; e_1 = the tiny SDXL's mid-block output (model_channels 32 x
channel_mult[-1] 2 = 64 channels). The decoder is zero, so it leaves the UNet's output unchanged.

    python -m devtools.tiny_mmsm OUT_FILE
"""
from __future__ import annotations

import argparse
from pathlib import Path

from devtools.tiny_idefics2 import TEXT_HIDDEN

TINY_MID_BLOCK_CHANNELS = 32 * 2


def tiny_mmsm_config(**overrides):
    from mmig_core.mmsm import MMSMConfig
    settings = dict(text_dim=TEXT_HIDDEN, feature_channels=TINY_MID_BLOCK_CHANNELS, width=32, num_heads=2,
                    mlp_hidden=64)
    return MMSMConfig(**{**settings, **overrides})


def build_tiny_mmsm(path: Path, seed: int = 0, decoder_std: float = 0.0, **overrides) -> Path:
    from mmig_core.mmsm import MMSM, init_mmsm, save_mmsm
    return save_mmsm(init_mmsm(MMSM(tiny_mmsm_config(**overrides)), seed=seed, decoder_std=decoder_std), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_file", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_mmsm(args.out_file, seed=args.seed)
    print(f"tiny MMSM written to {path} ({path.stat().st_size / 1e3:.1f} kB)")


if __name__ == "__main__":
    main()
