"""LLMGA's instruction editing (§3.1): Direct Inversion (Ju et al., ICLR 2024) + prompt-to-prompt (Hertz et al. 2022)
on a real image, as two nodes. The algorithm is mmig_core/p2p.py; the host glue is nodes/_editing.py."""
from __future__ import annotations

import torch

from . import _editing as host_editing, _host
from ..mmig_core import p2p
from ..mmig_core.p2p import EditError

PNP = "PnPInversion's default (cure-lab/PnPInversion run_editing_p2p.py)"


class MMIG_DirectInversion:
    DESCRIPTION = ("DDIM inversion of a real image's latent with its source prompt (no CFG), as Direct Inversion "
                   "(PnPInversion) does before editing: DDIM's 'leading' timesteps of the model's own noise schedule, "
                   "the latent taken at timestep 0's level (set_alpha_to_one=False). Feed the inversion to MMIG "
                   "Prompt-to-Prompt with the same MODEL and source CONDITIONING. The MODEL is not changed.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MMIG_INVERSION", "LATENT")
    RETURN_NAMES = ("inversion", "noisy_latent")
    OUTPUT_TOOLTIPS = ("The trajectory z*_0 .. z*_T, its schedule and the model it was made with.",
                       "z*_T, the inverted noise (the start of the edit).")
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD1.x or SDXL (eps or v prediction). The same MODEL goes to MMIG "
                                           "Prompt-to-Prompt."}),
            "latent": ("LATENT", {"tooltip": "The real image, VAE-encoded (one image)."}),
            "source": ("CONDITIONING", {"tooltip": "The source prompt (a description of the image), encoded. Of a "
                                                   "longer prompt the first 77-token chunk is used (PnPInversion "
                                                   "truncates to 77 tokens too)."}),
            "steps": ("INT", {"default": p2p.DDIM_STEPS, "min": 2, "max": 1000,
                              "tooltip": f"DDIM steps; 50 is {PNP} and the paper's. The edit runs the same steps."}),
        }}

    def invert(self, model, latent, source, steps):
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[0] != 1:
            raise EditError(f"MMIG Direct Inversion inverts one image: the latent is {list(samples.shape)}; "
                            f"give a batch of 1 (e.g. Latent From Batch).")
        schedule = p2p.Schedule.from_sigmas(host_editing.all_sigmas(model), steps)
        cond, _ = host_editing.first(source, "source")
        _host.load_to_device(model)
        device = _host.torch_device()
        progress = _host.progress_bar(steps)
        with torch.no_grad():
            z0 = model.model.process_latent_in(samples.float().to(device))
            inputs = host_editing.model_inputs(model, source, "source", z0, device)
            eps = host_editing.eps_function(model, inputs, dict(model.model_options.get("transformer_options", {})),
                                            device)
            trajectory = p2p.invert(z0, schedule, eps, on_step=lambda _i: progress.update(1),
                                    check_interrupt=_host.throw_if_interrupted)
            noisy = model.model.process_latent_out(trajectory[-1]).cpu()
        inversion = host_editing.Inversion([z.cpu() for z in trajectory], schedule, host_editing.sampling_type(model),
                                           host_editing.model_key(model), host_editing.fingerprint(cond),
                                           tuple(samples.shape))
        return inversion, {"samples": noisy}


class MMIG_PromptToPrompt:
    DESCRIPTION = ("Prompt-to-prompt editing of an inverted real image (LLMGA's editing, PnPInversion's "
                   "'directinversion+p2p'): CFG sampling of the [source, target] pair from z*_T, the source branch "
                   "held on the inversion's trajectory (Direct Inversion: it reconstructs the input exactly), the "
                   "target taking the source's attention: cross-attention replaced (replace: same token count) or "
                   "aligned (refine) for the first cross_replace_steps, self-attention copied for the first "
                   "self_replace_steps, optional per-word reweighting and LocalBlend. Runs its own DDIM on the "
                   "model's schedule (the only sampler the inversion is exact with); the MODEL's attention and "
                   "transformer patches apply, its model/CFG wrappers from other nodes do not. The MODEL is not "
                   "changed.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("edited", "source_reconstruction")
    OUTPUT_TOOLTIPS = ("The edited image's latent (VAE Decode it).",
                       "The source branch's result: the input latent again, for checking.")
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL the inversion was made with. It is cloned with attention "
                                               "patches, not changed."}),
                "inversion": ("MMIG_INVERSION", {"tooltip": "From MMIG Direct Inversion."}),
                "source": ("CONDITIONING", {"tooltip": "The source prompt, encoded: the one given to MMIG Direct "
                                                       "Inversion."}),
                "target": ("CONDITIONING", {"tooltip": "The target prompt (the edited image's description), encoded."}),
                "clip": ("CLIP", {"tooltip": "The CLIP both prompts were encoded with: aligns their tokens."}),
                "source_prompt": ("STRING", {"multiline": True, "default": "a photo of a cat",
                                             "tooltip": "The source prompt's text, exactly as encoded. Of a longer "
                                                        "prompt the first 77-token chunk is aligned and used."}),
                "target_prompt": ("STRING", {"multiline": True, "default": "a photo of a dog",
                                             "tooltip": "The target prompt's text, exactly as encoded."}),
                "negative": ("CONDITIONING", {"tooltip": "The unconditional prompt for CFG (PnPInversion uses the "
                                                         "empty prompt)."}),
                "cfg": ("FLOAT", {"default": p2p.GUIDANCE_SCALE, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": f"Classifier-free guidance scale; 7.5 is {PNP}."}),
                "mode": (list(p2p.MODES), {"default": p2p.REFINE,
                                           "tooltip": "replace: the target's cross-attention is the source's, token "
                                                      "for token (prompts of the same token count, e.g. one word "
                                                      "swapped). refine: the source's columns through a token "
                                                      "alignment, new tokens keep their own (any prompts; P2P's "
                                                      "refinement). reweight: as replace or refine, with "
                                                      "reweight_words scaled by reweight_factor."}),
                "cross_replace_steps": ("FLOAT", {"default": p2p.CROSS_REPLACE_STEPS, "min": 0.0, "max": 1.0,
                                                  "step": 0.05,
                                                  "tooltip": f"Fraction of the steps with the cross-attention "
                                                             f"edited (steps < int(f * (steps + 1)), as "
                                                             f"PnPInversion counts); 0.4 is {PNP}."}),
                "self_replace_steps": ("FLOAT", {"default": p2p.SELF_REPLACE_STEPS, "min": 0.0, "max": 1.0,
                                                 "step": 0.05,
                                                 "tooltip": f"Fraction of the steps with the source's self-attention "
                                                            f"copied into the target, on layers at half the "
                                                            f"latent's side or smaller (PnPInversion: at most 32x32 "
                                                            f"at 512 px; the pack keeps the rule relative to the "
                                                            f"size); 0.6 is {PNP}."}),
            },
            "optional": {
                "blend_words": ("STRING", {"default": "",
                                           "tooltip": "LocalBlend: comma-separated words (of either prompt, e.g. "
                                                      "'cat, dog') whose cross-attention marks the region to edit; "
                                                      "outside it the result is the source exactly. Empty: no blend."}),
                "blend_threshold": ("FLOAT", {"default": p2p.BLEND_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.05,
                                              "tooltip": f"LocalBlend's threshold on the maps over their maximum "
                                                         f"(from 20 % of the steps, maps at a quarter of the "
                                                         f"latent's side: 16x16 at SD1.x 512 px); 0.3 is {PNP}."}),
                "reweight_words": ("STRING", {"default": "",
                                              "tooltip": "Comma-separated words of the target prompt whose "
                                                         "cross-attention is scaled by reweight_factor (during the "
                                                         "cross_replace steps, as P2P's AttentionReweight)."}),
                "reweight_factor": ("FLOAT", {"default": p2p.REWEIGHT_FACTOR, "min": -10.0, "max": 10.0, "step": 0.1,
                                              "tooltip": "The factor for reweight_words; 2 is what PnPInversion's "
                                                         "benchmark uses for the edited word."}),
                "target_offset": (["none", "source"], {"default": "none",
                                                       "tooltip": "none: Direct Inversion as published, the offsets "
                                                                  "go to the source branch only. source: the target "
                                                                  "branch gets the source's offsets too (PnPInversion's "
                                                                  "add-source ablation): a target equal to the source "
                                                                  "then gives back the input exactly, at one more "
                                                                  "UNet row per step."}),
                "start_latent": ("LATENT", {"tooltip": "Optional start of the target branch instead of the "
                                                       "inversion's z*_T (e.g. its noisy_latent, edited). Same size "
                                                       "as the inverted latent."}),
            },
        }

    def edit(self, model, inversion, source, target, clip, source_prompt, target_prompt, negative, cfg, mode,
             cross_replace_steps, self_replace_steps, blend_words="", blend_threshold=p2p.BLEND_THRESHOLD,
             reweight_words="", reweight_factor=p2p.REWEIGHT_FACTOR, target_offset="none", start_latent=None):
        result, _ = run_edit(model, inversion, source, target, clip, source_prompt, target_prompt, negative, cfg,
                             mode, cross_replace_steps, self_replace_steps, blend_words, blend_threshold,
                             reweight_words, reweight_factor, target_offset, start_latent)
        return {"samples": result.edited}, {"samples": result.source}


def run_edit(model, inversion, source, target, clip, source_prompt, target_prompt, negative, cfg, mode,
             cross_replace_steps, self_replace_steps, blend_words="", blend_threshold=p2p.BLEND_THRESHOLD,
             reweight_words="", reweight_factor=p2p.REWEIGHT_FACTOR, target_offset="none", start_latent=None):
    """MMIG_PromptToPrompt's work: (p2p.EditResult with the latents in LATENT space on the CPU, the controller)."""
    inv = _check_inversion(model, inversion, source)
    start = None
    if start_latent is not None:
        samples = start_latent["samples"]
        if tuple(samples.shape) != inv.latent_shape:
            raise EditError(f"start_latent is {list(samples.shape)} but the inversion was made from a latent of "
                            f"{list(inv.latent_shape)}: use the inversion's noisy_latent or one of its size.")
        start = samples
    settings = _controller_settings(clip, source, inv, source_prompt, target_prompt, mode, cross_replace_steps,
                                    self_replace_steps, blend_words, blend_threshold, reweight_words,
                                    reweight_factor, model)
    with_offset = target_offset == "source"
    layout = p2p.batch_layout(with_offset)
    controller = p2p.P2PController(settings, (layout.index("cond_source"), layout.index("cond_target")))
    patched = host_editing.patched_model(model, controller)
    _host.load_to_device(patched)
    device = _host.torch_device()
    progress = _host.progress_bar(inv.schedule.steps)
    with torch.no_grad():
        probe = inv.trajectory[0].to(device)
        rows = {"uncond_source": negative, "uncond_target": negative, "cond_source": source, "cond_target": target}
        labels = {"uncond_source": "negative", "uncond_target": "negative", "cond_source": "source",
                  "cond_target": "target"}
        inputs = host_editing.stack_inputs(
            [host_editing.model_inputs(model, rows[name], labels[name], probe, device) for name in layout],
            [labels[name] for name in layout])
        eps = host_editing.eps_function(patched, inputs, patched.model_options["transformer_options"], device)
        z_start = None if start is None else model.model.process_latent_in(start.float().to(device))
        result = p2p.edit([z.to(device) for z in inv.trajectory], inv.schedule, eps, controller, cfg,
                          target_offset=with_offset, start=z_start, on_step=lambda _i: progress.update(1),
                          check_interrupt=_host.throw_if_interrupted)
        result.edited = model.model.process_latent_out(result.edited).cpu()
        result.source = model.model.process_latent_out(result.source).cpu()
    return result, controller


def _check_inversion(model, inversion, source) -> host_editing.Inversion:
    if not isinstance(inversion, host_editing.Inversion):
        raise EditError("inversion must come from MMIG Direct Inversion.")
    if host_editing.model_key(model) != inversion.model_key:
        raise EditError("The inversion was made with another MODEL (or another sampling type): connect the same "
                        "MODEL to MMIG Direct Inversion and MMIG Prompt-to-Prompt, or invert again.")
    expected = p2p.Schedule.from_sigmas(host_editing.all_sigmas(model), inversion.schedule.steps)
    if expected.sigmas != inversion.schedule.sigmas or len(inversion.trajectory) != inversion.schedule.steps + 1:
        raise EditError(f"The inversion's {inversion.schedule.steps}-step schedule is not this model's: invert again "
                        f"with this MODEL.")
    cond, _ = host_editing.first(source, "source")
    if host_editing.fingerprint(cond) != inversion.source_fingerprint:
        raise EditError("The source CONDITIONING differs from the one the inversion was made with: connect the same "
                        "source prompt to both nodes (the source branch must follow its own inversion).")
    return inversion


def _controller_settings(clip, source, inv, source_prompt, target_prompt, mode, cross_replace_steps,
                         self_replace_steps, blend_words, blend_threshold, reweight_words, reweight_factor, model):
    context_tokens = host_editing.first(source, "source")[0].shape[1]
    src_ids, decode = host_editing.prompt_tokens(clip, source_prompt, "source")
    tgt_ids, _ = host_editing.prompt_tokens(clip, target_prompt, "target")
    if mode == p2p.REWEIGHT and not reweight_words.strip():
        raise EditError("mode reweight needs reweight_words: the target prompt's words to scale, e.g. 'fluffy'.")
    mappers = {}
    if mode == p2p.REPLACE or (mode == p2p.REWEIGHT and len(src_ids) == len(tgt_ids)):
        mappers["replace_mapper"] = p2p.replacement_mapper(src_ids, tgt_ids, context_tokens, decode)
    else:
        mappers["refine_mapper"], mappers["refine_alphas"] = p2p.refinement_mapper(src_ids, tgt_ids, context_tokens)
    equalizer = None
    words = host_editing.word_ids(clip, reweight_words)
    if words:
        p2p.resolve_words(words, {"target": tgt_ids}, "reweight", decode)
        equalizer = 1 + (reweight_factor - 1) * p2p.token_mask(tgt_ids, words, context_tokens)
    blend = None
    words = host_editing.word_ids(clip, blend_words)
    if words:
        p2p.resolve_words(words, {"source": src_ids, "target": tgt_ids}, "blend", decode)
        blend = p2p.Blend(p2p.token_mask(src_ids, words, context_tokens), p2p.token_mask(tgt_ids, words, context_tokens),
                          threshold=blend_threshold)
    hw = tuple(inv.latent_shape[-2:])
    return p2p.ControllerSettings(
        steps=inv.schedule.steps, mode=mode, cross_replace_steps=cross_replace_steps,
        self_replace_steps=self_replace_steps, self_max_tokens=host_editing.self_max_tokens(hw), equalizer=equalizer,
        blend=blend, blend_tokens=host_editing.blend_tokens(model.model.diffusion_model, hw), **mappers)


NODE_CLASS_MAPPINGS = {
    "MMIG_DirectInversion": MMIG_DirectInversion,
    "MMIG_PromptToPrompt": MMIG_PromptToPrompt,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMIG_DirectInversion": "MMIG Direct Inversion",
    "MMIG_PromptToPrompt": "MMIG Prompt-to-Prompt (edit)",
}
