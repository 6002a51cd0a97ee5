"""MMSM patched into the tiny SDXL through the host's own output-block patch, run in-process with the host's
checkpoint loader, ModelPatcher and sampler (comfy.sample.sample, as KSampler calls it)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.tiny_mmsm import tiny_mmsm_config  # noqa: E402
from mmig_core.mmsm import MMSM, OutputBlockPatch, init_mmsm  # noqa: E402


@pytest.fixture(scope="module")
def loaded(load_tiny_sdxl_in_host):
    model, clip, _, _ = load_tiny_sdxl_in_host(output_clip=True)
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a cat"), return_pooled=True)
        neg, neg_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    return model, ([[cond, {"pooled_output": pooled}]], [[neg, {"pooled_output": neg_pooled}]])


def sample(model, conditioning, latent_shape=(1, 4, 8, 8), steps=2):
    import comfy.sample
    positive, negative = conditioning
    latent = torch.zeros(latent_shape)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed=0)
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                   seed=0, disable_pbar=True)


def patched(model, decoder_std=0.0, on_fire=None, prompts=1):
    mmsm = init_mmsm(MMSM(tiny_mmsm_config()), seed=4, decoder_std=decoder_std)
    text = torch.randn(prompts, 6, mmsm.config.text_dim, generator=torch.Generator().manual_seed(0))
    clone = model.clone()
    clone.set_model_output_block_patch(OutputBlockPatch(mmsm, text, None, 1.0, on_fire=on_fire))
    return clone


@pytest.mark.parametrize("latent_shape", [(1, 4, 8, 8), (2, 4, 12, 12), (2, 4, 16, 16)])
def test_an_untrained_mmsm_leaves_the_sampled_latent_unchanged(loaded, latent_shape):
    model, conditioning = loaded
    options_before = repr(model.model_options)
    plain = sample(model, conditioning, latent_shape)
    with_mmsm = sample(patched(model, prompts=latent_shape[0]), conditioning, latent_shape)
    assert (with_mmsm - plain).abs().max().item() <= 1e-6
    assert repr(model.model_options) == options_before  # the input MODEL has no patch


def test_the_patch_fires_at_output_block_0_only_and_a_trained_mmsm_changes_the_output(loaded):
    model, conditioning = loaded
    seen, fired = [], []

    def spy(h, hsp, transformer_options):  # a second output-block patch: every block the host offers
        seen.append((transformer_options["block"], h.shape[1]))
        return h, hsp

    model_with_mmsm = patched(model, decoder_std=0.1, on_fire=fired.append)
    model_with_mmsm.set_model_output_block_patch(spy)
    steps = 2
    result = sample(model_with_mmsm, conditioning, steps=steps)
    offered = {block for block, _ in seen}
    assert {("output", i) for i in range(9)} == offered  # SDXL's 9 output blocks, each offered per call
    # one batched cond+uncond UNet call per euler step, and MMSM ran once per call at the mid-block output
    assert fired == [("output", 0)] * steps
    assert {channels for block, channels in seen if block == ("output", 0)} == {64}
    assert (result - sample(model, conditioning, steps=steps)).abs().max().item() > 1e-4
