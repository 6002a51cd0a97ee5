"""Checks on model files and folders that give a user an error they can act on."""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

# The most parameters a config read from a file's metadata may imply (80 GB in float32): a config asking for
# more is refused before anything is allocated, rather than failing inside torch or exhausting the machine.
MAX_PARAMETERS = 20_000_000_000


class ModelFilesError(RuntimeError):
    """A model is missing, incomplete or in a format the pack refuses to read."""


def require_hf_folder(folder: str | os.PathLike, *, kind: str, searched: list[str] | None = None,
                      source_hint: str = "") -> Path:
    """Return `folder` if it holds a Hugging Face model saved with safetensors weights.

    `kind` names the model for messages ("BLIP-2"), `searched` lists the folders a user can put it in,
    and `source_hint` says where such weights come from.
    """
    path = Path(folder)
    where = f" Searched: {', '.join(searched)}." if searched else ""
    hint = f" {source_hint}" if source_hint else ""
    if not path.is_dir():
        raise ModelFilesError(
            f"{kind} model folder not found: {path}.{where} Expected a folder holding config.json and "
            f"*.safetensors weights (as written by save_pretrained).{hint}")
    if not (path / "config.json").is_file():
        raise ModelFilesError(f"{kind} model folder {path} has no config.json.{hint}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        if pickled:
            raise ModelFilesError(
                f"{kind} model folder {path} has only pickled weights ({', '.join(pickled)}); the pack reads "
                f"safetensors only. Convert once, offline, with transformers: "
                f"Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True).{hint}")
        raise ModelFilesError(f"{kind} model folder {path} has no *.safetensors weights.{hint}")
    for weight in weights:
        check_safetensors_file(weight)
    return path


def check_safetensors_file(path: str | os.PathLike) -> dict:
    """Validate a safetensors header without reading tensors; returns the header's metadata."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(header_len))
        data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + data_end > size:
            raise ValueError(f"file is truncated ({size} bytes, header promises {8 + header_len + data_end})")
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ModelFilesError(
            f"{path} is not a valid safetensors file ({e}). The file may be corrupt or incompletely "
            f"downloaded, or be a pickle renamed to .safetensors; download it again.") from None
    return header.get("__metadata__", {}) or {}


def from_pretrained_strict(model_class, path: str | os.PathLike, dtype):
    """`model_class.from_pretrained` from a local folder: safetensors only, no remote code, no hub, and an
    error (not a warning and random values) when the weights lack tensors of the config's model."""
    import transformers
    # transformers 5 names the argument `dtype`, 4.x `torch_dtype`.
    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model, info = model_class.from_pretrained(
        path, local_files_only=True, use_safetensors=True, trust_remote_code=False, output_loading_info=True,
        **{dtype_kwarg: dtype})
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(f"the safetensors weights lack {len(missing)} tensors of config.json's model "
                         f"(e.g. {', '.join(missing[:3])}); the files may be from another model or incomplete")
    check_tensors(dict(model.named_parameters()), f"the weights in {path}")
    return model


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write tensors (made contiguous, on the CPU) to `path` through a temp file in the same folder and
    os.replace, so a crash never leaves half a file under the name a loader reads."""
    import tempfile

    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, temp, metadata=metadata)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def read_config_metadata(path: str | os.PathLike, *, file_format: str, what: str, where: str,
                         article: str = "a") -> dict:
    """The JSON config a pack-written safetensors file keeps in its metadata, after checking that the file
    exists, is valid and has `file_format`. `what` names the kind of file ("is not {article} {what}"), `where`
    says where such files belong."""
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"{what} file {path} not found: {where}")
    metadata = check_safetensors_file(path)
    if metadata.get("format") != file_format:
        raise ModelFilesError(f"{path} is not {article} {what}: its safetensors metadata has format "
                              f"{metadata.get('format')!r}, expected {file_format!r} (files written by the pack)")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, ValueError) as e:
        raise ModelFilesError(f"{path}: the {what} config in the metadata is unreadable ({e})") from None
    if not isinstance(config, dict):
        raise ModelFilesError(f"{path}: the {what} config in the metadata is not a JSON object")
    return config


def load_weights_exactly(module, path: str | os.PathLike):
    """Load a safetensors file into `module`: every tensor present, none extra, every shape right, or an
    error naming them (the file does not belong to the config it was built from)."""
    from safetensors.torch import load_file
    state = check_tensors(load_file(str(path)), path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ModelFilesError(f"{path}: the weights do not match the config in its metadata (missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]})")
    module.load_state_dict(state)
    return module


def _all_finite(tensor) -> bool:
    """True when no element is NaN or +-Inf. A sum is one read of the tensor with no temporary the size of it;
    a non-finite sum (a bad value, or an overflow of large finite ones) is settled by the exact element check."""
    import torch
    if tensor.numel() == 0:
        return True
    if tensor.element_size() == 1:  # float8: no sum kernel; the upcast keeps NaN/Inf
        tensor = tensor.to(torch.float16)
    total = tensor.sum(dtype=torch.float32) if tensor.element_size() == 2 else tensor.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def check_tensors(state: dict, source, *, integer_scalars: tuple[str, ...] = ()) -> dict:
    """Return `state` after checking that every tensor is floating point and finite; else a ModelFilesError
    naming `source` (the file) and the first bad tensor. Keys ending in one of `integer_scalars` may be
    one-element integer tensors (a LoRA's `alpha`, which some tools store as an int)."""
    import torch
    for name, tensor in state.items():
        if not torch.is_tensor(tensor):
            raise ModelFilesError(f"{source}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            if integer_scalars and name.endswith(integer_scalars) and tensor.numel() == 1 \
                    and not tensor.is_complex() and tensor.dtype != torch.bool:
                continue
            raise ModelFilesError(
                f"{source}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, but model weights "
                f"are floating point (float32, float16, bfloat16): the file is not a weights file of this kind or "
                f"was written wrongly; re-export it with floating-point weights")
        if not _all_finite(tensor):
            values = tensor.to(torch.float16) if tensor.element_size() == 1 else tensor
            nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
            raise ModelFilesError(
                f"{source}: tensor {name!r} holds {nan} NaN and {inf} Inf values (of {tensor.numel()}); the weights "
                f"are corrupt (a diverged training run or a bad conversion) and would give NaN images: use another "
                f"file or an earlier checkpoint")
    return state


def check_config_numbers(what: str, config, *, positive: tuple = (), divisible: tuple = (),
                         finite_positive: tuple = (), finite: tuple = ()) -> None:
    """ValueError naming the field and value of `config` (a dataclass) that is not usable: `positive` fields
    are integers >= 1 (a tuple field: each item), `divisible` holds (width field, heads field) pairs,
    `finite_positive` / `finite` are real numbers (> 0 / any)."""
    def items(name):
        value = getattr(config, name)
        return [(f"{name}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, (tuple, list)) else [(name, value)]

    for name in positive:
        for label, value in items(name):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} config: {label} must be a positive integer, got {value!r}")
    for name in finite_positive + finite:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (name in finite_positive and value <= 0):
            kind = "a finite number > 0" if name in finite_positive else "a finite number"
            raise ValueError(f"{what} config: {name} must be {kind}, got {value!r}")
    for width, heads in divisible:
        if getattr(config, width) % getattr(config, heads):
            raise ValueError(f"{what} config: {width} {getattr(config, width)} is not divisible by {heads} "
                             f"{getattr(config, heads)}")


def check_parameter_count(what: str, count: int, config) -> None:
    """ValueError when a config implies more than MAX_PARAMETERS parameters (computed, not allocated)."""
    if count > MAX_PARAMETERS:
        from dataclasses import asdict
        raise ValueError(f"{what} config implies {count / 1e9:.1f} B parameters ({4 * count / 1e9:.0f} GB in "
                         f"float32), above the pack's limit of {MAX_PARAMETERS / 1e9:.0f} B; its sizes: {asdict(config)}")
