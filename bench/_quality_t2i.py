"""Quality part `t2i` of bench/quality.py: the world SDXL checkpoint draws what its caption says, and attention
guidance (A-STAR, Attend-and-Excite) against plain sampling on the SAME seeds and noise.

The checkpoint is devtools/world/weights/sdxl (trained by `python -m devtools.world.train_sdxl`), assembled into the
single file the host's Load Checkpoint reads (`world_checkpoint()`), loaded by the host's own
comfy.sd.load_checkpoint_guess_config (what CheckpointLoaderSimple runs) with devtools/tiny_host_support registering
the tiny SDXL config, prompts encoded by the host's CLIP, sampled by comfy.sample.sample (what KSampler runs: euler,
STEPS steps, CFG, empty negative) and decoded by the host's VAE. Scored by devtools.world.score.

Figures (rates over evaluation seeds 1_000_000 + i, never trained on):
- t2i_*: captions of 1-3 objects (the world's own mix), plain sampling: `all_present` (every object with the right
  colour and shape) and `exact` (and nothing else), plus the per-object means `present` / `colours_present`, and
  `background` (both image halves the caption's background colours); `t2i_empty_prompt_*`: the same noise drawn
  from the empty prompt, scored against the same captions (the control: how often a drawing that never read its
  caption matches it);
  `vae_roundtrip_*`: the true render encoded and decoded by the checkpoint's VAE (the ceiling the decoder allows);
- guidance_*: captions of two and three objects (alternating), each drawn plain, with the pack's guidance node
  maths in mode a_star (MMIG Eqs. 19-20) and in mode attend_and_excite, all from the same noise; each method's
  all-present rate and per-object presence, and the ratios over plain.
- diffusers_*: diffusers' StableDiffusionAttendAndExcitePipeline and its plain StableDiffusionPipeline on the SAME
  UNet weights (converted with the host's key map, bench/_guidance_anchor.diffusers_unet), the host CLIP's
  embeddings as prompt_embeds, the same initial noise, decoded by the same VAE. diffusers has no SDXL
  Attend-and-Excite pipeline, so this runs the SD1.x pipeline around the SDXL UNet with its pooled/size
  conditioning fixed per prompt (what the anchor does); its scheduler is diffusers' Euler, so its plain baseline
  is reported next to it. Null (with the reason) when diffusers cannot run.

- denoiser_*: why the drawings look as they do, from the same weights read by the pack's training code
  (training.sdxl, diffusers' UNet; `denoiser_diagnostics`): `denoiser_text_effect_t<t>` is the RMS difference
  of the epsilon predicted with the true caption and with "" (0 means the UNet ignores the text), and
  `denoiser_x0_error_over_variance_t<t>` the predicted clean latent's MSE over the latents' variance (above 1 the
  prediction is worse than the mean latent: at t 999 that error is what the first sampling step draws), and
  `..._wrong_caption_t<t>` the same error when each latent gets another scene's caption (the gap between the
  two is how much the UNet reads its caption).

Concepts guided: each object's "colour shape" words (colours are unique in a world scene; a shape may repeat);
A&E excites every one of those tokens on its own, A-STAR segregates the objects' maps.
"""
from __future__ import annotations

import os
import time

import numpy as np

STEPS = 12
GUIDED_STEPS = 6  # A&E guides the first half of the schedule (25 of 50)
CFG = 5.0
SAMPLER, SCHEDULER = "euler", "normal"
LATENT = (1, 4, 16, 16)  # 128 px, the world's size
EVAL_SEED_BASE = 1_000_000
GUIDANCE_SEED_BASE = EVAL_SEED_BASE + 500_000  # a second block of evaluation scenes for the multi-object prompts


def load_world_sdxl():
    """(model, clip, vae) of the world checkpoint through the host's own checkpoint loader."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from devtools import tiny_sdxl
    from devtools.world.train_sdxl import world_checkpoint
    tiny_sdxl.import_host()
    import comfy.sd
    import devtools.tiny_host_support  # noqa: F401  (registers the tiny SDXL config)

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(world_checkpoint()), output_vae=True, output_clip=True, embedding_directory=None)
    return model, clip, vae


def encode(clip, text: str):
    import torch
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def initial_noise(seed: int):
    import torch
    import comfy.sample
    return comfy.sample.prepare_noise(torch.zeros(LATENT), seed=seed)


def sample(model, positive, negative, seed: int, steps: int = STEPS, cfg: float = CFG):
    import torch
    import comfy.sample

    latent = torch.zeros(LATENT)
    with torch.inference_mode():
        return comfy.sample.sample(model, initial_noise(seed), steps, cfg, SAMPLER, SCHEDULER, positive, negative,
                                   latent, seed=seed, disable_pbar=True)


def decode(vae, latent) -> np.ndarray:
    import torch
    with torch.inference_mode():
        image = vae.decode(latent)  # [B, H, W, 3] in 0..1
    return (image[0].clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)


def draw(model, clip, vae, text: str, seed: int, negative=None) -> np.ndarray:
    return decode(vae, sample(model, encode(clip, text), negative or encode(clip, ""), seed))


def concepts(scene) -> str:
    return ", ".join(f"{o.colour} {o.shape}" for o in scene.objects)


def guided(model, clip, text: str, scene, mode: str):
    from devtools.pack import import_pack_module
    g = import_pack_module("nodes._guidance")
    positions, words = g.concepts_from_clip(clip, text, concepts(scene), "")
    return g.guided_model(model, g.AStarSettings(positions, words, guided_steps=GUIDED_STEPS, mode=mode))[0]


def _rates(scores: list[dict]) -> dict:
    n = len(scores)
    return {"all_present": round(sum(s["all_present"] for s in scores) / n, 4),
            "exact": round(sum(s["exact"] for s in scores) / n, 4),
            "present": round(sum(s["present"] for s in scores) / n, 4),
            "colours_present": round(sum(s["colours_present"] for s in scores) / n, 4),
            "background": round(sum(s["background"] for s in scores) / n, 4)}


def _ratio(a: float, b: float):
    return None if b == 0 else round(a / b, 3)


class DiffusersAttendExcite:
    """diffusers' A&E pipeline (and its plain pipeline) on the host model's UNet weights; see the module doc."""

    def __init__(self, model):
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionAttendAndExcitePipeline, StableDiffusionPipeline
        from bench._guidance_anchor import diffusers_unet

        with torch.inference_mode(False):
            self.unet = diffusers_unet(model)
        import json
        from devtools.world.train_sdxl import MANIFEST_FILE
        v = json.loads(MANIFEST_FILE.read_text()).get("prediction", "eps") == "v"
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1,
                                           prediction_type="v_prediction" if v else "epsilon")
        parts = dict(vae=None, text_encoder=None, tokenizer=None, unet=self.unet, scheduler=scheduler,
                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.theirs = StableDiffusionAttendAndExcitePipeline(**parts)
        self.plain = StableDiffusionPipeline(**parts)
        for pipe in (self.theirs, self.plain):
            pipe.set_progress_bar_config(disable=True)

    def latents(self, positive, negative, noise, token_indices: list[int] | None):
        import torch
        h, w = LATENT[-2] * 8, LATENT[-1] * 8
        pooled = positive[0][1]["pooled_output"].clone()
        size = torch.tensor([[768.0, 768.0, 0.0, 0.0, 768.0, 768.0]])  # the host's default SDXL size conditioning
        self.unet.added = {"text_embeds": pooled, "time_ids": size}
        common = dict(prompt=None, prompt_embeds=positive[0][0].clone(), negative_prompt_embeds=negative[0][0].clone(),
                      height=h, width=w, num_inference_steps=STEPS, guidance_scale=CFG, output_type="latent",
                      latents=noise.clone())
        with torch.inference_mode(False):
            if token_indices is None:
                with torch.no_grad():
                    out = self.plain(**common)
            else:
                out = self.theirs(token_indices=token_indices, max_iter_to_alter=GUIDED_STEPS,
                                  attn_res=(h // 32, w // 32), **common)
        return out.images.detach()


def denoiser_diagnostics(n_seeds: int, timesteps=(999, 700, 500, 100)) -> dict:
    """The text's effect on the UNet's epsilon and its clean-latent error per timestep (see the module doc)."""
    import torch
    from devtools.world import caption, render, sample_scene
    from devtools.world.train_sdxl import (HOST_ADM_SIZE, encode_closed_form, images_to_tensor, tokenizer_folder,
                                           world_checkpoint)
    from training.sdxl import added_conditioning, load_text_encoders, load_unet, noise_scheduler

    from devtools.world.train_sdxl import MANIFEST_FILE
    import json
    v_prediction = json.loads(MANIFEST_FILE.read_text()).get("prediction", "eps") == "v"
    path = world_checkpoint()
    unet, encoders, scheduler = load_unet(path).float().eval(), load_text_encoders(path, tokenizer_folder()), \
        noise_scheduler()
    scenes = [sample_scene(EVAL_SEED_BASE + i) for i in range(n_seeds)]
    x0 = encode_closed_form(images_to_tensor([render(s)[0] for s in scenes]))
    captions = [caption(s) for s in scenes]
    text, empty = encoders(captions), encoders([""] * n_seeds)
    wrong = encoders(captions[1:] + captions[:1])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    figures = {}
    with torch.no_grad():
        for t in timesteps:
            steps = torch.full((n_seeds,), t)
            noisy, alpha = scheduler.add_noise(x0, noise, steps), scheduler.alphas_cumprod[t]
            eps = {name: unet(noisy, steps, c.context, added_cond_kwargs=added_conditioning(
                c.pooled, HOST_ADM_SIZE, HOST_ADM_SIZE)).sample
                for name, c in (("text", text), ("empty", empty), ("wrong", wrong))}

            def x0_error(out):
                if v_prediction:  # the output is v = sqrt(a) eps - sqrt(1 - a) x0
                    x0_pred = alpha.sqrt() * noisy - (1 - alpha).sqrt() * out
                else:
                    x0_pred = (noisy - (1 - alpha).sqrt() * out) / alpha.sqrt()
                return round(float((x0_pred - x0).pow(2).mean() / x0.var()), 4)
            figures[f"denoiser_text_effect_t{t}"] = round(float((eps["text"] - eps["empty"]).pow(2).mean().sqrt()), 5)
            figures[f"denoiser_x0_error_over_variance_t{t}"] = x0_error(eps["text"])
            figures[f"denoiser_x0_error_over_variance_wrong_caption_t{t}"] = x0_error(eps["wrong"])
    return figures


def run(n_seeds: int) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    import torch
    from devtools.world import caption, render, sample_scene
    from devtools.world.score import score

    torch.set_num_threads(1)
    started = time.perf_counter()
    model, clip, vae = load_world_sdxl()
    negative = encode(clip, "")
    samples: list[tuple[str, np.ndarray]] = []

    # text-to-image on the world's own 1-3 object mix, and the VAE's ceiling on the same scenes
    # the empty prompt on the same noise is the control: how often a drawing matches a caption it never read
    t2i, unprompted, roundtrip, by_count = [], [], [], {1: [], 2: [], 3: []}
    for i in range(n_seeds):
        scene = sample_scene(EVAL_SEED_BASE + i)
        text = caption(scene)
        image = draw(model, clip, vae, text, seed=i, negative=negative)
        result = score(image, text)
        t2i.append(result)
        unprompted.append(score(draw(model, clip, vae, "", seed=i, negative=negative), text))
        by_count[len(scene.objects)].append(result)
        truth = render(scene)[0]
        with torch.inference_mode():
            back = decode(vae, vae.encode(torch.from_numpy(truth.astype(np.float32) / 255.0)[None]))
        roundtrip.append(score(back, text))
        if i < 2:
            samples += [(f"t2i: {text}", image)]
    figures = {f"t2i_{k}": v for k, v in _rates(t2i).items()}
    figures.update({f"t2i_all_present_{n}_objects": _rates(r)["all_present"] for n, r in by_count.items() if r})
    figures.update({f"t2i_empty_prompt_{k}": v for k, v in _rates(unprompted).items()})
    figures.update({f"vae_roundtrip_{k}": v for k, v in _rates(roundtrip).items()})
    figures["t2i_n"] = n_seeds
    figures.update(denoiser_diagnostics(n_seeds))

    # concept neglect: two- and three-object captions, plain vs a_star vs attend_and_excite, same noise
    try:
        theirs = DiffusersAttendExcite(model)
        theirs_error = None
    except Exception as exc:  # diffusers missing or incompatible: say so, keep the pack's figures
        theirs, theirs_error = None, f"{type(exc).__name__}: {exc}"
    from devtools.pack import import_pack_module
    concepts_from_clip = import_pack_module("nodes._guidance").concepts_from_clip
    methods = ("plain", "a_star", "attend_and_excite") + (("diffusers_plain", "diffusers_attend_and_excite")
                                                          if theirs else ())
    scores: dict[str, list[dict]] = {m: [] for m in methods}
    for i in range(n_seeds):
        scene = sample_scene(GUIDANCE_SEED_BASE + i, n_objects=2 + i % 2)
        text = caption(scene)
        positive = encode(clip, text)
        images = {"plain": decode(vae, sample(model, positive, negative, seed=i))}
        for mode in ("a_star", "attend_and_excite"):
            images[mode] = decode(vae, sample(guided(model, clip, text, scene, mode), positive, negative, seed=i))
        if theirs:
            positions, _ = concepts_from_clip(clip, text, concepts(scene), "")
            indices = [p for group in positions for p in group]
            noise = initial_noise(i)
            # diffusers returns the model-space latent; the host's VAE decodes the latent_format's own (unscaled)
            out = model.model.process_latent_out
            images["diffusers_plain"] = decode(vae, out(theirs.latents(positive, negative, noise, None)))
            images["diffusers_attend_and_excite"] = decode(vae, out(theirs.latents(positive, negative, noise,
                                                                                    indices)))
        for m in methods:
            scores[m].append(score(images[m], text))
        if i == 1:  # a three-object prompt
            samples += [("truth: " + text, render(scene)[0])] + [(f"{m}", images[m]) for m in
                                                                   ("plain", "a_star", "attend_and_excite",
                                                                    "diffusers_attend_and_excite") if m in images]
    rates = {m: _rates(s) for m, s in scores.items()}
    for m, r in rates.items():
        figures[f"guidance_{m}_all_present"] = r["all_present"]
        figures[f"guidance_{m}_present"] = r["present"]
    plain = rates["plain"]
    for m in ("a_star", "attend_and_excite"):
        figures[f"guidance_{m}_over_plain_all_present"] = _ratio(rates[m]["all_present"], plain["all_present"])
        figures[f"guidance_{m}_over_plain_present"] = _ratio(rates[m]["present"], plain["present"])
    if theirs:
        dp, da = rates["diffusers_plain"], rates["diffusers_attend_and_excite"]
        figures["guidance_diffusers_attend_and_excite_over_their_plain_present"] = _ratio(da["present"], dp["present"])
        figures["guidance_pack_ae_over_diffusers_ae_present"] = _ratio(rates["attend_and_excite"]["present"],
                                                                       da["present"])
    else:
        figures["guidance_diffusers_attend_and_excite"] = None
        figures["guidance_diffusers_error"] = theirs_error
    figures["guidance_n"] = n_seeds
    figures["t2i_settings"] = (f"{SAMPLER}/{SCHEDULER} {STEPS} steps, cfg {CFG}, guided steps {GUIDED_STEPS}, "
                               f"128 px; eval seeds {EVAL_SEED_BASE}+i (t2i) and {GUIDANCE_SEED_BASE}+i (guidance)")
    figures["t2i_seconds"] = round(time.perf_counter() - started, 1)
    return figures, samples[:8]


if __name__ == "__main__":
    import json
    import sys
    figures, sheet = run(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
    print(json.dumps(figures, indent=1))
