"""Quality part `layered`: Layered Embeddings (MMIG Eqs. 15-16) as an attribute edit, against plain img2img.

On evaluation scenes 1_000_000 + i (never trained on), one object is to be recoloured to a colour the scene does
not have. Both methods start from the source latent (the world VAE's encoding of the scene) and sample img2img at
the same denoise, steps, cfg, sampler and seed; they differ only in the positive conditioning:
- `layered`: MMIG Layered Embeddings as the node runs it (`mmig_core.layered_embeddings.optimise_for_model`, alpha
  0.7; 20 steps at learning rate 2.5e-3 instead of the node's 50 at 1e-3, for time): foreground prompt
  "a <new colour> <shape>", background prompt "a <background> background", mask = the object's mask dilated
  by 3 px; its blended e_opt is the positive prompt, as in workflows/mmig_dem_edit;
- `img2img`: the edited scene's caption, encoded by the checkpoint's CLIP, as a plain img2img edit is written.
Figures (rates over the seeds, side by side):
- `<method>_edit_success_rate`: the scorer (`devtools.world.score.detect`) finds an object of the new colour and the
  object's shape whose centre lies inside the mask;
- `<method>_colour_in_mask_rate`: the new colour's object inside the mask, any shape;
- `<method>_background_psnr_db`: mean masked PSNR (dB) against the source outside the dilated mask (preserved
  background; higher is better), and `<method>_background_psnr_median_db`.
The checkpoint: MMIG_WORLD_SDXL (a single-file SDXL checkpoint path) if set, else the world checkpoint
(`devtools.world.train_sdxl.world_checkpoint()`); without one the part records "skipped: no world checkpoint".
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

EVAL_SEED_BASE = 1_000_000
DENOISE, STEPS, CFG, SAMPLER, SCHEDULER = 0.75, 10, 5.0, "euler", "normal"  # mmig_dem_edit's denoise
# The node's defaults are 50 steps at 1e-3; 20 steps at 2.5e-3 move Adam's embeddings as far for 40 % of the cost
# (one UNet forward + backward per step is most of this part's time on 2 shared cores).
LAYERED_STEPS, LAYERED_LR, ALPHA = 20, 2.5e-3, 0.7
MASK_DILATION = 3


def world_checkpoint() -> tuple[Path | None, str | None]:
    """(path, None) of the SDXL checkpoint to score, or (None, the reason it is skipped)."""
    configured = os.environ.get("MMIG_WORLD_SDXL")
    if configured:
        path = Path(configured)
        return (path, None) if path.is_file() else (None, f"skipped: no world checkpoint (MMIG_WORLD_SDXL={path} "
                                                           f"is not a file)")
    try:
        from devtools.world import train_sdxl
    except ImportError:
        return None, "skipped: no world checkpoint (devtools/world/train_sdxl.py is not in this checkout)"
    weights = getattr(train_sdxl, "WEIGHTS_FILE", None)
    if weights is None or not Path(weights).is_file():
        return None, f"skipped: no world checkpoint ({weights} is missing: run python -m devtools.world.train_sdxl)"
    return Path(train_sdxl.world_checkpoint()), None


def load_checkpoint(path: Path):
    """(model, clip, vae) through the host's own single-file loader (what Load Checkpoint runs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from devtools import tiny_sdxl
    tiny_sdxl.import_host()
    import comfy.sd
    import devtools.tiny_host_support  # noqa: F401  (registers the tiny SDXL config the world checkpoint uses)

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                                    embedding_directory=None)
    return model, clip, vae


def encode_text(clip, text: str):
    import torch
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def edit_task(index: int):
    """(scene, edited scene, object index, new colour) for eval scene i: one object, a colour not in the scene."""
    import dataclasses

    from devtools.world import COLOURS, Scene, sample_scene
    seed = EVAL_SEED_BASE + index
    scene = sample_scene(seed)
    rng = random.Random(seed)
    j = rng.randrange(len(scene.objects))
    new_colour = rng.choice(sorted(set(COLOURS) - {o.colour for o in scene.objects}))
    objects = list(scene.objects)
    objects[j] = dataclasses.replace(objects[j], colour=new_colour)
    return scene, Scene(tuple(objects), scene.background, scene.background2, seed), j, new_colour


def img2img(model, latent, positive, negative, seed: int):
    import torch
    import comfy.sample
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, STEPS, CFG, SAMPLER, SCHEDULER, positive, negative, latent,
                                   denoise=DENOISE, seed=seed, disable_pbar=True)


def decode(vae, samples) -> np.ndarray:
    import torch
    with torch.inference_mode():
        image = vae.decode(samples)[0]
    return (image.float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def layered_positive(model, latent, mask, foreground, background, seed: int):
    """The blended conditioning MMIG Layered Embeddings outputs (the node's own call, its defaults)."""
    import torch
    import comfy.model_management
    from mmig_core import layered_embeddings as layered
    comfy.model_management.load_models_gpu([model])
    m = layered.latent_mask(torch.from_numpy(mask.astype(np.float32))[None], latent.shape)
    (fg, fg_extra), (bg, bg_extra) = foreground[0], background[0]
    result, extra = layered.optimise_for_model(
        model.model, comfy.model_management.get_torch_device(), latent, m, (fg, dict(fg_extra)),
        (bg, dict(bg_extra)), steps=LAYERED_STEPS, learning_rate=LAYERED_LR, alpha=ALPHA, seed=seed)
    return [[result.e_opt.to(fg.dtype), extra]]


def edit_succeeded(image: np.ndarray, mask: np.ndarray, colour: str, shape: str | None) -> bool:
    from devtools.world.score import detect
    for d in detect(image):
        inside = mask[min(127, max(0, int(d.cy))), min(127, max(0, int(d.cx)))]
        if inside and d.colour == colour and (shape is None or d.shape == shape):
            return True
    return False


def run(n_seeds: int):
    path, reason = world_checkpoint()
    if path is None:
        return {"skipped": reason, "n_seeds": 0}, []
    import torch
    import torch.nn.functional as F

    from devtools.world import object_phrase, render
    from devtools.world import caption as world_caption
    from devtools.world.score import masked_psnr

    torch.set_num_threads(1)
    model, clip, vae = load_checkpoint(path)
    negative = encode_text(clip, "")
    rates = {m: {"edit": [], "colour": [], "psnr": []} for m in ("layered", "img2img")}
    samples = []
    for i in range(n_seeds):
        scene, edited, j, colour = edit_task(i)
        image, masks = render(scene)
        obj_mask = torch.from_numpy(masks[j].astype(np.float32))
        mask = F.max_pool2d(obj_mask[None, None], 2 * MASK_DILATION + 1, stride=1, padding=MASK_DILATION)[0, 0]
        mask = mask.numpy() > 0.5
        with torch.inference_mode():
            latent = vae.encode(torch.from_numpy(image.astype(np.float32) / 255)[None])
        latent = latent.clone()
        ground = f"a {scene.background} background"
        positives = {
            "layered": layered_positive(model, latent, mask, encode_text(clip, object_phrase(edited.objects[j])),
                                        encode_text(clip, ground), seed=i),
            "img2img": encode_text(clip, world_caption(edited)),
        }
        for name, positive in positives.items():
            out = decode(vae, img2img(model, latent, positive, negative, seed=i))
            rates[name]["edit"].append(edit_succeeded(out, mask, colour, scene.objects[j].shape))
            rates[name]["colour"].append(edit_succeeded(out, mask, colour, None))
            rates[name]["psnr"].append(masked_psnr(out, image, ~mask))
            if i < 2:
                samples.append((f"{EVAL_SEED_BASE + i} {name}: {colour} {scene.objects[j].shape}", out))
        if i < 2:
            samples.append((f"{EVAL_SEED_BASE + i} source", image))
    figures = {"n_seeds": n_seeds, "checkpoint": path.name, "denoise": DENOISE, "steps": STEPS, "cfg": CFG,
               "layered_steps": LAYERED_STEPS, "layered_learning_rate": LAYERED_LR, "alpha": ALPHA}
    for name, r in rates.items():
        finite = [p for p in r["psnr"] if np.isfinite(p)]
        figures[f"{name}_edit_success_rate"] = float(np.mean(r["edit"]))
        figures[f"{name}_colour_in_mask_rate"] = float(np.mean(r["colour"]))
        figures[f"{name}_background_psnr_db"] = float(np.mean(finite)) if finite else float("inf")
        figures[f"{name}_background_psnr_median_db"] = float(np.median(r["psnr"]))
    return figures, samples
