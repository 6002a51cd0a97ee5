"""Converts an official DiffRIR checkpoint (.pth) to a .safetensors the loader reads without torch.load.

    python -m mmig_core.diffrir.convert DiffRIR.pth DiffRIR.safetensors [--official-keys] [--trust-pickle]

- By default the result is the pack's own file: the weights under this pack's names, the config
  (inferred from the shapes) in its metadata; the checkpoint is checked against the network on the way.
- `--official-keys` keeps the official names instead (everything in params_ema/params, schedule buffers
  included), each tensor its own copy: the official DiffRIRS2 registers CPEN and the denoiser twice
  (`condition.*` / `diffusion.condition.*`, `denoise.*` / `diffusion.model.*`), so a real checkpoint
  holds tensors that share memory, which safetensors refuses to write.
- The .pth is read with torch.load(weights_only=True). Only if that refuses the file (it holds other
  objects than tensors) and you trust where it came from, `--trust-pickle` unpickles it in full, which
  runs whatever code the file holds: do it offline, once.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from ..model_files import ModelFilesError, save_safetensors_atomic
from .network import DiffRIR
from .weights import (_unwrap_checkpoint, infer_official_config, is_official_state_dict, load_into,
                      map_official_state_dict, save_diffrir)


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict:
    """The state dict of an official .pth (params_ema, else params), tensors only unless trust_pickle."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not trust_pickle:
            raise ModelFilesError(
                f"{path} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). If you trust "
                f"where it came from, run the conversion again with --trust-pickle (it runs code stored in the "
                f"file).") from None
        raw = torch.load(path, map_location="cpu", weights_only=False)
    state = _unwrap_checkpoint(raw, path)
    if not is_official_state_dict(state):
        raise ModelFilesError(f"{path} is not an official DiffRIR checkpoint (no G.patch_embed / condition.E keys).")
    return state


def convert(source: str | os.PathLike, target: str | os.PathLike, *, official_keys: bool = False,
            trust_pickle: bool = False) -> Path:
    state = read_checkpoint(source, trust_pickle=trust_pickle)
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
    parser.add_argument("--trust-pickle", action="store_true",
                        help="if weights_only loading fails, unpickle the file in full (runs code it holds)")
    args = parser.parse_args(argv)
    try:
        path = convert(args.source, args.target, official_keys=args.official_keys, trust_pickle=args.trust_pickle)
    except ModelFilesError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"DiffRIR weights written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
