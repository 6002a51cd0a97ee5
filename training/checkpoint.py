"""Checkpoints that survive a crash, a SIGTERM or a full disk.

    <out_dir>/checkpoints/step-00000100/trainable.safetensors   the trainable weights (full, unsharded)
                                       /optimizer.pt             AdamW state by parameter name (+ grad scaler)
                                       /state.json               step, elapsed, per-rank RNG states, data order
    <out_dir>/checkpoints/latest                                 the name of the newest complete checkpoint

A checkpoint is written into a hidden `.partial-*` folder, synced, then renamed into place; `latest` is
replaced (temp file + os.replace) only after that, so a reader never sees half a checkpoint, and a failed
write (ENOSPC) leaves the previous checkpoint and `latest` as they were. Older checkpoints beyond
`keep_checkpoints` are removed after the new one is complete.

Weights go through safetensors; the optimizer state through torch.save and back through
torch.load(weights_only=True) (tensors and plain containers only).
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS, OPTIMIZER, STATE, LATEST = "trainable.safetensors", "optimizer.pt", "state.json", "latest"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what is intact and what to do."""


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not (target / STATE).is_file():
        raise CheckpointError(f"{pointer} names {target.name}, which is missing or incomplete")
    return target


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out_dir: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
         state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune old ones. Runs on rank 0 only."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    partial = root / f".partial-{final.name}-{os.getpid()}"
    previous = _read_pointer(root)
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(partial / WEIGHTS))
        torch.save(optimizer_state, partial / OPTIMIZER)
        (partial / STATE).write_text(json.dumps(state, indent=1))
        for name in (WEIGHTS, OPTIMIZER, STATE):
            _fsync(partial / name)
        if final.exists():  # left by a run that died between the rename and the pointer update
            shutil.rmtree(final)
        os.replace(partial, final)
        _write_pointer(root, final.name)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        kept = f"the previous checkpoint ({root / previous}) is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write the checkpoint of step {step} under {root}: "
                              f"{e.strerror or e}; {kept}. Free space there and rerun with --resume.") from e
    _prune(root, keep, final.name)
    return final


def _read_pointer(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def _write_pointer(root: Path, name: str) -> None:
    temp = root / f".{LATEST}.{os.getpid()}.partial"
    with open(temp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, root / LATEST)
    _fsync(root)


def _prune(root: Path, keep: int, newest: str) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    for _, path in steps[:-max(keep, 1)]:
        if path.name != newest:
            shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(trainable weights, optimizer state, state.json) of one checkpoint folder, on the CPU."""
    try:
        weights = load_file(str(checkpoint / WEIGHTS))
        optimizer_state = torch.load(checkpoint / OPTIMIZER, map_location="cpu", weights_only=True)
        state = json.loads((checkpoint / STATE).read_text())
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read checkpoint {checkpoint}: {e}") from e
    return weights, optimizer_state, state


# ---- RNG states as JSON ----------------------------------------------------------------------------

def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _b64_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    state = {"torch": _tensor_b64(torch.get_rng_state()), "python": _python_state(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _tensor_b64(torch.cuda.get_rng_state())
    try:
        import numpy as np
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_b64_tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_b64_tensor(state["cuda"]))
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _python_state(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]
