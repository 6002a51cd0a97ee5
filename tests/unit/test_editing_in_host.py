"""MMIG Direct Inversion + MMIG Prompt-to-Prompt on the tiny SD1.x and SDXL, inside the real host's code run
in-process (its checkpoint loader, ModelPatcher, apply_model and attention patches): exactness, what the
controllers touch on the real UNet, LocalBlend, and the clear errors."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.pack import import_pack_module  # noqa: E402

STEPS = 5
LATENT = (1, 4, 16, 16)    # 128 px: quarter-side (LocalBlend) layers 4x4, self-attention copied up to 8x8
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"


def load(tiny_models, name):
    from devtools import tiny_sdxl
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import comfy.sd
    import devtools.tiny_host_support  # noqa: F401

    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_models / name), output_vae=False,
                                                                  output_clip=True, embedding_directory=None)
    return model, clip


def encode(clip, text):
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def sd15(tiny_models):
    from devtools.tiny_models import TINY_SD15
    return load(tiny_models, TINY_SD15)


@pytest.fixture(scope="module")
def editing(sd15):
    return import_pack_module("nodes.editing")


@pytest.fixture(scope="module")
def inverted(sd15, editing):
    model, clip = sd15
    latent = {"samples": torch.randn(LATENT, generator=torch.Generator().manual_seed(0))}
    src = encode(clip, SOURCE)
    with torch.inference_mode():
        inversion, noisy = editing.MMIG_DirectInversion().invert(model, latent, src, STEPS)
    return latent, src, inversion, noisy


def edit(sd15, editing, inverted, target_prompt=TARGET, mode="replace", **options):
    model, clip = sd15
    latent, src, inversion, _ = inverted
    with torch.inference_mode():
        return editing.run_edit(model, inversion, src, encode(clip, target_prompt), clip, SOURCE, target_prompt,
                                encode(clip, ""), 7.5, mode, options.pop("cross", 0.4), options.pop("self_", 0.6),
                                **options)


def test_inversion_output(inverted):
    latent, _, inversion, noisy = inverted
    assert len(inversion.trajectory) == STEPS + 1 and inversion.schedule.timesteps == [800, 600, 400, 200, 0]
    assert noisy["samples"].shape == LATENT and not torch.allclose(noisy["samples"], latent["samples"], atol=0.1)


def test_source_branch_reconstructs_and_target_equal_to_source_is_exact_with_the_offset(sd15, editing, inverted):
    latent = inverted[0]["samples"]
    result, _ = edit(sd15, editing, inverted)
    assert (result.source - latent).abs().max() <= 1e-4
    assert (result.edited - latent).abs().max() > 1e-2
    same, _ = edit(sd15, editing, inverted, target_prompt=SOURCE, target_offset="source")
    assert (same.edited - latent).abs().max() <= 1e-4
    assert (same.source - latent).abs().max() <= 1e-4


def test_controllers_fire_on_the_intended_layers_and_steps(sd15, editing, inverted):
    result, ctl = edit(sd15, editing, inverted, cross=0.4, self_=0.6)
    # steps < int(0.4 * 6) = 2 for cross-attention (all 16 of the tiny SD1.x's cross-attention layers)
    assert ctl.fired("cross") == {0: 16, 1: 16}
    # steps < int(0.6 * 5) = 3 for self-attention, on the layers at half the latent's side or smaller: the 8x8
    # (input 4-5, output 6-8), 4x4 (input 7-8, output 3-5) and middle blocks, not the 16x16 ones
    assert ctl.fired("self") == {0: 11, 1: 11, 2: 11}
    assert {layer[:2] for layer in ctl.layers_seen[("self", 0)]} == {
        ("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0),
        ("output", 3), ("output", 4), ("output", 5), ("output", 6), ("output", 7), ("output", 8)}
    assert result.model_calls == STEPS - 1  # the last step (timestep 0 -> its own level) asks nothing
    assert "patches_replace" not in sd15[0].model_options.get("transformer_options", {})  # the MODEL given: unchanged


def test_refine_with_different_token_counts_and_local_blend_outside_the_mask(sd15, editing, inverted):
    result, ctl = edit(sd15, editing, inverted, target_prompt="a photo of a fluffy dog", mode="refine",
                       blend_words="dog", blend_threshold=0.9)  # 4x4 maps: a high bar
    # LocalBlend reads the quarter-side maps of the input and output blocks (5 layers), every step
    assert ctl.fired("blend_maps") == {step: 5 for step in range(STEPS)}
    mask = result.mask
    assert mask is not None and 0 < float(mask.mean()) < 1
    outside = (mask == 0).expand(LATENT)
    assert torch.equal(result.edited[outside], result.source[outside])
    assert not torch.allclose(result.edited[~outside], result.source[~outside])


def test_reweight_scales_the_target_words(sd15, editing, inverted):
    plain, _ = edit(sd15, editing, inverted)
    weighted, ctl = edit(sd15, editing, inverted, mode="reweight", reweight_words="dog", reweight_factor=4.0)
    assert ctl.s.equalizer is not None and ctl.s.equalizer.tolist().count(4.0) == 1
    assert not torch.allclose(plain.edited, weighted.edited)


@pytest.mark.parametrize("options, words", [
    (dict(target_prompt="a photo of a fluffy dog"), ("mode replace", "Use mode refine", "'fluffy'")),
    (dict(blend_words="zebra"), ("blend word 'zebra'", "not in the source or target prompt", "'photo'")),
    (dict(mode="reweight", reweight_words="cat"), ("reweight word 'cat'", "not in the target prompt")),
    (dict(mode="reweight"), ("mode reweight needs reweight_words",)),
    (dict(start_latent={"samples": torch.zeros(1, 4, 8, 8)}), ("start_latent is [1, 4, 8, 8]", "[1, 4, 16, 16]")),
])
def test_bad_input_is_named(sd15, editing, inverted, options, words):
    with pytest.raises(ValueError) as info:  # the pack's EditError, as imported under the host's package name
        edit(sd15, editing, inverted, **options)
    for w in words:
        assert w in str(info.value)


def test_an_inversion_of_another_model_or_source_is_refused(sd15, editing, inverted, tiny_models):
    from devtools.tiny_models import TINY_SDXL
    model, clip = sd15
    _, src, inversion, _ = inverted
    other, other_clip = load(tiny_models, TINY_SDXL)
    with pytest.raises(ValueError, match="another MODEL"):
        editing.run_edit(other, inversion, src, src, clip, SOURCE, SOURCE, src, 7.5, "replace", 0.4, 0.6)
    with pytest.raises(ValueError, match="source CONDITIONING differs"):
        editing.run_edit(model, inversion, encode(clip, "a dog"), src, clip, "a dog", SOURCE, src, 7.5, "refine",
                         0.4, 0.6)


def test_sdxl_reconstructs(tiny_models):
    from devtools.tiny_models import TINY_SDXL
    model, clip = load(tiny_models, TINY_SDXL)
    editing = import_pack_module("nodes.editing")
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    src, neg = encode(clip, SOURCE), encode(clip, "")
    with torch.inference_mode():
        inversion, _ = editing.MMIG_DirectInversion().invert(model, latent, src, 3)
        same, ctl = editing.run_edit(model, inversion, src, src, clip, SOURCE, SOURCE, neg, 7.5, "replace", 0.4, 0.6,
                                     target_offset="source")
    assert (same.source - latent["samples"]).abs().max() <= 1e-4
    assert (same.edited - latent["samples"]).abs().max() <= 1e-4
    assert ctl.fired("cross")  # SDXL's cross-attention layers went through the controller
