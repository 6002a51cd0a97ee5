"""MMIG A-STAR Guidance in mode attend_and_excite against Attend-and-Excite.

- Side by side with diffusers' StableDiffusionAttendAndExcitePipeline (installed library, run here): the
  same tiny SD1.x UNet weights (devtools/tiny_sd15.py: read by the host's checkpoint loader, and turned
  into a UNet2DConditionModel by diffusers' own single-file converter), the same prompt embeddings (random
  [1, 77, 768] tensors passed to the pipeline as prompt_embeds / negative_prompt_embeds and to the host
  as CONDITIONING), the same token indices, the same starting latent, DDIM on both sides. The host runs
  the pack's guided MODEL through comfy.sample.sample, what KSampler runs, with its `ddim` sampler (an
  Euler step of the probability-flow ODE, which deterministic DDIM is) and `ddim_uniform` scheduler,
  whose sigmas sit exactly at the pipeline's timesteps (DDIM, "leading" spacing, steps_offset 1). The
  pipeline's DDIM gets set_alpha_to_one=True so that its last step lands on sigma 0 as the host's does.
  The pinned host does not tell the model the sampler's sigmas (hosts since mid-2024 pass
  transformer_options["sample_sigmas"]); the test sets them as those hosts do, so that A&E's step size
  schedule, indexed by sampler step, is exact.
- Against the original yuval-alaluf/Attend-and-Excite code: its defaults and its maps/loss on fixed
  inputs (fixtures in attend_and_excite/, written by `python -m devtools.conformance attend_and_excite`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mmig_core import astar  # noqa: E402

FIXTURES = Path(__file__).parent / "attend_and_excite"
STEPS, CFG = 3, 7.5
LATENT = (1, 4, 16, 16)      # 128 px: the guided layers (a quarter of the latent's side) are 4x4
TOKENS = [2, 5]              # A&E's token_indices (0 is the start token)
RELATIVE_TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def sd15(tiny_models):
    from devtools import tiny_sdxl
    from devtools.tiny_models import TINY_SD15
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import comfy.sd
    import devtools.tiny_host_support  # noqa: F401  (teaches the host the tiny SD1.x)

    path = tiny_models / TINY_SD15
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False,
                                                      embedding_directory=None)[0]
    return model, path


def shared_inputs():
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 77, 768, generator=gen)
    negative = torch.randn(1, 77, 768, generator=gen)
    z_start = torch.randn(LATENT, generator=gen)
    return embeds, negative, z_start


def run_pipeline(path, embeds, negative, z_start, **kwargs):
    from diffusers import DDIMScheduler, StableDiffusionAttendAndExcitePipeline
    from devtools.tiny_sd15 import diffusers_unet

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionAttendAndExcitePipeline(vae=None, text_encoder=None, tokenizer=None,
                                                  unet=diffusers_unet(path), scheduler=scheduler,
                                                  safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    h, w = LATENT[-2] * 8, LATENT[-1] * 8
    out = pipe(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative, token_indices=TOKENS,
               height=h, width=w, num_inference_steps=STEPS, guidance_scale=CFG, latents=z_start.clone(),
               attn_res=(LATENT[-2] // 4, LATENT[-1] // 4), output_type="latent", **kwargs)
    return out.images, scheduler.timesteps


def run_host(model, embeds, negative, z_start, **settings):
    import comfy.sample
    import comfy.samplers

    from devtools.pack import import_pack_module
    guidance_module = import_pack_module("nodes._guidance")
    guided, guidance = guidance_module.guided_model(model, guidance_module.AStarSettings(
        [[p] for p in TOKENS], [], mode="attend_and_excite", **settings))
    if hasattr(comfy.samplers, "calculate_sigmas_scheduler"):  # the pinned host
        sigmas = comfy.samplers.calculate_sigmas_scheduler(model.model, "ddim_uniform", STEPS)
    else:  # newer hosts
        sigmas = comfy.samplers.calculate_sigmas(model.model.model_sampling, "ddim_uniform", STEPS)
    # The pinned host does not pass the sampler's sigmas to the model; newer hosts set these same ones themselves.
    guided.model_options["transformer_options"]["sample_sigmas"] = sigmas
    sampling = model.model.model_sampling
    s0 = float(1 / (1 + sigmas[0] ** 2) ** 0.5)  # z = s x
    noise = z_start / (float(sigmas[0]) * s0)    # the host starts at x = noise * sigma_0, i.e. z = z_start
    with torch.inference_mode():
        out = comfy.sample.sample(guided, noise, STEPS, CFG, "ddim", "ddim_uniform", [[embeds, {}]],
                                  [[negative, {}]], torch.zeros(LATENT), seed=0, disable_pbar=True)
    timesteps = [int(sampling.timestep(s.reshape(1))) for s in sigmas[:-1]]
    return out * model.model.latent_format.scale_factor, timesteps, guidance  # back to z (the SD1.x scale)


def test_the_tiny_sd15_is_an_sd1_checkpoint_to_the_host_and_to_diffusers(sd15):
    import comfy.supported_models

    from devtools.tiny_sd15 import diffusers_unet
    model, path = sd15
    config = model.model.model_config
    assert isinstance(config, comfy.supported_models.SD15) and getattr(config, "MMIG_TINY_SD15", False)
    assert config.unet_config["context_dim"] == 768 and config.unet_config["use_linear_in_transformer"] is False
    unet = model.model.diffusion_model
    assert [len(unet.input_blocks), len(unet.output_blocks)] == [12, 12]  # SD1.x's block layout
    assert astar.capture_blocks(unet) == [("input", 7), ("input", 8), ("output", 3), ("output", 4), ("output", 5)]
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(LATENT, generator=gen), torch.randn(1, 77, 768, generator=gen)
    with torch.inference_mode(False), torch.no_grad():
        theirs = diffusers_unet(path)(x, torch.tensor([500]), encoder_hidden_states=context).sample
        ours = unet(x, timesteps=torch.tensor([500.0]), context=context)
    difference = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"tiny SD1.x UNet, host vs diffusers on the same weights: relative max difference {difference:.2e}")
    assert difference < 1e-4


def test_final_latents_match_diffusers_attend_and_excite(sd15):
    """Three DDIM steps, A&E at the first two (max_iter_to_alter 2), iterative refinement at step 0 with
    A&E's own first threshold (0.05) and at step 2, past max_iter_to_alter, where A&E refines too (the
    threshold 0.0135 there is chosen so that the tiny model stops after a few iterations)."""
    model, path = sd15
    embeds, negative, z_start = shared_inputs()
    with torch.inference_mode(False):
        theirs, their_timesteps = run_pipeline(path, embeds, negative, z_start, max_iter_to_alter=2,
                                               thresholds={0: 0.05, 2: 0.0135})
    ours, our_timesteps, guidance = run_host(model, embeds, negative, z_start, guided_steps=2,
                                             refine_at_steps=(0, 2), refine_thresholds=(0.05, 0.0135))
    assert our_timesteps == their_timesteps.tolist()
    first, second, third = guidance.all_records()[-1]
    assert first.refine_iters > 1 and second.refine_iters == 0 and third.refine_iters > 0  # refinement ran
    assert first.updated and second.updated and third.updated
    plain, _, _ = run_host(model, embeds, negative, z_start, scale_factor=0.0)
    relative = float((ours - theirs).abs().max() / theirs.abs().max())
    moved = float((plain - theirs).abs().max() / theirs.abs().max())
    print(f"attend_and_excite vs diffusers: relative max difference {relative:.2e} (guidance moves it {moved:.2e}); "
          f"refinement iterations {[r.refine_iters for r in (first, second, third)]}")
    assert moved > 50 * RELATIVE_TOLERANCE  # guidance changes the result far beyond the tolerance
    assert relative < RELATIVE_TOLERANCE


def test_the_packs_defaults_are_attend_and_excites():
    reference = json.loads((FIXTURES / "defaults.json").read_text())
    assert astar.ATTEND_EXCITE_GUIDED_STEPS == reference["max_iter_to_alter"]
    assert astar.ATTEND_EXCITE_SCALE_FACTOR == reference["scale_factor"]
    assert {str(k): v for k, v in astar.ATTEND_EXCITE_THRESHOLDS.items()} == reference["thresholds"]
    assert astar.ATTEND_EXCITE_MAX_REFINE_ITERS == reference["max_refinement_steps"]
    assert astar.ATTEND_EXCITE_SMOOTHING == (reference["kernel_size"], reference["sigma"])
    assert reference["scale_range"] == [1.0, 0.5]  # the linspace(1, 0.5, T) of attend_excite_step_size
    # diffusers' pipeline has the same defaults
    import inspect

    from diffusers import StableDiffusionAttendAndExcitePipeline
    params = inspect.signature(StableDiffusionAttendAndExcitePipeline.__call__).parameters
    assert params["max_iter_to_alter"].default == reference["max_iter_to_alter"]
    assert params["scale_factor"].default == reference["scale_factor"]
    assert {str(k): v for k, v in params["thresholds"].default.items()} == reference["thresholds"]


def test_maps_loss_and_kernel_match_the_original_code():
    from safetensors.torch import load_file

    ref = load_file(str(FIXTURES / "maps.safetensors"))
    assert torch.allclose(astar.gaussian_kernel(3, 0.5), ref["kernel"], atol=1e-7)
    probs = ref["probs"]  # [layers, heads, 16, 77]
    layers, heads = probs.shape[:2]
    head_sums = [layer.sum(dim=0)[None] for layer in probs]  # what the guided sampler records per layer
    maps = astar.attend_excite_maps(head_sums, layers * heads, (4, 4), ref["indices"].tolist())
    assert torch.allclose(maps.amax(dim=(-2, -1))[0], ref["maxima"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(astar.attend_excite_loss(maps), ref["loss"], rtol=1e-5, atol=1e-7)
    # the order matters: a softmax per layer, then the average, is something else
    per_layer = torch.stack([torch.softmax(100 * layer.mean(0)[..., 1:-1], -1) for layer in probs]).mean(0)
    picked = per_layer[:, [i - 1 for i in ref["indices"].tolist()]].T.reshape(1, -1, 4, 4)
    assert not torch.allclose(astar.gaussian_smooth(picked).amax(dim=(-2, -1))[0], ref["maxima"], atol=1e-3)
