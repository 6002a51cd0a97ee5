"""What the finiteness/dtype check of weight files (mmig_core.model_files.check_safetensors_values, one pass over
the file's bits in place) costs at load time.

Each loader reads a file of a realistic size with the check and with it replaced by a no-op, alternated, median
of REPEATS; the key is the ratio (with / without), the issue's bound is 1.05. `hot`: the file is in the page
cache; `cold`: its pages are dropped first (posix_fadvise DONTNEED on that file only), as at a first load.
- `lora_{hot,cold}_load_with_check_over_without`: load_lora_file on an SDXL-sized rank-32 kohya LoRA (722 modules, fp16,
  about 230 MB: the size sd-scripts writes).
- `mmsm_{hot,cold}_load_with_check_over_without`: load_mmsm at the paper's insertion point (SDXL mid block, 1280
  channels) over a 4096-d LLM embedding.
- `mumu_adapter_{hot,cold}_load_with_check_over_without`: load_adapter over a 4096-d VLM, width 1024, 4 layers.
- `diffrir_{hot,cold}_load_with_check_over_without`: load_diffrir on the published x1 network (paper_config).
- `<loader>_check_alone_over_hot_load_without`: the check timed alone on the file over the hot load without it.
- `lora_check_over_read`: the check alone over the bare safetensors read of the LoRA (load_file, hot), for scale.
A check must read every byte once, and a hot-cache read is a single copy, so for a bare file read (the LoRA) the
ratio stays well above 1.05; where loading also builds the module (MMSM, adapters, DiffRIR), the build dilutes it.
On a shared machine the with/without ratios move by +-30 % between runs; the check-alone ratio is the steadier one.
"""
from __future__ import annotations

import tempfile
import time
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from bench._common import median, write_result
from devtools.paths import CACHE_DIR

REPEATS = 7
LORA_MODULES = 722
LORA_RANK = 32
LORA_WIDTHS = ((640, 640), (1280, 1280), (2048, 1280), (1280, 5120), (5120, 1280), (2048, 640))


def write_files(folder: Path) -> dict:
    from safetensors.torch import save_file

    from mmig_core.diffrir import DiffRIR, paper_config, save_diffrir
    from mmig_core.mmsm import MMSM, MMSMConfig, init_mmsm, save_mmsm
    from mmig_core.mumu_adapter import MUMUAdapter, MUMUAdapterConfig, init_adapter, save_adapter

    generator = torch.Generator().manual_seed(0)
    lora = {}
    for i in range(LORA_MODULES):
        fan_in, fan_out = LORA_WIDTHS[i % len(LORA_WIDTHS)]
        name = f"lora_unet_module_{i}"
        lora[f"{name}.lora_down.weight"] = torch.randn(LORA_RANK, fan_in, generator=generator).half()
        lora[f"{name}.lora_up.weight"] = torch.randn(fan_out, LORA_RANK, generator=generator).half()
        lora[f"{name}.alpha"] = torch.tensor(float(LORA_RANK) / 2)
    save_file(lora, str(folder / "lora.safetensors"))
    save_mmsm(init_mmsm(MMSM(MMSMConfig(text_dim=4096, feature_channels=1280)), decoder_std=0.01),
              folder / "mmsm.safetensors")
    save_adapter(init_adapter(MUMUAdapter(MUMUAdapterConfig(input_dim=4096, width=1024, num_layers=4))),
                 folder / "adapter.safetensors")
    save_diffrir(DiffRIR(paper_config()), folder / "diffrir.safetensors")
    return {name: folder / f"{name}.safetensors" for name in ("lora", "mmsm", "adapter", "diffrir")}


@contextmanager
def check_switched_off():
    """Every loader's value check (check_safetensors_values) replaced by a no-op."""
    from mmig_core import lora, model_files
    from mmig_core.diffrir import weights
    saved = [(module, module.check_safetensors_values) for module in (lora, model_files, weights)]
    for module, _ in saved:
        module.check_safetensors_values = lambda *_args, **_kwargs: None
    try:
        yield
    finally:
        for module, original in saved:
            module.check_safetensors_values = original


def evict(path: Path) -> None:
    """Drop this one file's pages from the page cache (a first load reads it from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def ratio(load, path: Path, cold: bool) -> tuple[float, float, float]:
    load()  # warm the code paths
    with_check, without = [], []
    for _ in range(REPEATS):
        for times, switch in ((with_check, nullcontext), (without, check_switched_off)):
            if cold:
                evict(path)
            with switch():
                start = time.perf_counter()
                load()
                times.append(time.perf_counter() - start)
    return median(with_check) / median(without), median(with_check), median(without)


def main() -> None:
    from safetensors.torch import load_file

    from mmig_core.diffrir import load_diffrir
    from mmig_core.lora import load_lora_file
    from mmig_core.mmsm import load_mmsm
    from mmig_core.model_files import check_safetensors_values
    from mmig_core.mumu_adapter import load_adapter

    result = {"repeats": REPEATS, "torch_threads": torch.get_num_threads()}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as temp:  # on the disk, not a tmpfs: cold reads are real
        files = write_files(Path(temp))
        loaders = {"lora": (load_lora_file, "lora"), "mmsm": (load_mmsm, "mmsm"),
                   "mumu_adapter": (load_adapter, "adapter"), "diffrir": (load_diffrir, "diffrir")}
        for name, (loader, file) in loaders.items():
            for cold in (False, True):
                value, with_s, without_s = ratio(lambda: loader(files[file]), files[file], cold)
                key = f"{name}_{'cold' if cold else 'hot'}"
                result[f"{key}_load_with_check_over_without"] = round(value, 4)
                result[f"{key}_load_seconds"] = {"with_check": round(with_s, 4), "without": round(without_s, 4)}
            # The check timed alone on the same (hot) file: less exposed to the noise of a shared machine than
            # the difference of two loads.
            checks = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                check_safetensors_values(files[file], integer_scalars=(".alpha",))
                checks.append(time.perf_counter() - start)
            result[f"{name}_check_alone_over_hot_load_without"] = round(
                median(checks) / result[f"{name}_hot_load_seconds"]["without"], 4)
        result["lora_file_mb"] = round(files["lora"].stat().st_size / 1e6, 1)
        state = load_file(str(files["lora"]))
        reads, checks = [], []
        for _ in range(REPEATS):
            start = time.perf_counter()
            state = load_file(str(files["lora"]))
            reads.append(time.perf_counter() - start)
            start = time.perf_counter()
            check_safetensors_values(files["lora"], integer_scalars=(".alpha",))
            checks.append(time.perf_counter() - start)
        result["lora_check_over_read"] = round(median(checks) / median(reads), 4)
    ratios = {k[:-len("_load_with_check_over_without")]: v for k, v in result.items()
              if k.endswith("_load_with_check_over_without")}
    alone = {k[:-len("_check_alone_over_hot_load_without")]: v for k, v in result.items()
             if k.endswith("_check_alone_over_hot_load_without")}
    write_result("loading", result, "weight-file check, load time with/without (bound 1.05): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
                 + "; check alone / hot load: " + ", ".join(f"{k} {v:.3f}" for k, v in alone.items())
                 + f"; LoRA check alone / bare hot read {result['lora_check_over_read']:.3f}")


if __name__ == "__main__":
    main()
