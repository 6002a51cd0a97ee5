"""MMSM's sampling cost on the tiny SDXL in the pinned host's code.

- `step_with_mmsm_over_without`: comfy.sample.sample (what KSampler runs), euler, STEPS steps at a LATENT
  latent, with the tiny MMSM patched at output block 0 over the same run without it; the two alternate,
  median of REPEATS. Target <= 1.05.
- `pipeline_seconds_by_node`: null until the `mmig_full` workflow exists (a later slice of issue 5).
"""
from __future__ import annotations

import time

from bench._common import median, write_result
from bench.guidance import load, sample

REPEATS = 5
STEPS = 10
LATENT = (1, 4, 32, 32)  # 256 px: MMSM sees 8x8 mid-block features
TEXT_TOKENS = 64


def main() -> None:
    import torch

    from devtools.tiny_mmsm import tiny_mmsm_config
    from mmig_core.mmsm import MMSM, OutputBlockPatch, init_mmsm

    model, _, conditioning = load()
    mmsm = init_mmsm(MMSM(tiny_mmsm_config()), seed=0, decoder_std=0.02)  # a "trained" decoder: the work is real
    text = torch.randn(1, TEXT_TOKENS, mmsm.config.text_dim, generator=torch.Generator().manual_seed(0))
    patched = model.clone()
    patched.set_model_output_block_patch(OutputBlockPatch(mmsm, text, None, 1.0))
    sample(model, conditioning, LATENT, steps=2)  # warm-up
    sample(patched, conditioning, LATENT, steps=2)
    times = {"without": [], "with": []}
    for _ in range(REPEATS):
        for name, which in (("without", model), ("with", patched)):
            start = time.perf_counter()
            sample(which, conditioning, LATENT, steps=STEPS)
            times[name].append(time.perf_counter() - start)
    ratio = median(times["with"]) / median(times["without"])
    write_result("mmsm", {
        "step_with_mmsm_over_without": ratio,
        "seconds_per_step": {k: median(v) / STEPS for k, v in times.items()},
        "latent": list(LATENT), "steps": STEPS, "repeats": REPEATS, "text_tokens": TEXT_TOKENS,
        "pipeline_seconds_by_node": None,
    }, f"MMSM: sampling step with / without = {ratio:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
