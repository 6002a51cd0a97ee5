"""MMIG's diffusion editing model (DEM, §3.3): A-STAR attention guidance (Eqs. 19-20) and
LayerDiffusion's layered fg/bg embeddings (Eqs. 15-18), as nodes that drop into any SDXL/SD1.x graph."""
from __future__ import annotations

from . import _host
from ..mmig_core import astar, layered_embeddings as layered
from ..mmig_core.astar_guidance import AStarSettings, concepts_from_clip, guided_model, parse_int_list

AE = "Attend-and-Excite's default (A-STAR publishes none)"


class MMIG_AStarGuidance:
    DESCRIPTION = ("A-STAR test-time attention guidance (MMIG Eqs. 19-20): during the first steps it reads the "
                   "concepts' cross-attention maps (layers at a quarter of the latent's side: 16x16 for SD1.x at "
                   "512 px, 32x32 for SDXL at 1024 px), pushes the concepts' maps apart (segregation L_AS) and keeps "
                   "each concept's map alive from step to step (retention L_AR) by moving the latent: "
                   "z <- z - alpha_t grad(L_AS + L_AR). Works with KSampler and SamplerCustom; the MODEL given is "
                   "not changed.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with A-STAR guidance: use it in KSampler or SamplerCustom with the positive "
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
                                        "tooltip": "Comma-separated words of the prompt to keep apart and alive, "
                                                   "e.g. 'cat, dog'. Two or more for segregation."}),
                "guided_steps": ("INT", {"default": astar.ATTEND_EXCITE_GUIDED_STEPS, "min": 0, "max": 1000,
                                         "tooltip": f"Guide the first K sampler steps. 25 is {AE}: the first 25 "
                                                    f"of 50 steps."}),
                "scale_factor": ("FLOAT", {"default": astar.ATTEND_EXCITE_SCALE_FACTOR, "min": 0.0, "max": 1000.0,
                                           "step": 0.5,
                                           "tooltip": f"Step size alpha_t = scale * sqrt(linspace(1, 0.5, T)); 20 is "
                                                      f"{AE}. 0 measures the losses without guiding."}),
                "threshold": ("FLOAT", {"default": astar.BINARISE_THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.05,
                                        "tooltip": "Binarisation of the previous step's map into the retention proxy "
                                                   f"B_t (fraction of its maximum); 0.5 is {AE}."}),
            },
            "optional": {
                "token_indices": ("STRING", {"default": "",
                                             "tooltip": "Explicit token positions instead of words, e.g. '2,5' "
                                                        "(0 is the start token). Overrides concepts."}),
                "refine_at_steps": ("STRING", {"default": "",
                                               "tooltip": "Steps with iterative refinement, e.g. '0,10,20' as in "
                                                          "Attend-and-Excite: repeat the update until the loss stops "
                                                          "falling. Empty: one update per step."}),
                "max_refine_iters": ("INT", {"default": 20, "min": 1, "max": 100,
                                             "tooltip": f"Most updates at a refinement step; 20 is {AE}."}),
                "smoothing_sigma": ("FLOAT", {"default": astar.ATTEND_EXCITE_SMOOTHING[1], "min": 0.0, "max": 5.0,
                                              "step": 0.05,
                                              "tooltip": f"Gaussian smoothing of the maps (3x3 kernel); 0.5 is {AE}."}),
            },
        }

    def patch(self, model, clip, prompt, concepts, guided_steps, scale_factor, threshold, token_indices="",
              refine_at_steps="", max_refine_iters=20, smoothing_sigma=astar.ATTEND_EXCITE_SMOOTHING[1]):
        positions, words = concepts_from_clip(clip, prompt, concepts, token_indices)
        settings = AStarSettings(positions, words, guided_steps=guided_steps, scale_factor=scale_factor,
                                 threshold=threshold, smoothing=(3, smoothing_sigma),
                                 refine_at_steps=parse_int_list(refine_at_steps, "refine_at_steps"),
                                 max_refine_iters=max_refine_iters)
        return (guided_model(model, settings)[0],)


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
