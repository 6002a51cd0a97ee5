"""Training engine scaling on the CPU, through `python -m training` exactly as a user runs it.

The model: the pack's tiny SDXL UNet (5.7 M parameters, SDXL's 2048-d context), every weight trainable,
noise prediction through training/sdxl.py (bench/_training_unet.py), global batch BATCH of LATENT x LATENT
latents (256 px images; at 64-128 px the per-step costs that every process repeats whole, AdamW over all
5.7 M weights, gradient clipping and the UNet's Python overhead, outweigh the halved compute: 1.2-1.3x).
Where the tiny SDXL cannot be had, a UNet2DConditionModel of the same shape built from a config;
`setup.model` says which.

- `samples_per_s_2proc_over_1proc`: samples/s of 2 processes (torchrun, DDP over gloo) over 1 process,
  both with 1 thread per process (OMP_NUM_THREADS=1) and the same global batch; a run's samples/s is
  taken over its steps after WARMUP (rank 0's elapsed time in metrics.jsonl). Runs alternate, median of
  REPEATS each. Target >= 1.6. Other work on the machine's 2 cores lowers it: `setup.load_average` is the
  1-minute load when the bench started.
- `peak_mem_fsdp_over_ddp`: peak resident memory per process (the engine's `peak_rss_mib`, the ranks'
  mean) with FSDP over that with DDP, 2 processes, median of MEMORY_REPEATS each. It includes what every
  process holds before any model exists (Python, torch, transformers, diffusers), which dominates at
  this size; FSDP shards only parameters, gradients and optimizer state, so the ratio nears 1 on tiny
  models and falls as the model grows.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from bench._common import median, write_result

REPO = Path(__file__).resolve().parents[1]
REPEATS, MEMORY_REPEATS = 2, 1
STEPS, WARMUP, BATCH, LATENT = 6, 2, 16, 32
RUN_TIMEOUT_S = 300


def _recipe_arguments() -> tuple[list[str], str]:
    """The tiny SDXL UNet where the pack's tiny models build here, else the diffusers toy UNet."""
    try:
        from devtools.tiny_models import ensure_tiny_models
        checkpoint = ensure_tiny_models() / "checkpoints" / "mmig-tiny-sdxl.safetensors"
        importlib.import_module("training.sdxl")  # the shared SDXL training code the recipes use
    except Exception as e:  # the toy still measures the engine
        print(f"bench/training: tiny SDXL unavailable ({e}); using the diffusers toy UNet")
        return ["bench._training_unet"], "a UNet2DConditionModel of the tiny SDXL's shape, from a config"
    return (["bench._training_unet", f"recipe.sdxl={checkpoint}"],
            "the tiny SDXL UNet (5.7 M parameters, all trainable) via training/sdxl.py")


def _run(recipe_arguments: list[str], out_dir: Path, processes: int, strategy: str) -> dict:
    training = ["-m", "training", *recipe_arguments, f"recipe.latent={LATENT}", f"train.out_dir={out_dir}",
                f"train.steps={STEPS}",
                f"train.batch_size={BATCH}", f"train.strategy={strategy}", "train.device=cpu",
                "train.checkpoint_every=100000"]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, *launcher, *training], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(f"{processes}-process {strategy} run still going after {RUN_TIMEOUT_S}s")
    if process.returncode != 0:
        raise RuntimeError(f"{processes}-process {strategy} run failed:\n{output[-2000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    timed = records[WARMUP - 1:]
    return {"samples_per_s": (len(timed) - 1) * BATCH / (timed[-1]["elapsed"] - timed[0]["elapsed"]),
            "peak_rss_mib": records[-1]["peak_rss_mib"]}


def main() -> None:
    load_average = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"1proc": [], "2proc_ddp": [], "2proc_fsdp": []}
    arguments, model = _recipe_arguments()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        scratch = Path(scratch)
        for repeat in range(REPEATS):
            runs["1proc"].append(_run(arguments, scratch / f"one-{repeat}", 1, "ddp"))
            runs["2proc_ddp"].append(_run(arguments, scratch / f"ddp-{repeat}", 2, "ddp"))
            if repeat < MEMORY_REPEATS:
                runs["2proc_fsdp"].append(_run(arguments, scratch / f"fsdp-{repeat}", 2, "fsdp"))

    def med(kind, key):
        return median([r[key] for r in runs[kind]])

    speedup = med("2proc_ddp", "samples_per_s") / med("1proc", "samples_per_s")
    memory_ratio = med("2proc_fsdp", "peak_rss_mib") / med("2proc_ddp", "peak_rss_mib")
    write_result("training", {
        "samples_per_s_2proc_over_1proc": speedup,
        "peak_mem_fsdp_over_ddp": memory_ratio,
        "samples_per_s": {kind: med(kind, "samples_per_s") for kind in runs},
        "peak_rss_mib_per_process": {kind: med(kind, "peak_rss_mib") for kind in runs},
        "setup": {"model": model, "latent": f"{LATENT}x{LATENT}x4", "global_batch": BATCH, "steps": STEPS, "warmup_steps": WARMUP,
                  "threads_per_process": 1, "repeats": REPEATS, "memory_repeats": MEMORY_REPEATS,
                  "load_average": load_average},
    }, f"2 procs / 1 proc samples/s {speedup:.2f}x (target >= 1.6; load {load_average:.1f} on "
       f"{os.cpu_count()} cores); peak RSS per process FSDP/DDP {memory_ratio:.2f}")


if __name__ == "__main__":
    main()
