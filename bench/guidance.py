"""A-STAR guidance cost, and the loss evidence of the DEM nodes, on the tiny SDXL in the pinned host's code.

- `guided_over_plain`: comfy.sample.sample (what KSampler runs), euler, STEPS steps at a LATENT latent,
  GUIDED of them guided, over the same run unguided; alternated, median of REPEATS.
- `guided_step_over_floor`: inside the guided runs, each guided step's time over the floor measured
  on the same batch right after it: one forward with gradients of the sampler's CFG batch plus one
  backward. Target <= 1.2.
- `peak_mem_guided_over_plain`: the peak resident memory a sampling run adds (Linux VmHWM, reset
  via /proc/self/clear_refs after a warm-up), each mode in a fresh process, at a larger latent.
- `ours_over_diffusers_attend_excite`: see bench/_guidance_anchor.py (diffusers' Attend-and-Excite on
  the same tiny UNet weights, same steps and altered steps); null when diffusers is missing.
- `evidence`: per-step L_AS and L_AR for a two-concept prompt without guidance (scale 0, losses
  measured only) and with it, and the layered embeddings' Eq. 15 loss during the optimisation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench._common import median, write_result

REPEATS = 3
STEPS, GUIDED = 20, 10
LATENT = (1, 4, 32, 32)       # 256 px: the guided maps are 8x8
MEMORY_LATENT = (1, 4, 64, 64)
PROMPT, CONCEPTS = "a photo of a cat and a dog", "cat, dog"
EVIDENCE_SCALES = (0.0, 20.0, 2000.0)


def load():
    """The tiny SDXL through the host's own loader, and the prompt encoded with its CLIP."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from devtools import tiny_sdxl
    from devtools.tiny_models import TINY_SDXL, ensure_tiny_models
    tiny_sdxl.import_host()
    import comfy.sd
    import devtools.tiny_host_support  # noqa: F401

    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
            str(ensure_tiny_models() / TINY_SDXL), output_vae=False, output_clip=True, embedding_directory=None)
        cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
        neg, neg_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    return model, clip, ([[cond, {"pooled_output": pooled}]], [[neg, {"pooled_output": neg_pooled}]])


def sample(model, conditioning, latent_shape=LATENT, steps=STEPS, sampler="euler", seed=0):
    import torch
    import comfy.sample

    latent = torch.zeros(latent_shape)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed=seed)
        return comfy.sample.sample(model, noise, steps, 5.0, sampler, "normal", *conditioning, latent, seed=seed,
                                   disable_pbar=True)


def guided(model, clip, **settings):
    from devtools.pack import import_pack_module
    g = import_pack_module("nodes._guidance")
    AStarSettings, concepts_from_clip, guided_model = g.AStarSettings, g.concepts_from_clip, g.guided_model
    positions, words = concepts_from_clip(clip, PROMPT, CONCEPTS, "")
    return guided_model(model, AStarSettings(positions, words, **settings))


def timed_guided_model(model, clip, step_times: list, floor_times: list):
    """The guided model, its wrapper timing each guided step and then the floor on the same batch."""
    import torch
    from mmig_core.astar import norms_on_copies

    patched, guidance = guided(model, clip, guided_steps=GUIDED)
    inner = guidance.unet_wrapper
    diffusion_model = patched.model.diffusion_model

    def timing_wrapper(apply_model, args):
        records_before = len(guidance.run.records)
        start = time.perf_counter()
        out = inner(apply_model, args)
        elapsed = time.perf_counter() - start
        records = guidance.run.records
        if len(records) > records_before and records[-1].updated:  # a guided step
            step_times.append(elapsed)
            with torch.inference_mode(False), torch.enable_grad(), norms_on_copies(diffusion_model):
                x = args["input"].clone().requires_grad_(True)
                c = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in args["c"].items()}
                start = time.perf_counter()
                floor_out = apply_model(x, args["timestep"].clone(), **c)
                torch.autograd.grad(floor_out.float().square().mean(), x)
                floor_times.append(time.perf_counter() - start)
        return out

    patched.set_model_unet_function_wrapper(timing_wrapper)
    return patched


def peak_memory_child(mode: str) -> int:
    """Run in a fresh process: the peak resident memory one sampling run adds, in bytes."""
    model, clip, conditioning = load()
    target = guided(model, clip, guided_steps=GUIDED)[0] if mode == "guided" else model
    sample(target, conditioning, MEMORY_LATENT, steps=3)  # warm-up: loads weights, fills caches
    rss = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    sample(target, conditioning, MEMORY_LATENT, steps=3)
    return (_status_kib("VmHWM") - rss) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_memory(mode: str) -> int:
    out = subprocess.run([sys.executable, "-m", "bench.guidance", "--peak", mode], capture_output=True, text=True,
                         check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return int(out.stdout.strip().splitlines()[-1])


def loss_evidence(model, clip, conditioning) -> dict:
    runs = {}
    for scale in EVIDENCE_SCALES:
        patched, guidance = guided(model, clip, guided_steps=GUIDED, scale_factor=scale, measure_all_steps=True)
        sample(patched, conditioning)
        records = guidance.all_records()[-1]
        runs[f"scale_{scale:g}"] = {
            "L_AS": [round(r.segregation, 5) for r in records],
            "L_AR": [None if r.retention is None else round(r.retention, 5) for r in records],
            "updated_steps": sum(r.updated for r in records),
            "final_overlap": round(records[-1].segregation, 5),
        }
    return runs


def layered_evidence(model, clip) -> dict:
    import torch
    import comfy.model_management
    from mmig_core import layered_embeddings as layered

    with torch.inference_mode():
        fg, fg_pooled = clip.encode_from_tokens(clip.tokenize("a fluffy white cat"), return_pooled=True)
        bg, bg_pooled = clip.encode_from_tokens(clip.tokenize("a sunny garden"), return_pooled=True)
        comfy.model_management.load_models_gpu([model])
    latent = torch.randn(LATENT, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 256, 256)
    mask[:, 64:192, 64:192] = 1
    result, _ = layered.optimise_for_model(
        model.model, torch.device("cpu"), latent, layered.latent_mask(mask, latent.shape),
        (fg, {"pooled_output": fg_pooled}), (bg, {"pooled_output": bg_pooled}),
        steps=30, learning_rate=0.05, seed=0, probes=8)
    losses = result.losses
    return {"steps": len(losses), "learning_rate": 0.05, "loss_per_step": [round(v, 5) for v in losses],
            "mean_first_5": round(sum(losses[:5]) / 5, 5), "mean_last_5": round(sum(losses[-5:]) / 5, 5),
            "probe_before": round(result.probe_before, 5), "probe_after": round(result.probe_after, 5)}


def main() -> None:
    model, clip, conditioning = load()
    step_times, floor_times = [], []
    timed = timed_guided_model(model, clip, step_times, floor_times)
    plain_runs, guided_runs = [], []
    sample(model, conditioning, steps=2)
    sample(timed, conditioning, steps=2)  # warm-ups
    step_times.clear()
    floor_times.clear()
    for _ in range(REPEATS):
        start = time.perf_counter()
        sample(model, conditioning)
        plain_runs.append(time.perf_counter() - start)
        probes_before, start = len(floor_times), time.perf_counter()
        sample(timed, conditioning)
        guided_runs.append(time.perf_counter() - start - sum(floor_times[probes_before:]))  # minus the floor probes
    result = {
        "guided_over_plain": round(median(guided_runs) / median(plain_runs), 3),
        "guided_step_over_floor": round(median(step_times) / median(floor_times), 3),
        "peak_mem_guided_over_plain": None,
        "ours_over_diffusers_attend_excite": None,
        "setup": {"steps": STEPS, "guided_steps": GUIDED, "latent": list(LATENT), "sampler": "euler",
                  "repeats": REPEATS, "plain_s": round(median(plain_runs), 3),
                  "guided_s": round(median(guided_runs), 3), "guided_step_s": round(median(step_times), 4),
                  "floor_s": round(median(floor_times), 4)},
    }
    plain_mem, guided_mem = peak_memory("plain"), peak_memory("guided")
    result["peak_mem_guided_over_plain"] = round(guided_mem / max(plain_mem, 1), 3)
    result["setup"].update(memory_latent=list(MEMORY_LATENT), plain_peak_mib=round(plain_mem / 2 ** 20, 1),
                           guided_peak_mib=round(guided_mem / 2 ** 20, 1))
    try:
        from bench._guidance_anchor import ours_over_attend_excite
        result["ours_over_diffusers_attend_excite"], result["anchor"] = ours_over_attend_excite(
            model, clip, conditioning)
    except ImportError as exc:
        result["anchor"] = {"skipped": f"diffusers is not installed ({exc})"}
    result["evidence"] = {"astar": loss_evidence(model, clip, conditioning), "layered": layered_evidence(model, clip)}
    summary = ", ".join(f"{k} {result[k]}" for k in ("guided_over_plain", "guided_step_over_floor",
                                                     "peak_mem_guided_over_plain", "ours_over_diffusers_attend_excite"))
    write_result("guidance", result, summary)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        print(peak_memory_child(sys.argv[2]))
    else:
        main()
