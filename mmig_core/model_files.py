"""Checks on model files and folders that give a user an error they can act on."""
from __future__ import annotations

import json
import math
import numbers
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
    return _read_header(Path(path))[1].get("__metadata__", {}) or {}


def _read_header(path: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, checked against the file's size."""
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
    return header_len, header


def from_pretrained_strict(model_class, path: str | os.PathLike, dtype):
    """`model_class.from_pretrained` from a local folder: safetensors only, no remote code, no hub, and an
    error (not a warning and random values) when the weights lack tensors of the config's model."""
    from .hf_compat import dtype_kwarg
    model, info = model_class.from_pretrained(
        path, local_files_only=True, use_safetensors=True, trust_remote_code=False, output_loading_info=True,
        **{dtype_kwarg(): dtype})
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
    check_safetensors_values(path)
    state = load_file(str(path))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ModelFilesError(f"{path}: the weights do not match the config in its metadata (missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]})")
    module.load_state_dict(state)
    return module


def _finite_bits():
    """{dtype: (unsigned view, bits without the sign, the smallest non-finite pattern)}: a float is NaN or Inf
    exactly when its bits without the sign are at least the all-ones exponent (float8_e4m3fn has NaN only)."""
    import numpy as np
    import torch
    table = {torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
             torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
             torch.float32: (torch.int32, np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
             torch.float64: (torch.int64, np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000)}
    for name, smallest in (("float8_e4m3fn", 0x7F), ("float8_e5m2", 0x7C)):
        if hasattr(torch, name):
            table[getattr(torch, name)] = (torch.uint8, np.uint8, 0x7F, smallest)
    return table


_FINITE_BITS = None
_CHUNK = 1 << 20  # elements per pass: the temporary stays in the cache


def _all_finite(tensor) -> bool:
    """True when no element is NaN or +-Inf: one read of the tensor's bits (several GB/s, no temporary the size
    of the tensor), where torch.isfinite would be 10-40x slower on the CPU."""
    import numpy as np
    import torch
    global _FINITE_BITS
    if _FINITE_BITS is None:
        _FINITE_BITS = _finite_bits()
    bits = _FINITE_BITS.get(tensor.dtype)
    if bits is None or tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor.detach().float()).all())
    torch_view, numpy_view, magnitude, smallest = bits
    flat = tensor.detach().contiguous().view(torch_view).numpy().view(numpy_view).reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        if np.bitwise_and(flat[start:start + _CHUNK], numpy_view(magnitude)).max(initial=0) >= smallest:
            return False
    return True


def _dtype_error(source, name: str, dtype: str) -> ModelFilesError:
    return ModelFilesError(
        f"{source}: tensor {name!r} has dtype {dtype}, but model weights are floating point (float32, float16, "
        f"bfloat16): the file is not a weights file of this kind or was written wrongly; re-export it with "
        f"floating-point weights")


def _non_finite_error(source, name: str, nan: int, inf: int, numel: int) -> ModelFilesError:
    return ModelFilesError(
        f"{source}: tensor {name!r} holds {nan} NaN and {inf} Inf values (of {numel}); the weights are corrupt (a "
        f"diverged training run or a bad conversion) and would give NaN images: use another file or an earlier "
        f"checkpoint")


# safetensors dtype -> (unsigned view, bits without the sign, smallest non-finite pattern, has Inf), as _finite_bits
_SAFETENSORS_FLOATS = {"F16": ("uint16", 0x7FFF, 0x7C00, True), "BF16": ("uint16", 0x7FFF, 0x7F80, True),
                       "F32": ("uint32", 0x7FFF_FFFF, 0x7F80_0000, True),
                       "F64": ("uint64", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000, True),
                       "F8_E4M3": ("uint8", 0x7F, 0x7F, False), "F8_E5M2": ("uint8", 0x7F, 0x7C, True)}
_SAFETENSORS_NAMES = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16",
                      "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def check_safetensors_values(path: str | os.PathLike, *, integer_scalars: tuple[str, ...] = ()) -> dict:
    """The file-level check_tensors of a safetensors file (its header validated too): every tensor floating point
    and finite, else a ModelFilesError naming the file and the first bad tensor; returns the metadata. It reads
    the file's bytes once, in place (a memory map), one pass per run of same-dtype tensors."""
    import mmap

    import numpy as np
    path = Path(path)
    header_len, header = _read_header(path)
    metadata = header.get("__metadata__", {}) or {}
    entries = sorted(((name, entry) for name, entry in header.items() if name != "__metadata__"),
                     key=lambda item: item[1]["data_offsets"][0])
    for name, entry in entries:
        if entry["dtype"] not in _SAFETENSORS_FLOATS:
            if integer_scalars and name.endswith(integer_scalars) and math.prod(entry["shape"]) == 1 \
                    and entry["dtype"] != "BOOL":
                continue
            raise _dtype_error(path, name, _SAFETENSORS_NAMES.get(entry["dtype"], entry["dtype"]))
    data_end = max((entry["data_offsets"][1] for _, entry in entries), default=0)
    if data_end == 0:
        return metadata
    with open(path, "rb") as f:  # mapped with its page table filled at once: page faults cost more than the check
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0) if hasattr(mmap, "MAP_SHARED") else 0
        mapped = (mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ) if flags
                  else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    data = np.frombuffer(mapped, dtype=np.uint8, count=data_end, offset=8 + header_len)
    i = 0
    while i < len(entries):
        dtype, j = entries[i][1]["dtype"], i
        while (j + 1 < len(entries) and entries[j + 1][1]["dtype"] == dtype
               and entries[j + 1][1]["data_offsets"][0] == entries[j][1]["data_offsets"][1]):
            j += 1
        if dtype in _SAFETENSORS_FLOATS:
            _check_run(path, data, entries[i:j + 1], *_SAFETENSORS_FLOATS[dtype])
        i = j + 1
    return metadata


def _check_run(path, data, run, view: str, magnitude: int, smallest: int, has_inf: bool) -> None:
    """One pass over tensors stored back to back with one float dtype; on a bad value, name its tensor."""
    import numpy as np
    unsigned = np.dtype(view).type
    start, end = run[0][1]["data_offsets"][0], run[-1][1]["data_offsets"][1]
    values = data[start:end].view(unsigned)
    for first in range(0, values.size, _CHUNK):
        if np.bitwise_and(values[first:first + _CHUNK], unsigned(magnitude)).max(initial=0) < smallest:
            continue
        for name, entry in run:
            begin, stop = entry["data_offsets"]
            bits = np.bitwise_and(data[begin:stop].view(unsigned), unsigned(magnitude))
            bad = bits >= smallest
            if bad.any():
                inf = int((bits == smallest).sum()) if has_inf else 0
                raise _non_finite_error(path, name, int(bad.sum()) - inf, inf, bits.size)


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
            raise _dtype_error(source, name, str(tensor.dtype).removeprefix("torch."))
        if not _all_finite(tensor):
            values = tensor.detach().float()
            raise _non_finite_error(source, name, int(torch.isnan(values).sum()), int(torch.isinf(values).sum()),
                                    tensor.numel())
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
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{what} config: {label} must be a positive integer, got {value!r}")
    for name in finite_positive + finite:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
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
