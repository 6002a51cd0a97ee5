"""`python -m training plot <run>/metrics.jsonl --out curves.png`: the loss and each loss term per step."""
from __future__ import annotations

import os
from pathlib import Path

from .metrics import read_metrics


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} holds no steps yet")
    steps = [r["step"] for r in records]
    terms = sorted({name for r in records for name in r.get("terms", {})})
    figure, (loss_axes, speed_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                                   gridspec_kw={"height_ratios": [3, 1]})
    losses = [r["loss"] for r in records]
    loss_axes.plot(steps, losses, label="loss", linewidth=2)
    window = len(losses) // 10
    if window >= 3:  # per-step losses are noisy (each batch draws new noise): show the trend too
        trend = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                 for i in range(len(losses))]
        loss_axes.plot(steps, trend, label=f"loss, mean of last {window} steps", color="black", linestyle="--")
    for name in terms:
        if name != "loss":
            loss_axes.plot(steps, [r.get("terms", {}).get(name, float("nan")) for r in records], label=name,
                           linewidth=1)
    if all(r["loss"] > 0 for r in records):
        loss_axes.set_yscale("log")
    loss_axes.set_ylabel("loss (global-batch mean)")
    loss_axes.legend(loc="upper right")
    loss_axes.grid(alpha=0.3)
    loss_axes.set_title(Path(metrics_path).parent.name or "training")
    speed_axes.plot(steps, [r.get("samples_per_s", float("nan")) for r in records], color="gray")
    speed_axes.set_ylabel("samples/s")
    speed_axes.set_xlabel("step")
    speed_axes.grid(alpha=0.3)
    figure.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp = out_path.with_name(out_path.name + ".partial.png")
    figure.savefig(temp, dpi=100)
    plt.close(figure)
    os.replace(temp, out_path)
    return out_path
