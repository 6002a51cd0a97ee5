"""Converts an official DiffRIR checkpoint (.pth) to a .safetensors the loader reads without torch.load.

    python -m mmig_core.diffrir.convert DiffRIR.pth DiffRIR.safetensors [--official-keys]

- By default the result is the pack's own file: the weights under this pack's names, the config
  (inferred from the shapes) in its metadata; the checkpoint is checked against the network on the way.
- `--official-keys` keeps the official names instead (everything in params_ema/params, schedule buffers
  included), each tensor its own copy: the official DiffRIRS2 registers CPEN and the denoiser twice
  (`condition.*` / `diffusion.condition.*`, `denoise.*` / `diffusion.model.*`), so a real checkpoint
  holds tensors that share memory, which safetensors refuses to write.
- The .pth is read with torch.load(weights_only=True) only: the pack never unpickles code. The official
  checkpoints hold plain tensor dicts and load so; a file that holds other objects is refused, with how to
  re-save it as tensors where it was made.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


from ..model_files import ModelFilesError, save_safetensors_atomic
from .network import DiffRIR
from .weights import (infer_official_config, is_official_state_dict, load_into,
                      map_official_state_dict, read_pth, save_diffrir)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The state dict of an official .pth (params_ema, else params), read as tensors only."""
    path = Path(path)
    state = read_pth(path)
    if not is_official_state_dict(state):
        raise ModelFilesError(f"{path} is not an official DiffRIR checkpoint (no G.patch_embed / condition.E keys).")
    return state


def convert(source: str | os.PathLike, target: str | os.PathLike, *, official_keys: bool = False) -> Path:
    state = read_checkpoint(source)
    if official_keys:
        infer_official_config(state)  # refuses other scales/stages with the configs accepted
        copies = {k.removeprefix("module."): v.detach().clone() for k, v in state.items()}
        return save_safetensors_atomic(copies, target, {"mmig.source": "official DiffRIR checkpoint"})
    config = infer_official_config(state)
    model = load_into(DiffRIR(config), map_official_state_dict(state, config), str(source))
    return save_diffrir(model, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmig_core.diffrir.convert",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the official checkpoint, e.g. DiffRIR.pth")
    parser.add_argument("target", type=Path, help="the .safetensors to write (put it in ComfyUI/models/diffrir/)")
    parser.add_argument("--official-keys", action="store_true",
                        help="keep the official key names (each shared tensor copied) instead of the pack's file")
    args = parser.parse_args(argv)
    try:
        path = convert(args.source, args.target, official_keys=args.official_keys)
    except ModelFilesError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"DiffRIR weights written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
