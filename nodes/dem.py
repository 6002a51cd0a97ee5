"""MMIG's diffusion editing model (DEM, §3.3): A-STAR attention guidance (Eqs. 19-20; Attend-and-Excite as a
mode) and LayerDiffusion's layered fg/bg embeddings (Eqs. 15-18), as nodes that drop into any SDXL/SD1.x graph."""
from __future__ import annotations

from . import _host
from ._guidance import A_STAR, MODES, AStarSettings, concepts_from_clip, guided_model, parse_float_list, parse_int_list
from ..mmig_core import astar, layered_embeddings as layered

AE = "Attend-and-Excite's default"


class MMIG_AStarGuidance:
    DESCRIPTION = ("Test-time attention guidance during the first steps, by moving the latent along the gradient of "
                   "a loss on the concepts' cross-attention maps (the layers at a quarter of the latent's side: "
                   "16x16 for SD1.x at 512 px, 32x32 for SDXL at 1024 px), then predicting again on the moved "
                   "latent. mode a_star (MMIG Eqs. 19-20, A-STAR): pushes the concepts' maps apart (segregation "
                   "L_AS) and keeps each concept's map alive from step to step (retention L_AR). mode "
                   "attend_and_excite: Attend-and-Excite as diffusers' pipeline computes it (each concept token's "
                   "strongest attention pushed up, iterative refinement at steps 0, 10 and 20). Works with KSampler "
                   "and SamplerCustom; the MODEL given is not changed.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with attention guidance: use it in KSampler or SamplerCustom with the positive "
                       "prompt below.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to guide (SDXL or SD1.x). It is cloned, not changed."}),
                "clip": ("CLIP", {"tooltip": "The CLIP the positive prompt was encoded with: it finds the concepts' "
                                             "token positions."}),
                "prompt": ("STRING", {"multiline": True, "default": "a cat and a dog",
                                      "tooltip": "The positive prompt exactly as encoded for the sampler."}),
                "concepts": ("STRING", {"default": "cat, dog",
                                        "tooltip": "Comma-separated words of the prompt to guide, e.g. 'cat, dog'. "
                                                   "a_star: two or more for segregation. attend_and_excite: each "
                                                   "token of each word is excited on its own."}),
                "guided_steps": ("INT", {"default": astar.ATTEND_EXCITE_GUIDED_STEPS, "min": 0, "max": 1000,
                                         "tooltip": f"Update the latent at the first K sampler steps (A&E's "
                                                    f"max_iter_to_alter). 25 is {AE} (the first 25 of 50 steps); "
                                                    f"A-STAR publishes none."}),
                "scale_factor": ("FLOAT", {"default": astar.ATTEND_EXCITE_SCALE_FACTOR, "min": 0.0, "max": 1000.0,
                                           "step": 0.5,
                                           "tooltip": f"Step size alpha_i = scale * sqrt(linspace(1, 0.5, steps)[i]) "
                                                      f"for sampler step i; 20 is {AE}, A-STAR publishes none. "
                                                      f"0 measures the losses without guiding."}),
                "threshold": ("FLOAT", {"default": astar.BINARISE_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.05,
                                        "tooltip": "a_star: the previous step's map is binarised above this fraction "
                                                   "of its maximum into the retention proxy B_t. 0.5 is the pack's "
                                                   "choice (A-STAR publishes none, A&E has no such step). Unused by "
                                                   "attend_and_excite."}),
            },
            "optional": {
                "token_indices": ("STRING", {"default": "",
                                             "tooltip": "Explicit token positions instead of words, e.g. '2,5' "
                                                        "(0 is the start token, as A&E's token_indices). Overrides "
                                                        "concepts."}),
                "refine_at_steps": ("STRING", {"default": "",
                                               "tooltip": "Steps with iterative refinement. attend_and_excite: empty "
                                                          "means A&E's 0,10,20 (with refine_thresholds). a_star: "
                                                          "e.g. '0,10,20' repeats the update while the loss falls "
                                                          "(the pack's rule; A-STAR publishes none); empty: one "
                                                          "update per step."}),
                "max_refine_iters": ("INT", {"default": astar.ATTEND_EXCITE_MAX_REFINE_ITERS, "min": 1, "max": 100,
                                             "tooltip": f"Most updates at a refinement step; 20 is {AE}."}),
                "smoothing_sigma": ("FLOAT", {"default": astar.ATTEND_EXCITE_SMOOTHING[1], "min": 0.0, "max": 5.0,
                                              "step": 0.05,
                                              "tooltip": f"Gaussian smoothing of the maps, A&E's 3x3 kernel "
                                                         f"exp(-((x - mu) / (2 sigma))^2); 0.5 is {AE}."}),
                "mode": (list(MODES), {"default": A_STAR,
                                       "tooltip": "a_star: MMIG's A-STAR losses (Eqs. 19-20). attend_and_excite: "
                                                  "Attend-and-Excite exactly as diffusers' pipeline (its maps, loss, "
                                                  "refinement and step sizes; threshold, normalise_maps and "
                                                  "reuse_prediction do not apply)."}),
                "refine_thresholds": ("STRING", {"default": "",
                                                 "tooltip": "attend_and_excite: one threshold per refine_at_steps "
                                                            "step; refinement runs until every token's maximum "
                                                            "reaches it. Empty with empty refine_at_steps: A&E's "
                                                            "0.05,0.5,0.8 at steps 0,10,20."}),
                "normalise_maps": ("BOOLEAN", {"default": True,
                                               "tooltip": "a_star: divide each concept's map by its maximum before "
                                                          "L_AS and L_AR, so weak and strong concepts weigh alike. "
                                                          "The pack's own step: Eqs. 19-20 use the maps as they are."}),
                "reuse_prediction": ("BOOLEAN", {"default": False,
                                                 "tooltip": "a_star: reuse the noise prediction of the gradient pass "
                                                            "after moving the latent: one UNet forward less per "
                                                            "guided step, but not the paper's method. Off: predict "
                                                            "again on the moved latent, as A-STAR and A&E do."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Guide from this fraction of the sampling schedule on (0 = "
                                                       "the first step), read off the noise level as the host's "
                                                       "ControlNet start/end do. Together with guided_steps: a step "
                                                       "is guided when both allow it. The papers guide from 0."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Guide up to this fraction of the schedule (1 = the last "
                                                     "step); guided_steps still caps the count."}),
            },
        }

    def patch(self, model, clip, prompt, concepts, guided_steps, scale_factor, threshold, token_indices="",
              refine_at_steps="", max_refine_iters=astar.ATTEND_EXCITE_MAX_REFINE_ITERS,
              smoothing_sigma=astar.ATTEND_EXCITE_SMOOTHING[1], mode=A_STAR, refine_thresholds="",
              normalise_maps=True, reuse_prediction=False, start_percent=0.0, end_percent=1.0):
        positions, words = concepts_from_clip(clip, prompt, concepts, token_indices)
        settings = AStarSettings(positions, words, guided_steps=guided_steps, scale_factor=scale_factor,
                                 threshold=threshold, smoothing=(3, smoothing_sigma),
                                 refine_at_steps=parse_int_list(refine_at_steps, "refine_at_steps"),
                                 max_refine_iters=max_refine_iters, mode=mode,
                                 refine_thresholds=parse_float_list(refine_thresholds, "refine_thresholds"),
                                 normalise_maps=normalise_maps, reuse_prediction=reuse_prediction,
                                 start_percent=start_percent, end_percent=end_percent)
        return (guided_model(model, settings, check_interrupt=_host.throw_if_interrupted)[0],)


class MMIG_LayeredEmbeddings:
    DESCRIPTION = ("LayerDiffusion's layered embeddings (MMIG Eqs. 15-18): optimises a foreground (object "
                   "attributes) and a background text embedding so that, together, they reconstruct the source "
                   "image inside the mask (masked noise-prediction loss), then blends them: "
                   "e_opt = alpha * e_a + (1 - alpha) * e_b. With a reference latent and mask it also adds "
                   "L_fg and L_bg to put the source's object on the reference's background.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("blended", "foreground", "background")
    OUTPUT_TOOLTIPS = ("e_opt = alpha * foreground + (1 - alpha) * background (Eq. 16): the positive prompt for editing.",
                       "The optimised foreground embedding e_a.",
                       "The optimised background embedding e_b.")
    FUNCTION = "optimise"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model whose noise prediction the embeddings are fitted to."}),
                "latent": ("LATENT", {"tooltip": "The VAE-encoded source image (VAE Encode)."}),
                "mask": ("MASK", {"tooltip": "The object's mask M, at the source image's size (or its latent's)."}),
                "foreground": ("CONDITIONING", {"tooltip": "The object-attribute prompt, encoded: the start of e_a."}),
                "background": ("CONDITIONING", {"tooltip": "The background prompt, encoded with the same CLIP: "
                                                           "the start of e_b."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 2000,
                                  "tooltip": "Optimisation steps; each draws a fresh noise and timestep."}),
                "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-6, "max": 1.0, "step": 1e-4,
                                            "tooltip": "Adam's learning rate on the two embeddings."}),
                "alpha": ("FLOAT", {"default": layered.DEFAULT_ALPHA, "min": 0.0, "max": 1.0, "step": 0.05,
                                    "tooltip": "Weight of the foreground in the blend (Eq. 16); MMIG uses 0.7."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the noise and timesteps drawn during the optimisation."}),
            },
            "optional": {
                "reference_latent": ("LATENT", {"tooltip": "Optional: the image whose background to keep "
                                                           "(L_bg, Eq. 18). Same size as the latent."}),
                "reference_mask": ("MASK", {"tooltip": "The reference image's object mask M_r; its background "
                                                       "1 - M_r is kept. Needed with reference_latent."}),
            },
        }

    def optimise(self, model, latent, mask, foreground, background, steps, learning_rate, alpha, seed,
                 reference_latent=None, reference_mask=None):
        samples = latent["samples"]
        m = layered.latent_mask(mask, samples.shape, "mask")
        reference = None
        if (reference_latent is None) != (reference_mask is None):
            raise layered.LayeredInputError("Connect both reference_latent and reference_mask, or neither.")
        if reference_latent is not None:
            ref = reference_latent["samples"]
            if ref.shape != samples.shape:
                raise layered.LayeredInputError(f"reference_latent is {tuple(ref.shape)} but the latent is "
                                                f"{tuple(samples.shape)}: encode images of the same size.")
            reference = (ref, layered.latent_mask(reference_mask, ref.shape, "reference_mask"))
        (fg, fg_extra), (bg, bg_extra) = _first(foreground, "foreground"), _first(background, "background")
        layered.blend(fg, bg, alpha)  # the shape check, before any work

        _host.load_to_device(model)
        progress = _host.progress_bar(steps)
        result, blended_extra = layered.optimise_for_model(
            model.model, _host.torch_device(), samples, m, (fg, fg_extra), (bg, bg_extra), steps=steps,
            learning_rate=learning_rate, alpha=alpha, seed=seed, reference=reference,
            on_step=lambda _i: progress.update(1), check_interrupt=_host.throw_if_interrupted)
        dtype = fg.dtype
        return ([[result.e_opt.to(dtype), blended_extra]], [[result.e_a.to(dtype), fg_extra]],
                [[result.e_b.to(dtype), bg_extra]])


def _first(conditioning, what):
    if not conditioning:
        raise layered.LayeredInputError(f"The {what} CONDITIONING is empty: connect a CLIP Text Encode.")
    cond, extra = conditioning[0]
    return cond, dict(extra)


NODE_CLASS_MAPPINGS = {
    "MMIG_AStarGuidance": MMIG_AStarGuidance,
    "MMIG_LayeredEmbeddings": MMIG_LayeredEmbeddings,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMIG_AStarGuidance": "MMIG A-STAR Guidance",
    "MMIG_LayeredEmbeddings": "MMIG Layered Embeddings (LayerDiffusion)",
}
