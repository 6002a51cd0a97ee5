"""MMIG Direct Inversion + MMIG Prompt-to-Prompt against a reference written from the algorithm (PnPInversion's
inversion, offsets and edit loop; attention_control.py's refine, reweight and LocalBlend) on diffusers'
DDIMScheduler and a UNet2DConditionModel holding the same tiny SD1.x weights (bench/_editing_reference.py). The
pack runs in the host's code in-process (its loader, ModelPatcher, apply_model and attention patches)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

STEPS = 3
LATENT = (1, 4, 16, 16)
THRESHOLD = 0.97  # the tiny model's 4x4 maps are flat (0.83-1 of their peak): a bar that leaves part outside


@pytest.fixture(scope="module")
def loaded(tiny_models):
    pytest.importorskip("diffusers")
    from devtools import tiny_sdxl
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from bench import editing
    return editing, editing.load()


def test_the_edit_matches_the_reference_on_the_same_weights(loaded):
    bench, (model, clip, conds, path) = loaded
    z0 = bench.latent(LATENT)
    ours_edit, ours_source, ctl = bench.ours(model, clip, conds, z0, steps=STEPS, blend_threshold=THRESHOLD)
    ref_edit, ref_source, ref = bench.reference(path, conds, z0, steps=STEPS, blend_threshold=THRESHOLD)
    ours_mask, ref_mask = ctl.blend_mask(LATENT[-2:]), ref.last_controller.last_mask
    assert 0 < float(ref_mask.mean()) < 1 and bool((ours_mask == ref_mask).all())
    assert (ours_edit - z0).abs().max() > 0.1                       # an edit happened
    assert bench.relative_difference(ours_edit, ref_edit) <= bench.TOLERANCE
    assert (ours_source - z0).abs().max() <= 1e-4 and (ref_source - z0).abs().max() <= 1e-4
