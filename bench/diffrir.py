"""DiffRIR restoration cost as images grow: time and peak memory at 4x the pixels over 1x, and s/MP.

- `time_4x_over_1x`: tiny config, 448x448 vs 896x896 px, 256 px tiles with 32 px overlap (2x2 vs 4x4
  tiles), alternated in one process, median of REPEATS each. Linear is 4.0; the target is <= 4.4.
- `peak_mem_4x_over_1x`: paper config, same sizes and tiles, each size in a fresh process: the peak
  resident memory the restoration adds (Linux VmHWM, reset via /proc/self/clear_refs after the
  inputs exist and a warm-up ran). The inputs and the output necessarily grow 4x; the network's
  working memory must not. Target <= 1.3.
- `seconds_per_megapixel_tiny` / `_paper`: time per megapixel at 448x448 on this CPU (tiny: median of
  REPEATS; paper: one run after a warm-up).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from bench._common import median, write_result

REPEATS = 3
SIZE_1X, SIZE_4X, TILE, OVERLAP = 448, 896, 256, 32


def _inputs(size: int):
    import torch
    g = torch.Generator().manual_seed(size)
    coarse = torch.rand(1, 3, 6, 6, generator=g)
    generated = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    reference = (generated * 0.95 + 0.02).clamp(0, 1)
    mask = torch.zeros(size, size)
    mask[:, : size // 4] = 1
    mask[:, -size // 4:] = 1
    return generated.clamp(0, 1), reference, mask


def _model(preset: str):
    import torch
    from mmig_core.diffrir import DiffRIR, paper_config, tiny_config
    torch.manual_seed(0)
    return DiffRIR(paper_config() if preset == "paper" else tiny_config()).eval()


def _timed(model, size: int) -> float:
    from mmig_core.diffrir import restore_image
    generated, reference, mask = _inputs(size)
    start = time.perf_counter()
    restore_image(model, generated, reference, mask, tile=TILE, overlap=OVERLAP)
    return time.perf_counter() - start


def _peak_rss_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))


def worker(preset: str, size: int) -> dict:
    """Runs in a fresh process: the peak memory one restoration adds, in MiB."""
    from mmig_core.diffrir import restore_image
    model = _model(preset)
    restore_image(model, *_inputs(64), tile=TILE, overlap=OVERLAP)  # warm-up: kernels, allocator pools
    generated, reference, mask = _inputs(size)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current resident size
    before = _rss_kib()
    restore_image(model, generated, reference, mask, tile=TILE, overlap=OVERLAP)
    return {"added_peak_mib": (_peak_rss_kib() - before) / 1024}


def _worker_peak(preset: str, size: int) -> float:
    out = subprocess.run([sys.executable, "-m", "bench.diffrir", "--worker", preset, str(size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["added_peak_mib"]


def main() -> None:
    import torch
    tiny = _model("tiny")
    _timed(tiny, 64)
    times = {SIZE_1X: [], SIZE_4X: []}
    for _ in range(REPEATS):
        for size in times:
            times[size].append(_timed(tiny, size))
    time_ratio = median(times[SIZE_4X]) / median(times[SIZE_1X])
    megapixels = SIZE_1X * SIZE_1X / 1e6
    tiny_spm = median(times[SIZE_1X]) / megapixels

    paper = _model("paper")
    _timed(paper, 64)
    paper_spm = _timed(paper, SIZE_1X) / megapixels  # one run: the paper network is slow on a CPU
    del paper

    peaks = {size: _worker_peak("paper", size) for size in (SIZE_1X, SIZE_4X)}  # deterministic: one run each
    mem_ratio = peaks[SIZE_4X] / peaks[SIZE_1X]
    write_result("diffrir", {
        "time_4x_over_1x": time_ratio,
        "peak_mem_4x_over_1x": mem_ratio,
        "seconds_per_megapixel_tiny": tiny_spm,
        "seconds_per_megapixel_paper": paper_spm,
        "seconds_median_tiny": {str(k): median(v) for k, v in times.items()},
        "added_peak_mib_paper": {str(k): v for k, v in peaks.items()},
        "sizes_px": [SIZE_1X, SIZE_4X], "tile": TILE, "overlap": OVERLAP, "repeats": REPEATS,
        "threads": torch.get_num_threads(),
    }, f"4x pixels: time x{time_ratio:.2f} (tiny), peak memory x{mem_ratio:.2f} (paper); "
       f"{tiny_spm:.2f} s/MP tiny, {paper_spm:.1f} s/MP paper")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], int(sys.argv[3]))))
    else:
        main()
