"""What the finiteness/dtype check of weight files costs at load time. Every loader reads safetensors through
mmig_core.model_files.load_safetensors_checked: one sequential read of the file into one buffer, each 4 MB checked
by its bits (two integer max reductions) right after it arrives, on a second thread for files of 16 MB and more.

Each loader reads a file of a realistic size in three variants, alternated within every repeat, median of REPEATS:
- `with_check`: as shipped;
- `without`: the same reader with the value check replaced by a no-op (the check's own cost is the difference);
- `safetensors_mmap`: the loaders as before the check, through safetensors' load_file (a memory map: its bytes are
  read when a tensor is first used, so for the LoRA part of that work moves out of the timed load).
`hot`: the file is in the page cache; `cold`: its pages are dropped first (posix_fadvise DONTNEED on that file
only), as at a first load. The files:
- `lora`: load_lora_file on an SDXL-sized rank-32 kohya LoRA (722 modules, fp16, about 230 MB: what sd-scripts writes);
- `mmsm`: load_mmsm at the paper's insertion point (SDXL mid block, 1280 channels) over a 4096-d LLM embedding;
- `mumu_adapter`: load_adapter over a 4096-d VLM, width 1024, 4 layers;
- `diffrir`: load_diffrir on the published x1 network (paper_config).
Keys: `<loader>_{hot,cold}_load_with_check_over_without` (the issue's bound is 1.05),
`<loader>_{hot,cold}_fastest_load_with_check_over_without` (the fastest repeat of each: the least disturbed by other
jobs), `<loader>_{hot,cold}_load_cpu_with_check_over_without` (process CPU time, all threads: what the check costs in
work), `<loader>_{hot,cold}_load_with_check_over_safetensors_mmap`, `<loader>_{hot,cold}_load_seconds`, and
`<loader>_check_cpu_over_hot_load_without`: the check run inline on the reading thread (no second thread), minus the
same read without it, over the hot load: the CPU work the check adds, which the second thread hides from the wall
time when a core is free. On a machine whose cores are all busy (the 2-core development box shared by several
jobs) the with/without wall ratios move by +-30 % between runs; the CPU ratio is the steadier one.
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

REPEATS = 11
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
    """The loaders' reader (model_files.load_safetensors_checked) with its value check replaced by a no-op: the
    same single read into one buffer, nothing checked."""
    from mmig_core import model_files
    saved = model_files._values_bad, model_files._THREAD_MIN_BYTES
    model_files._values_bad = lambda *_args, **_kwargs: False
    model_files._THREAD_MIN_BYTES = 1 << 62
    try:
        yield
    finally:
        model_files._values_bad, model_files._THREAD_MIN_BYTES = saved


@contextmanager
def safetensors_reader():
    """The loaders reading through safetensors' load_file (a memory map: bytes are read when a tensor is first
    used), nothing checked: the loaders as they were before the check."""
    from safetensors.torch import load_file

    from mmig_core import lora, model_files
    from mmig_core.diffrir import weights

    def read(path, **_kwargs):
        return load_file(str(path)), model_files.check_safetensors_file(path)

    saved = [(module, module.load_safetensors_checked) for module in (lora, model_files, weights)]
    for module, _ in saved:
        module.load_safetensors_checked = read
    try:
        yield
    finally:
        for module, original in saved:
            module.load_safetensors_checked = original


def evict(path: Path) -> None:
    """Drop this one file's pages from the page cache (a first load reads it from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


VARIANTS = {"with_check": nullcontext, "without": check_switched_off, "safetensors_mmap": safetensors_reader}


def timings(load, path: Path, cold: bool) -> dict:
    """{variant: (median wall s, min wall s, median process CPU s)}, the variants alternated within every repeat
    (the machine's load drifts). The CPU time counts every thread of the process: the checker's too."""
    load()  # warm the code paths
    wall = {name: [] for name in VARIANTS}
    cpu = {name: [] for name in VARIANTS}
    for _ in range(REPEATS):
        for name, switch in VARIANTS.items():
            if cold:
                evict(path)
            with switch():
                start, start_cpu = time.perf_counter(), time.process_time()
                load()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return {name: (median(wall[name]), min(wall[name]), median(cpu[name])) for name in VARIANTS}


def main() -> None:
    from mmig_core.diffrir import load_diffrir
    from mmig_core.lora import load_lora_file
    from mmig_core.mmsm import load_mmsm
    from mmig_core.model_files import check_safetensors_values
    from mmig_core.mumu_adapter import load_adapter

    result = {"repeats": REPEATS, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as temp:  # on the disk, not a tmpfs: cold reads are real
        files = write_files(Path(temp))
        result["lora_file_mb"] = round(files["lora"].stat().st_size / 1e6, 1)
        loaders = {"lora": (load_lora_file, "lora"), "mmsm": (load_mmsm, "mmsm"),
                   "mumu_adapter": (load_adapter, "adapter"), "diffrir": (load_diffrir, "diffrir")}
        for name, (loader, file) in loaders.items():
            for cold in (False, True):
                measured = timings(lambda: loader(files[file]), files[file], cold)
                seconds = {k: v[0] for k, v in measured.items()}
                key = f"{name}_{'cold' if cold else 'hot'}"
                result[f"{key}_load_with_check_over_without"] = round(seconds["with_check"] / seconds["without"], 4)
                result[f"{key}_fastest_load_with_check_over_without"] = round(
                    measured["with_check"][1] / measured["without"][1], 4)
                result[f"{key}_load_cpu_with_check_over_without"] = round(
                    measured["with_check"][2] / measured["without"][2], 4)
                result[f"{key}_load_with_check_over_safetensors_mmap"] = round(
                    seconds["with_check"] / seconds["safetensors_mmap"], 4)
                result[f"{key}_load_seconds"] = {k: round(v, 4) for k, v in seconds.items()}
                result[f"{key}_fastest_load_seconds"] = {k: round(v[1], 4) for k, v in measured.items()}
            # The check's CPU work timed alone (the read and check on one thread, minus the read alone): what
            # the second thread spends; the with/without ratio is what a user waits.
            inline, bare = [], []
            for _ in range(REPEATS):
                for times, switch in ((inline, nullcontext), (bare, check_switched_off)):
                    with switch(), single_threaded():
                        start = time.perf_counter()
                        check_safetensors_values(files[file], integer_scalars=(".alpha",))
                        times.append(time.perf_counter() - start)
            result[f"{name}_check_cpu_over_hot_load_without"] = round(
                max(0.0, median(inline) - median(bare)) / result[f"{name}_hot_load_seconds"]["without"], 4)
    ratios = {k[:-len("_load_with_check_over_without")]: v for k, v in result.items()
              if k.endswith("_load_with_check_over_without") and "_fastest_" not in k}
    mmap_ratios = {k[:-len("_load_with_check_over_safetensors_mmap")]: v for k, v in result.items()
                   if k.endswith("_load_with_check_over_safetensors_mmap")}
    cpu = {k[:-len("_check_cpu_over_hot_load_without")]: v for k, v in result.items()
           if k.endswith("_check_cpu_over_hot_load_without")}
    fastest = {k[:-len("_fastest_load_with_check_over_without")]: v for k, v in result.items()
               if k.endswith("_fastest_load_with_check_over_without")}
    write_result("loading", result, "weight-file check, load time with/without (bound 1.05): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
                 + "; fastest of the repeats, with/without: " + ", ".join(f"{k} {v:.3f}" for k, v in fastest.items())
                 + "; with check / safetensors' mapped load_file: " + ", ".join(f"{k} {v:.3f}" for k, v in mmap_ratios.items())
                 + "; check CPU time / hot load: " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))


@contextmanager
def single_threaded():
    """The check inline on the reading thread (no second thread): its CPU cost shows in the wall time."""
    from mmig_core import model_files
    saved = model_files._THREAD_MIN_BYTES
    model_files._THREAD_MIN_BYTES = 1 << 62
    try:
        yield
    finally:
        model_files._THREAD_MIN_BYTES = saved


if __name__ == "__main__":
    main()
