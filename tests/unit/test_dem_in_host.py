"""A-STAR guidance and layered embeddings on the tiny SDXL, inside the real host's code run in-process:
its checkpoint loader, its ModelPatcher and its samplers (comfy.sample.sample, as KSampler calls it)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.pack import import_pack_module  # noqa: E402
from mmig_core import layered_embeddings as layered  # noqa: E402

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
LATENT = (1, 4, 8, 8)  # 64x64 px: the quarter-side layers are 2x2
PROMPT = "a photo of a cat and a dog"
# The tiny SDXL's cross-attention sits at levels 1 and 2; level 2 (a quarter of the latent's side,
# SDXL's 32x32 at 1024 px) holds input blocks 7-8, the middle block and output blocks 0-2.
QUARTER_SIDE_BLOCKS = {("input", 7), ("input", 8), ("middle", 0), ("output", 0), ("output", 1), ("output", 2)}


@pytest.fixture(scope="module")
def guidance_module(load_tiny_sdxl_in_host):
    """nodes/_guidance.py of the pack imported as the host imports it (after the host is importable)."""
    return import_pack_module("nodes._guidance")


def concepts_from_clip(*args):
    return import_pack_module("nodes._guidance").concepts_from_clip(*args)


def guided_model(model, settings):
    return import_pack_module("nodes._guidance").guided_model(model, settings)


def AStarSettings(*args, **kwargs):
    return import_pack_module("nodes._guidance").AStarSettings(*args, **kwargs)


@pytest.fixture(scope="module")
def loaded(load_tiny_sdxl_in_host, guidance_module):
    model, clip, vae, _ = load_tiny_sdxl_in_host(output_vae=True, output_clip=True)
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
        neg, neg_pooled = clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)
    conditioning = ([[cond, {"pooled_output": pooled}]], [[neg, {"pooled_output": neg_pooled}]])
    return model, clip, conditioning


def _sample(model, conditioning, sampler="euler", steps=3):
    import comfy.sample

    positive, negative = conditioning
    latent = torch.zeros(LATENT)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed=0)
        return comfy.sample.sample(model, noise, steps, 5.0, sampler, "normal", positive, negative, latent,
                                   seed=0, disable_pbar=True)


def _settings(clip, concepts="cat, dog", **kwargs):
    positions, words = concepts_from_clip(clip, PROMPT, concepts, "")
    return AStarSettings(positions, words, **kwargs)


def test_concept_words_resolve_through_the_clip(loaded):
    _, clip, _ = loaded
    positions, words = concepts_from_clip(clip, PROMPT, "cat, dog", "")
    assert positions == [[5], [8]] and words == list(range(1, 9))  # "a photo of a cat and a dog"
    assert concepts_from_clip(clip, PROMPT, "", "5, 8") == (positions, words)
    with pytest.raises(ValueError, match="'horse' is not in the prompt.*5:cat"):
        concepts_from_clip(clip, PROMPT, "cat, horse", "")
    with pytest.raises(ValueError, match="No concept given"):
        concepts_from_clip(clip, PROMPT, " , ", "")


def test_capture_fires_on_the_quarter_side_layers_only(loaded):
    model, clip, conditioning = loaded
    guided, guidance = guided_model(model, _settings(clip, guided_steps=2))
    _sample(guided, conditioning, steps=3)
    # two guided steps, cond and uncond in one batched call each: one capture per layer per step
    assert guidance.capture_calls == {block: 2 for block in QUARTER_SIDE_BLOCKS}
    [records] = guidance.all_records()
    assert [(r.step, r.updated) for r in records] == [(0, True), (1, True)]
    assert records[0].retention is None and records[1].retention is not None


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_guidance_moves_the_latent_with_each_sampler(loaded, sampler):
    model, clip, conditioning = loaded
    plain = _sample(model, conditioning, sampler, steps=2)
    guided, guidance = guided_model(model, _settings(clip, guided_steps=2, scale_factor=200.0))
    result = _sample(guided, conditioning, sampler, steps=2)
    assert torch.isfinite(result).all()
    assert (result - plain).abs().max() > 1e-4
    assert [r.updated for r in guidance.all_records()[-1]] == [True, True]


def test_the_given_model_is_not_changed(loaded):
    model, clip, conditioning = loaded
    options_before = repr(model.model_options)
    before = _sample(model, conditioning)
    guided, _ = guided_model(model, _settings(clip))
    _sample(guided, conditioning)
    assert repr(model.model_options) == options_before and model.object_patches == {}
    assert torch.equal(_sample(model, conditioning), before)


def test_a_nan_step_is_skipped_and_never_written(loaded):
    model, clip, conditioning = loaded
    guided, guidance = guided_model(model, _settings(clip, guided_steps=2, scale_factor=float("inf")))
    result = _sample(guided, conditioning)
    assert torch.isfinite(result).all()
    assert not any(r.updated for r in guidance.all_records()[-1])
    assert any("NaN/Inf" in w for w in guidance.warnings)


def test_one_concept_skips_segregation_with_a_warning(loaded):
    model, clip, conditioning = loaded
    guided, guidance = guided_model(model, _settings(clip, "cat", guided_steps=2))
    assert torch.isfinite(_sample(guided, conditioning)).all()
    assert any("fewer than two concepts" in w for w in guidance.warnings)
    assert [r.segregation for r in guidance.all_records()[-1]] == [0.0, 0.0]


def test_layered_embeddings_lower_the_masked_loss(loaded):
    model, clip, conditioning = loaded
    import comfy.model_management

    with torch.inference_mode():
        fg, fg_pooled = clip.encode_from_tokens(clip.tokenize("a red cat"), return_pooled=True)
        bg, bg_pooled = clip.encode_from_tokens(clip.tokenize("a green meadow"), return_pooled=True)
        comfy.model_management.load_models_gpu([model])
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(LATENT, generator=gen)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    result, extra = layered.optimise_for_model(
        model.model, torch.device("cpu"), latent, layered.latent_mask(mask, latent.shape),
        (fg, {"pooled_output": fg_pooled}), (bg, {"pooled_output": bg_pooled}),
        steps=8, learning_rate=0.05, alpha=0.7, seed=0)
    assert result.probe_after < result.probe_before
    assert torch.equal(result.e_opt, 0.7 * result.e_a + 0.3 * result.e_b)
    assert torch.allclose(extra["pooled_output"], 0.7 * fg_pooled + 0.3 * bg_pooled)
    assert not torch.equal(result.e_a, fg) and result.e_a.shape == fg.shape


def _counting(model):
    """A clone whose UNet calls are counted by a wrapper set before the guidance's (which chains it)."""
    calls = []
    counted = model.clone()

    def wrapper(apply_model, args):
        calls.append(len(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])
    counted.set_model_unet_function_wrapper(wrapper)
    return counted, calls


@pytest.mark.parametrize("reuse", [False, True])
def test_a_star_predicts_again_on_the_moved_latent_unless_told_to_reuse(loaded, reuse):
    model, clip, conditioning = loaded
    counted, calls = _counting(model)
    guided, guidance = guided_model(counted, _settings(clip, guided_steps=2, scale_factor=200.0,
                                                       reuse_prediction=reuse))
    result = _sample(guided, conditioning, "ddim", steps=3)
    assert torch.isfinite(result).all()
    # each guided step: one pass with gradients, plus (unless reused) one on the moved latent; then one plain step
    assert len(calls) == (3 if reuse else 5)
    assert [r.updated for r in guidance.all_records()[-1]] == [True, True]


def test_the_fresh_and_the_reused_prediction_differ(loaded):
    model, clip, conditioning = loaded
    fresh = _sample(guided_model(model, _settings(clip, guided_steps=2, scale_factor=200.0))[0], conditioning, "ddim")
    reused = _sample(guided_model(model, _settings(clip, guided_steps=2, scale_factor=200.0, reuse_prediction=True))[0],
                     conditioning, "ddim")
    assert (fresh - reused).abs().max() > 1e-5


def test_normalise_maps_off_changes_the_losses(loaded):
    model, clip, conditioning = loaded
    runs = []
    for normalise in (True, False):
        guided, guidance = guided_model(model, _settings(clip, guided_steps=1, scale_factor=0.0,
                                                         normalise_maps=normalise))
        _sample(guided, conditioning, steps=1)
        runs.append(guidance.all_records()[-1][0].segregation)
    assert runs[0] != pytest.approx(runs[1])


def test_attend_and_excite_mode_refines_at_step_0_and_moves_the_latent(loaded):
    model, clip, conditioning = loaded
    plain = _sample(model, conditioning, "ddim", steps=2)
    guided, guidance = guided_model(model, _settings(clip, mode="attend_and_excite", guided_steps=2,
                                                     max_refine_iters=3))
    result = _sample(guided, conditioning, "ddim", steps=2)
    assert torch.isfinite(result).all() and (result - plain).abs().max() > 1e-4
    first, second = guidance.all_records()[-1]
    # A&E's refinement steps are 0, 10, 20; the tiny SDXL's near-uniform maps never reach 0.05, so the cap stops it
    assert first.refine_iters == 3 and second.refine_iters == 0
    assert 0 < first.attend_excite <= 1 and first.updated and second.updated


def test_attend_and_excite_thresholds_must_pair_with_steps(loaded):
    _, clip, _ = loaded
    with pytest.raises(ValueError, match="one refine_threshold per refine_at_steps"):
        _settings(clip, mode="attend_and_excite", refine_at_steps=(0, 5), refine_thresholds=(0.5,))
    with pytest.raises(ValueError, match="mode must be one of a_star, attend_and_excite"):
        _settings(clip, mode="attend")


def test_an_uncond_batch_run_apart_sees_the_moved_latent(guidance_module):
    # The host may run cond and uncond as separate UNet calls (cond first); the uncond prediction must
    # then be made on the moved latent too. A one-layer stand-in UNet: x's 2x2 pixels attend to 4 keys.
    g = guidance_module
    seen = []
    context = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))

    def apply_model(x, sigma, **c):
        seen.append(x.detach().clone())
        q = x.reshape(x.shape[0], 4, 4).transpose(1, 2) * 3
        k = c["c_crossattn"].expand(x.shape[0], -1, -1)
        out = guidance.attention_replace(q, k, k, {"n_heads": 1, "block": ("input", 1), "original_shape": x.shape})
        return out.transpose(1, 2).reshape(x.shape)

    settings = g.AStarSettings([[1], [2]], [1, 2, 3], guided_steps=1, scale_factor=50.0)
    guidance = g.AStarGuidance(settings, torch.nn.Module(), lambda s: torch.ones(s.shape[0], 1, 1, 1), lambda s: 0.0)
    x, sigma = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1)), torch.tensor([5.0])
    args = {"input": x, "timestep": sigma, "c": {"c_crossattn": context, "transformer_options": {}}}
    guidance.unet_wrapper(apply_model, {**args, "cond_or_uncond": [g.COND]})
    fresh_cond_input = seen[-1]
    guidance.unet_wrapper(apply_model, {**args, "cond_or_uncond": [1]})
    assert guidance.all_records()[-1][0].updated
    assert not torch.allclose(fresh_cond_input, x) and torch.equal(seen[-1], fresh_cond_input)
    before = x.clone()
    guidance.post_cfg({"denoised": torch.zeros_like(x), "input": x, "sigma": sigma})
    assert torch.allclose(x, fresh_cond_input) and not torch.equal(x, before)  # the sampler's latent moved


def _guided_sigmas(guidance):
    return [round(r.sigma, 4) for r in guidance.all_records()[-1] if r.updated]


def test_start_and_end_percent_limit_the_guided_steps_by_noise_level(loaded):
    model, clip, conditioning = loaded
    steps = 4
    sampling = model.model.model_sampling
    full, guidance = guided_model(model, _settings(clip, guided_steps=steps))
    _sample(full, conditioning, steps=steps)
    sigmas = _guided_sigmas(guidance)  # every step's noise level, highest first
    assert len(sigmas) == steps and sigmas == sorted(sigmas, reverse=True)
    start, end = 0.3, 0.8
    high, low = sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)
    window, guidance = guided_model(model, _settings(clip, guided_steps=steps, start_percent=start, end_percent=end))
    _sample(window, conditioning, steps=steps)
    expected = [s for s in sigmas if low <= s <= high]
    assert expected and len(expected) < steps and _guided_sigmas(guidance) == expected
    # guided_steps still caps the count inside the window: only the window's first step here.
    capped, guidance = guided_model(model, _settings(clip, guided_steps=2, start_percent=start, end_percent=end))
    _sample(capped, conditioning, steps=steps)
    assert _guided_sigmas(guidance) == [s for s in expected if s in sigmas[:2]]


def test_percents_out_of_order_are_refused(loaded):
    _, clip, _ = loaded
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        _settings(clip, start_percent=0.6, end_percent=0.4)
    with pytest.raises(ValueError, match="end_percent <= 1"):
        _settings(clip, end_percent=1.5)


def test_a_dit_without_unet_cross_attention_is_refused_clearly(loaded, guidance_module):
    model, clip, _ = loaded

    class DoubleStreamBlock(torch.nn.Module):  # a DiT block: joint attention, no attn2 cross-attention
        def __init__(self):
            super().__init__()
            self.img_attn = torch.nn.Linear(4, 4)

    class Flux(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = torch.nn.ModuleList([DoubleStreamBlock()])

    class FakeBase:
        diffusion_model = Flux()

    class FakePatcher:
        model = FakeBase()

        def clone(self):
            raise AssertionError("the model must be refused before it is cloned")

    with pytest.raises(ValueError, match=r"needs a UNet with text cross-attention.*not a UNet.*Flux.*DiT"):
        guidance_module.guided_model(FakePatcher(), _settings(clip))


def test_an_interrupt_stops_refinement_between_unet_passes(loaded):
    model, clip, conditioning = loaded

    class Cancelled(Exception):  # the host's InterruptProcessingException is a plain Exception too
        pass

    calls = []

    def check_interrupt():
        calls.append(1)
        if len(calls) == 2:  # the refinement's second UNet pass of step 0
            raise Cancelled()

    settings = _settings(clip, guided_steps=1, refine_at_steps=(0,), max_refine_iters=10)
    guided, guidance = import_pack_module("nodes._guidance").guided_model(model, settings, check_interrupt)
    with pytest.raises(Cancelled):
        _sample(guided, conditioning, steps=2)
    assert len(calls) == 2  # checked before each guided pass of the refinement, and sampling ended there


def test_guidance_runs_through_an_mmsm_patch_made_under_inference_mode(loaded, tiny_models):
    # mmig_full: MMSM Apply's patch (module and LLM embedding made under the host's inference mode) sits on the
    # MODEL that A-STAR guides; its gradient pass must go through it, not skip the step.
    from mmig_core.mmsm import OutputBlockPatch, load_mmsm
    model, clip, conditioning = loaded
    with torch.inference_mode():
        mmsm = load_mmsm(tiny_models / "mmig" / "mmig-tiny-mmsm.safetensors")
        text = torch.randn(1, 6, mmsm.config.text_dim, generator=torch.Generator().manual_seed(0))
    fired = []
    patched = model.clone()
    patched.set_model_output_block_patch(OutputBlockPatch(mmsm, text, None, 1.0, on_fire=fired.append))
    plain = _sample(patched, conditioning, "ddim", steps=2)
    guided, guidance = guided_model(patched, _settings(clip, guided_steps=2, scale_factor=200.0))
    result = _sample(guided, conditioning, "ddim", steps=2)
    assert [r.updated for r in guidance.all_records()[-1]] == [True, True] and guidance.warnings == []
    assert (result - plain).abs().max() > 1e-4 and len(fired) > 4  # the patch ran in the guided passes too


class _InferenceScale:
    """An output-block patch of another pack holding a tensor made under inference mode: autograd cannot save it."""

    def __init__(self):
        with torch.inference_mode():
            self.scale = torch.full((1,), 1.0)

    def __deepcopy__(self, memo):  # shared by the host's clones, as MMSM's patch is (a deep copy is no inference tensor)
        return self

    def __call__(self, h, hsp, transformer_options):
        return h * self.scale, hsp


def test_a_patch_autograd_cannot_go_through_is_an_error_naming_it(loaded):
    model, clip, conditioning = loaded
    patched = model.clone()
    patched.set_model_output_block_patch(_InferenceScale())
    guided, guidance = guided_model(patched, _settings(clip, guided_steps=2))
    with pytest.raises(RuntimeError, match=r"at step 0: Inference tensors.*output_block_patch: _InferenceScale.*"
                                           r"bypass A-STAR") as caught:
        _sample(guided, conditioning)
    assert "Inference tensors" in str(caught.value.__cause__)
    assert guidance.all_records() == []
