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


def from_pretrained_strict(model_class, path: str | os.PathLike, dtype, **extra):
    """`model_class.from_pretrained` from a local folder: safetensors only, no remote code, no hub, and an
    error (not a warning and random values) when the weights lack tensors of the config's model. `extra` goes to
    from_pretrained (a quantized load's quantization_config and device_map: its packed integer weights are not
    checked, the others are)."""
    from .hf_compat import dtype_kwarg
    model, info = model_class.from_pretrained(
        path, local_files_only=True, use_safetensors=True, trust_remote_code=False, output_loading_info=True,
        **{dtype_kwarg(): dtype}, **extra)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(f"the safetensors weights lack {len(missing)} tensors of config.json's model "
                         f"(e.g. {', '.join(missing[:3])}); the files may be from another model or incomplete")
    params = dict(model.named_parameters())
    if extra.get("quantization_config") is not None:
        params = {name: p for name, p in params.items() if p.is_floating_point()}
    check_tensors(params, f"the weights in {path}")
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
    state, _metadata = load_safetensors_checked(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ModelFilesError(f"{path}: the weights do not match the config in its metadata (missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]})")
    module.load_state_dict(state)
    return module


# torch float dtype -> its safetensors name, for the bit-pattern check (_SAFETENSORS_FLOATS)
_TORCH_FLOATS = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "float8_e4m3fn": "F8_E4M3",
                 "float8_e5m2": "F8_E5M2"}


def _all_finite(tensor) -> bool:
    """True when no element is NaN or +-Inf: two max reductions over the tensor's bits (_values_bad; no temporary),
    where torch.isfinite would be 10-40x slower on the CPU."""
    import torch
    name = _TORCH_FLOATS.get(str(tensor.dtype).removeprefix("torch."))
    if name is None or tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor.detach().float()).all())
    if tensor.numel() == 0:
        return True
    data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
    return not _values_bad(data, 0, data.size, *_SAFETENSORS_FLOATS[name][:3])


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


# safetensors dtype -> (unsigned view, bits without the sign, smallest non-finite pattern, has Inf): a float is NaN
# or Inf exactly when its bits without the sign are at least the all-ones exponent (float8_e4m3fn has NaN only)
_SAFETENSORS_FLOATS = {"F16": ("uint16", 0x7FFF, 0x7C00, True), "BF16": ("uint16", 0x7FFF, 0x7F80, True),
                       "F32": ("uint32", 0x7FFF_FFFF, 0x7F80_0000, True),
                       "F64": ("uint64", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000, True),
                       "F8_E4M3": ("uint8", 0x7F, 0x7F, False), "F8_E5M2": ("uint8", 0x7F, 0x7C, True)}
_SAFETENSORS_NAMES = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16",
                      "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def check_safetensors_values(path: str | os.PathLike, *, integer_scalars: tuple[str, ...] = ()) -> dict:
    """The file-level check_tensors of a safetensors file (its header validated too): every tensor floating point
    and finite, else a ModelFilesError naming the file and the first bad tensor; returns the metadata."""
    return load_safetensors_checked(path, integer_scalars=integer_scalars)[1]


# Bytes per read call, and per check job: a job is checked while its bytes are still in the L2/L3 cache.
_READ_BYTES = 1 << 20
_JOB_BYTES = 4 << 20
# Below this many bytes the check runs inline (a thread costs more than it hides).
_THREAD_MIN_BYTES = 16 << 20
_TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
                 "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                 "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}


def load_safetensors_checked(path: str | os.PathLike, *, integer_scalars: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, every tensor checked floating point (header only) and finite, else
    a ModelFilesError naming the file and the first bad tensor (with its NaN / Inf counts). Keys ending in one of
    `integer_scalars` may be one-element integer tensors.

    The value check rides on the read: the file is read once, sequentially, into one buffer (huge pages where the
    OS offers them: page faults cost more than the check), and each 4 MB of it is checked by its bits while still
    in the cache, on a second thread when the file is large, so that the check hides behind the next read. Unlike
    safetensors' own load_file, which maps the file and reads nothing until a tensor is used, this copies the whole
    file up front; bench/loading.py measures both."""
    import numpy as np
    import torch
    path = Path(path)
    header_len, header = _read_header(path)
    metadata = header.get("__metadata__", {}) or {}
    entries = sorted(((name, entry) for name, entry in header.items() if name != "__metadata__"),
                     key=lambda item: item[1]["data_offsets"][0])
    for name, entry in entries:
        if entry["dtype"] not in _SAFETENSORS_FLOATS:
            if integer_scalars and name.endswith(integer_scalars) and math.prod(entry["shape"]) == 1 \
                    and entry["dtype"] in _TORCH_DTYPES and entry["dtype"] != "BOOL":
                continue
            raise _dtype_error(path, name, _SAFETENSORS_NAMES.get(entry["dtype"], entry["dtype"]))
    for name, entry in entries:
        begin, stop = entry["data_offsets"]
        size = math.prod(entry["shape"]) * getattr(torch, _TORCH_DTYPES[entry["dtype"]]).itemsize
        if not 0 <= begin <= stop or stop - begin != size:
            raise ModelFilesError(f"{path} is not a valid safetensors file: tensor {name!r} of shape {entry['shape']} "
                                  f"({entry['dtype']}) needs {size} bytes but its offsets give {stop - begin}; the "
                                  f"file is corrupt, download it again.")
    data_end = max((entry["data_offsets"][1] for _, entry in entries), default=0)
    buffer = _allocate(data_end)
    data = np.frombuffer(buffer, dtype=np.uint8, count=data_end)
    jobs = _check_jobs(entries)
    checker = _Checker(data) if data_end >= _THREAD_MIN_BYTES and (os.cpu_count() or 1) > 1 else None
    bad_job = None
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(8 + header_len)
            view, position, next_job = memoryview(buffer), 0, 0
            while position < data_end:
                read = f.readinto(view[position:min(position + _READ_BYTES, data_end)])
                if not read:
                    raise ModelFilesError(f"{path} ended early while being read (changed on the disk?); try again.")
                position += read
                while next_job < len(jobs) and jobs[next_job][1] <= position:
                    if checker is not None:
                        checker.submit(next_job, jobs[next_job])
                    elif bad_job is None and _values_bad(data, *jobs[next_job]):
                        bad_job = next_job
                    next_job += 1
    finally:
        if checker is not None:
            bad_job = checker.finish()
    if bad_job is not None:
        _raise_first_bad(path, data, entries, jobs[bad_job])
    base = torch.frombuffer(buffer, dtype=torch.uint8, count=data_end) if data_end else None
    tensors = {}
    for name, entry in entries:
        dtype = getattr(torch, _TORCH_DTYPES[entry["dtype"]])
        begin, stop = entry["data_offsets"]
        if base is None or begin == stop:
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        raw = base[begin:stop]
        if begin % dtype.itemsize:  # a tensor off its alignment (writers other than safetensors'): copied
            raw = torch.empty(entry["shape"], dtype=dtype).view(-1).view(torch.uint8).copy_(raw)
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors, metadata


def _allocate(size: int):
    """A writable zeroed buffer of `size` bytes: anonymous memory with huge pages where available."""
    import mmap
    if hasattr(mmap, "MAP_ANONYMOUS"):
        buffer = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            buffer.madvise(mmap.MADV_HUGEPAGE)
        return buffer
    return bytearray(max(size, 1))


def _check_jobs(entries) -> list:
    """(begin, end, bits view, magnitude, smallest) pieces of at most _JOB_BYTES over the file's runs of
    same-dtype float tensors stored back to back."""
    jobs, i = [], 0
    while i < len(entries):
        dtype, j = entries[i][1]["dtype"], i
        while (j + 1 < len(entries) and entries[j + 1][1]["dtype"] == dtype
               and entries[j + 1][1]["data_offsets"][0] == entries[j][1]["data_offsets"][1]):
            j += 1
        if dtype in _SAFETENSORS_FLOATS:
            view, magnitude, smallest, _ = _SAFETENSORS_FLOATS[dtype]
            begin, end = entries[i][1]["data_offsets"][0], entries[j][1]["data_offsets"][1]
            for start in range(begin, end, _JOB_BYTES):  # _JOB_BYTES is a multiple of every item size
                jobs.append((start, min(end, start + _JOB_BYTES), view, magnitude, smallest))
        i = j + 1
    return jobs


def _values_bad(data, begin: int, end: int, view: str, magnitude: int, smallest: int) -> bool:
    """True when data[begin:end] (as `view` integers) holds a NaN/Inf bit pattern, its bits without the sign at
    least `smallest`: read as signed integers, a positive one is >= smallest; as unsigned, a negative one is >=
    smallest with the sign bit. Two plain max reductions: no temporary, SIMD in numpy, and numpy releases the GIL,
    so a second thread checks while the first reads."""
    unsigned = data[begin:end].view(view)
    sign = magnitude + 1
    return bool(unsigned.max(initial=0) >= (smallest | sign)
                or unsigned.view(unsigned.dtype.str.replace("u", "i")).max(initial=0) >= smallest)


class _Checker:
    """Checks submitted jobs on one background thread; finish() gives the lowest bad job index (or None)."""

    def __init__(self, data):
        import queue
        import threading
        self.data, self.bad, self.queue = data, [], queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="mmig-weights-check", daemon=True)
        self.thread.start()

    def submit(self, index: int, job) -> None:
        self.queue.put((index, job))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            index, job = item
            if not self.bad and _values_bad(self.data, *job):
                self.bad.append(index)

    def finish(self):
        self.queue.put(None)
        self.thread.join()
        return min(self.bad) if self.bad else None


def _raise_first_bad(path, data, entries, job) -> None:
    """Name the first tensor holding a NaN/Inf, from the first bad job on (the bytes before it were clean)."""
    import numpy as np
    begin_job, _, view, magnitude, smallest = job
    unsigned = np.dtype(view).type
    has_inf = next(v[3] for v in _SAFETENSORS_FLOATS.values() if v[:3] == (view, magnitude, smallest))
    for name, entry in entries:
        begin, stop = entry["data_offsets"]
        if stop <= begin_job or entry["dtype"] not in _SAFETENSORS_FLOATS \
                or _SAFETENSORS_FLOATS[entry["dtype"]][:3] != (view, magnitude, smallest):
            continue
        bits = np.bitwise_and(data[begin:stop].view(unsigned), unsigned(magnitude))
        bad = bits >= smallest
        if bad.any():
            inf = int((bits == smallest).sum()) if has_inf else 0
            raise _non_finite_error(path, name, int(bad.sum()) - inf, inf, bits.size)
    raise AssertionError("a check job was bad but no tensor in it is")  # unreachable: the job lies in tensors


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
