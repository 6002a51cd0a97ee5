"""Progress on rank 0: a progress bar (tqdm when installed, else a log line) and metrics as JSON lines.

Each line of `<out_dir>/metrics.jsonl`:
    {"step": 12, "loss": 0.41, "terms": {"l1": 0.41}, "lr": {"restorer": 0.0002},
     "samples_per_s": 35.2, "elapsed": 4.1, "peak_rss_mib": 812.5}
`step` counts finished optimizer steps; `loss` and `terms` are means over the global batch; `peak_rss_mib`
is the peak resident memory per process so far (mean over the ranks); on CUDA `cuda_peak_mib` (rank 0's
peak allocated GPU memory) is added.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger("training")


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines past the checkpoint's step (a crash can leave some), atomically."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        temp = self.path.with_suffix(".jsonl.partial")
        temp.write_text("".join(line + "\n" for line in kept))
        os.replace(temp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file {str(path)!r} not found (a run writes <out_dir>/metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool, log_every: int):
        self.enabled, self.log_every, self.total = enabled, max(log_every, 1), total
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{samples_per_s:.1f}", refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            log.info("step %d/%d  loss %.4f  %.1f samples/s", step, self.total, loss, samples_per_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
