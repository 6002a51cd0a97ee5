"""Train the world's SDXL-architecture checkpoint: the tiny SDXL of devtools/tiny_sdxl.py, taught the scene world.

    python -m devtools.world.train_sdxl [--steps N] [--vae-steps M] [--seed S]

writes devtools/world/weights/sdxl/world_sdxl.safetensors (+ MANIFEST.json). Two stages:

1. VAE (the checkpoint's TAESD first_stage_model, 128 px <-> 16x16x4 latents). The ENCODER is set, not trained:
   TAESD's own layers so weighted that they compute each 8x8 cell's mean colour (three stride-2 2x2 box filters,
   the blocks' residual convs at zero so every ReLU passes non-negative values through), and a fixed 4x3 matrix
   maps it to the 4 latent channels (RGB and luminance, centred, x2.5). Deviation from "train encoder/decoder":
   a TAESD forward+backward costs ~0.75 s per 64 px crop on one of these cores, so a jointly trained autoencoder
   would see a few hundred crops in the time budget; a cell-mean code is exact, cheap to compute in closed form
   for the UNet's training latents (`encode_closed_form`, checked against the TAESD encoder), and a flat-colour
   world loses little in it. The DECODER is trained (MSE on 64 px crops, noisy latents so it tolerates the
   UNet's errors) from an initialisation that already upsamples the cell colours (nearest), so it can only
   improve on a mosaic.
2. UNet (the tiny SDXL's architecture, PyTorch's default init for the seed: `reset_to_default_init`) on
   (latent, caption), v-prediction (`--prediction v`, the file then gets the host's `v_pred` key in
   `world_checkpoint()`), through the pack's training code: training.sdxl.load_unet / load_text_encoders /
   noise_scheduler / add_noise / added_conditioning / denoising_loss, the diffusers UNet exported back to the ldm
   layout with mmig_core.lora's key map. The text encoders are the tiny SDXL's random CLIP-L/G, FROZEN, with the
   real CLIP tokenizer the host uses (comfy/sd1_tokenizer); captions are encoded once for a pool of captions
   (--captions, each drawn with fresh random layouts every time), 10 % are dropped to "" so classifier-free
   guidance works; the micro-conditioning is the host's default (768 x 768, no crop), which CLIP Text Encode
   leaves in place. The exported weights are an EMA of the trained ones.
   What made the UNet follow its text (measured by x0 error at t 999 over the latents' variance on 32 evaluation
   scenes, with the right caption vs a wrong one, after 300 steps): the previous recipe (the tiny SDXL's N(0, 0.02)
   init, 4 captions x 4 layouts a batch; committed as 900 epsilon + 900 v steps) used no text at all (right 0.853 =
   wrong 0.853; its text effect 0.003-0.05 RMS even after 1800 steps). PyTorch's init: 0.888 vs 0.920. Then 16
   distinct captions a batch (--layouts 1): 0.744 vs 0.837; and the text's way in (attn2, add_embedding) at 5x the
   learning rate (--text-lr-scale 5): 0.796 vs 0.985 (the most text reliance, also at t 800: 0.489 vs 0.578).
   That recipe for 1600 steps (256 captions) was the previous committed model. Drawn on 50 evaluation seeds
   (bench/_quality_t2i: euler, 12 steps, cfg 5) and scored against the same noise drawn from "": background
   0.78 vs 0.16, but colours_present 0.30 vs 0.34 -- the objects did not follow the caption at all. The loss is
   a mean over 16x16 latent cells of which the objects cover a few, so the UNet learnt backgrounds. The
   committed model weights the objects' cells up (`--object-weight 4`: 1 + 4 x a cell's object coverage) and
   sees 4096 captions instead of 256, 1500 steps (~18 min beside a second run): background 0.64 vs 0.20,
   colours_present 0.78 vs 0.66 (now above the control), present 0.16 vs 0.19, all_present 0.04 vs 0.08 -- the
   named colours now appear, the named shapes still do not (the empty prompt draws more blobs, so it hits
   more objects by chance). Measured on 32 seeds along the way: object weight 4 with 256 captions, 1389 steps:
   colours_present 0.66, background 0.72; with 4096 captions, 1230 steps: 0.82 / 0.53, and 800 more steps
   (2030): 0.79 / 0.56, so more steps were not kept. --text-lr-scale 2 was worse (colours_present 0.18 at 1400
   steps on the old loss); 2800 steps of the old recipe drew cleaner backgrounds (0.78) but paler blobs (0.19).
   Not kept either: 1500 more steps from the committed UNet at lr 5e-4 with the outline cells weighted up as well
   (`--resume-steps 1500 --lr 0.0005 --edge-weight 8`), on 30 evaluation seeds against the committed model:
   present 0.11 vs 0.17, colours_present 0.80 vs 0.79, background 0.73 vs 0.63, and the demo's masked recolour
   (denoise 0.75, the box of MASK_MARGIN) made 11 vs 9 of 30 -- no shapes gained, so the 32-channel UNet's
   capacity, not the loss, looks like the limit.

The committed file holds the UNet and the VAE only (fp16, ~16 MB): the two frozen random text encoders are two full
49408-token embedding tables, ~200 MB, far over the 40 MB budget, and they are exactly the tiny SDXL's of the
recorded seed. `world_checkpoint()` assembles the full single-file checkpoint the host's Load Checkpoint reads
(UNet + VAE from the committed file, text encoders rebuilt by devtools.tiny_sdxl for the seed) in
.cache/world/, checked against the sha256 the manifest records. The host reads it once devtools/tiny_host_support
has registered the tiny SDXL config (a test-only custom node; the architecture is unchanged, so no second config).

Deterministic for a seed on one thread (torch.set_num_threads(1)). Training scenes come from seeds 0..99_999
(relayouts of them); evaluation seeds are 1_000_000 + i.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from devtools import tiny_sdxl
from devtools.paths import CACHE_DIR, REPO_ROOT, host_dir
from devtools.world import SIZE, Scene, WorldObject, caption, render, sample_scene
from devtools.world import MAX_SIZE, MIN_SIZE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "sdxl"
WEIGHTS_FILE = WEIGHTS_DIR / "world_sdxl.safetensors"
MANIFEST_FILE = WEIGHTS_DIR / "MANIFEST.json"
WORK_DIR = CACHE_DIR / "world"
LATENT_SCALE = 2.5
# latent channel j = LATENT_SCALE * sum_c LATENT_MIX[j][c] * (rgb_c - 0.5): R, G, B and luminance
LATENT_MIX = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1 / 3, 1 / 3, 1 / 3))
HOST_ADM_SIZE = 768  # the host's SDXL encode_adm default width/height when the conditioning names none
CFG_DROPOUT = 0.1
TRAIN_SEEDS = 100_000
EVAL_SEED_BASE = 1_000_000


def tokenizer_folder() -> Path:
    return host_dir() / "comfy" / "sd1_tokenizer"


# --- the world's training scenes -------------------------------------------------------------------------------

def relayout(scene: Scene, rng: random.Random) -> Scene:
    """The same objects (caption order = left to right) and background at fresh sizes and positions."""
    placed: list[tuple[float, float, float]] = []
    for _ in scene.objects:
        for _ in range(200):
            size = rng.uniform(MIN_SIZE, MAX_SIZE)
            half = size / 2 + 2
            cx, cy = rng.uniform(half, SIZE - half), rng.uniform(half, SIZE - half)
            if all(math.hypot(cx - x, cy - y) > (size + s) / 2 * 1.2 + 4 for x, y, s in placed):
                break
        else:
            size, cx, cy = MIN_SIZE, rng.uniform(20, SIZE - 20), rng.uniform(20, SIZE - 20)
        placed.append((cx, cy, size))
    placed.sort()
    objects = tuple(WorldObject(o.shape, o.colour, round(cx, 2), round(cy, 2), round(size, 2))
                    for o, (cx, cy, size) in zip(scene.objects, placed))
    return Scene(objects, scene.background, scene.background2, scene.seed)


def caption_pool(n_captions: int) -> list[Scene]:
    """One scene per distinct caption, from training seeds 0, 1, 2, ... until `n_captions` captions are found."""
    scenes: dict[str, Scene] = {}
    for seed in range(TRAIN_SEEDS):
        scene = sample_scene(seed)
        scenes.setdefault(caption(scene), scene)
        if len(scenes) == n_captions:
            break
    return list(scenes.values())


# --- the VAE --------------------------------------------------------------------------------------------------

def _mix() -> torch.Tensor:
    return torch.tensor(LATENT_MIX, dtype=torch.float32) * LATENT_SCALE  # [4, 3]


def encode_closed_form(images: torch.Tensor) -> torch.Tensor:
    """What the set TAESD encoder computes: images [B, 3, H, W] in 0..1 -> latents [B, 4, H/8, W/8]."""
    cells = F.avg_pool2d(images, 8)
    return torch.einsum("jc,bchw->bjhw", _mix(), cells - 0.5)


def images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def set_encoder(encoder: torch.nn.Sequential) -> None:
    """Weight TAESD's encoder (taesd.Encoder layout) so it computes `encode_closed_form`."""
    for p in encoder.parameters():
        p.zero_()
    first, down, last = encoder[0], (encoder[2], encoder[6], encoder[10]), encoder[14]
    for c in range(3):
        first.weight[c, c, 1, 1] = 1.0
        for conv in down:  # padding 1: kernel taps 1, 2 read input rows 2o, 2o+1 -> a 2x2 box, stride 2
            conv.weight[c, c, 1:3, 1:3] = 0.25
    mix = _mix()
    last.weight[:, :3, 1, 1] = mix
    last.bias.copy_(-0.5 * mix.sum(1))


@torch.no_grad()
def init_decoder(decoder: torch.nn.Sequential, gen: torch.Generator) -> None:
    """A decoder that starts as a nearest-neighbour upsampler of the cell colours, with trainable residual blocks
    (first two convs random, last at zero, so each block starts as the identity on non-negative inputs)."""
    first, ups, last = decoder[1], (decoder[7], decoder[12], decoder[17]), decoder[19]
    for module in decoder.modules():
        if hasattr(module, "conv") and isinstance(module.conv, torch.nn.Sequential):  # a taesd Block
            c1, c2, c3 = module.conv[0], module.conv[2], module.conv[4]
            for conv in (c1, c2):
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in) * 0.5)
                conv.bias.zero_()
            c3.weight.zero_()
            c3.bias.zero_()
    first.weight.zero_()
    first.bias.zero_()
    first.weight[3:] = torch.randn(first.weight[3:].shape, generator=gen) * 0.3
    first.bias[3:] = 0.1
    inverse = torch.linalg.pinv(_mix())  # [3, 4]: latents -> rgb - 0.5
    first.weight[:3, :, 1, 1] = inverse
    first.bias[:3] = 0.5
    for conv in ups:
        conv.weight.zero_()
        for c in range(conv.weight.shape[0]):
            conv.weight[c, c, 1, 1] = 1.0
    last.weight.zero_()
    last.bias.zero_()
    for c in range(3):
        last.weight[c, c, 1, 1] = 1.0


def build_taesd(seed: int):
    tiny_sdxl.import_host()
    from comfy.taesd.taesd import TAESD
    vae = TAESD()
    set_encoder(vae.taesd_encoder)
    init_decoder(vae.taesd_decoder, torch.Generator().manual_seed(zlib.crc32(f"{seed}:world-vae".encode())))
    with torch.no_grad():
        vae.vae_scale.fill_(tiny_sdxl.TAESDXL_VAE_SCALE)
        if hasattr(vae, "vae_shift"):
            vae.vae_shift.fill_(0.0)
    return vae


VALIDATION_SEEDS = range(90_000, 90_024)  # training-range scenes held out of the decoder's crops, for keeping its best


def validate_decoder(decoder) -> tuple[float, float]:
    """(all-present rate, MSE) of the world renders round-tripped through the cell-mean code and `decoder`."""
    from devtools.world.score import score
    hits, errors = 0, []
    for seed in VALIDATION_SEEDS:
        scene = sample_scene(seed)
        x = images_to_tensor([render(scene)[0]])
        with torch.no_grad():
            y = decoder(encode_closed_form(x)).clamp(0, 1)
        errors.append(F.mse_loss(y, x).item())
        hits += score((y[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), scene)["all_present"]
    return hits / len(VALIDATION_SEEDS), float(np.mean(errors))


def train_vae(seed: int, steps: int, log, batch: int = 6, crop: int = 64, lr: float = 2e-4, warmup: int = 20,
              validate_every: int = 50):
    vae = build_taesd(seed)
    # the set encoder is what encode_closed_form says it is
    probe = images_to_tensor([render(sample_scene(s))[0] for s in (0, 1)])
    with torch.no_grad():
        diff = (vae.taesd_encoder(probe) - encode_closed_form(probe)).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"the TAESD encoder does not compute the cell means (max diff {diff})")
    decoder = vae.taesd_decoder
    params = [p for p in decoder.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    rng = random.Random(seed * 7919 + 1)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    loss_value = float("nan")
    best = (*validate_decoder(decoder), 0)
    best_state = {k: v.clone() for k, v in decoder.state_dict().items()}
    log(f"vae validation at step 0: all-present {best[0]:.3f}, mse {best[1]:.5f}")
    for step in range(steps):
        crops = []
        for _ in range(batch):
            train_seed = rng.randrange(TRAIN_SEEDS)
            while train_seed in VALIDATION_SEEDS:
                train_seed = rng.randrange(TRAIN_SEEDS)
            image = render(sample_scene(train_seed))[0]
            y, x = rng.randrange(0, SIZE - crop + 1, 8), rng.randrange(0, SIZE - crop + 1, 8)
            crops.append(image[y:y + crop, x:x + crop])
        target = images_to_tensor(crops)
        latents = encode_closed_form(target)
        latents = latents + 0.05 * torch.randn(latents.shape, generator=gen)
        out = decoder(latents)
        loss = F.mse_loss(out, target)
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"] * min(1.0, (step + 1) / warmup)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_value = loss.item()
        if step % 10 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss_value:.5f} ({time.perf_counter() - start:.0f} s)")
        if (step + 1) % validate_every == 0 or step == steps - 1:
            rate, error = validate_decoder(decoder)
            log(f"vae validation at step {step + 1}: all-present {rate:.3f}, mse {error:.5f}")
            if (rate, -error) > (best[0], -best[1]):
                best = (rate, error, step + 1)
                best_state = {k: v.clone() for k, v in decoder.state_dict().items()}
    decoder.load_state_dict(best_state)
    log(f"vae: keeping the decoder of step {best[2]} (validation all-present {best[0]:.3f}, mse {best[1]:.5f})")
    return vae, best[1], time.perf_counter() - start, best[2]


def vae_state_dict(vae) -> dict[str, torch.Tensor]:
    return {tiny_sdxl.VAE_PREFIX + k: v.detach().float().contiguous() for k, v in vae.state_dict().items()}


# --- the UNet -------------------------------------------------------------------------------------------------

def init_checkpoint(seed: int) -> Path:
    """The tiny SDXL of `seed` (random UNet + VAE + the frozen text encoders), built once into .cache/world/."""
    path = WORK_DIR / f"tiny_sdxl_seed{seed}.safetensors"
    if not path.is_file():
        tiny_sdxl.build_tiny_sdxl(path, seed=seed)
    return path


def diffusers_unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from mmig_core.lora import diffusers_to_ldm_module
    out = {}
    for key, value in state.items():
        module, kind = key.rsplit(".", 1)
        ldm = diffusers_to_ldm_module(module)
        if ldm is None:
            raise KeyError(f"no ldm name for the diffusers UNet tensor {key}")
        out[tiny_sdxl.UNET_PREFIX + f"{ldm}.{kind}"] = value.detach().float().contiguous()
    return out


class SharedContextAttention:
    """Cross-attention (diffusers processor) whose context rows are the batch's DISTINCT captions: keys and values
    are computed once per caption and gathered per sample by `rows` (the same maths as a full [B, 77, 2048] context,
    several times cheaper: the 2048-wide key/value projections dominate this tiny UNet's cost)."""

    def __init__(self):
        self.rows: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(encoder_hidden_states)[self.rows], attn.to_v(encoder_hidden_states)[self.rows]
        heads = attn.heads
        width = query.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, width).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, heads * width)
        return attn.to_out[1](attn.to_out[0](out))


def share_context(unet) -> SharedContextAttention:
    processor = SharedContextAttention()
    processors = {name: (processor if ".attn2." in name else proc) for name, proc in unet.attn_processors.items()}
    unet.set_attn_processor(processors)
    return processor


@torch.no_grad()
def encode_captions(encoders, captions: list[str], batch: int = 32):
    contexts, pooled = [], []
    for i in range(0, len(captions), batch):
        cond = encoders(captions[i:i + batch])
        contexts.append(cond.context.half())
        pooled.append(cond.pooled.half())
    return torch.cat(contexts), torch.cat(pooled)


@torch.no_grad()
def reset_to_default_init(unet, seed: int) -> None:
    """PyTorch's own initialisation of every layer (what a diffusers UNet built from its config gets), seeded.

    Why not the tiny SDXL's N(0, 0.02): that init is for tests, and it starves the text. With 64 channels, each
    0.02-std layer scales its input by ~0.16, and the text reaches the output only through several of them (the
    pooled vector: add_embedding's two layers, then each ResBlock's time projection; the context: attn2's value
    and output, then the block's proj_out). Trained from it, 300 steps left the text effect at 0.0002 RMS on a
    0.38 RMS output, the same as untrained."""
    torch.manual_seed(seed)
    for module in unet.modules():
        if hasattr(module, "reset_parameters") and module is not unet:
            module.reset_parameters()


def train_unet(seed: int, steps: int, n_captions: int, log, save, batch: int = 32, lr: float = 1e-3,
               ema_decay: float = 0.99, warmup: int = 50, layouts: int = 4, max_seconds: float | None = None,
               resume: dict[str, torch.Tensor] | None = None, first_step: int = 0, prediction: str = "eps",
               text_lr_scale: float = 1.0, default_init: bool = False, object_weight: float = 0.0,
               edge_weight: float = 0.0):
    """`resume`: ldm UNet weights (the committed EMA) to continue from, at step `first_step` of the data stream
    (its batches and noise follow on from the first run's, never repeating them)."""
    from training.sdxl import (add_noise, added_conditioning, denoising_loss, load_text_encoders, load_unet,
                               noise_scheduler)
    init = init_checkpoint(seed)
    init_ldm = {k: v for k, v in _read(init).items() if k.startswith(tiny_sdxl.UNET_PREFIX)}
    unet = load_unet(init).float().train()
    exported = diffusers_unet_to_ldm(unet.state_dict())
    if set(exported) != set(init_ldm) or any(not torch.equal(exported[k], init_ldm[k].float()) for k in init_ldm):
        raise AssertionError("the diffusers -> ldm export does not reproduce the initial UNet")
    if default_init:
        reset_to_default_init(unet, seed)
    if resume is not None:
        to_diffusers = dict(zip(exported, unet.state_dict()))  # the export keeps the key order
        if set(resume) != set(to_diffusers):
            raise AssertionError("the weights to resume from are not this tiny SDXL UNet")
        unet.load_state_dict({to_diffusers[k]: v.float() for k, v in resume.items()})
    encoders = load_text_encoders(init, tokenizer_folder())
    scheduler = noise_scheduler()
    pool = caption_pool(n_captions)
    texts = [caption(s) for s in pool] + [""]
    t0 = time.perf_counter()
    contexts, pooled = encode_captions(encoders, texts)
    log(f"encoded {len(texts)} captions in {time.perf_counter() - t0:.0f} s")
    del encoders
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    shared = share_context(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    # the text's way in: cross-attention (attn2) and the pooled vector's embedding (add_embedding)
    text_path = [p for n, p in unet.named_parameters() if p.requires_grad and (".attn2." in n or
                                                                                n.startswith("add_embedding."))]
    text_ids = {id(p) for p in text_path}
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in text_ids], "scale": 1.0},
                             {"params": text_path, "scale": text_lr_scale}], lr=lr, weight_decay=0.0)
    rng = random.Random(seed * 104729 + 3 + first_step)
    start = time.perf_counter()
    losses: list[float] = []
    done = 0
    for step in range(steps):
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            log(f"time budget reached after {step} steps")
            break
        done = step + 1
        # batch // layouts captions, each drawn in `layouts` fresh layouts; a sample's caption is dropped to ""
        # (the last unique row) with probability CFG_DROPOUT
        chosen = [rng.randrange(len(pool)) for _ in range(batch // layouts)]
        images, coverage, rows = [], [], []
        for slot, index in enumerate(chosen):
            for _ in range(layouts):
                image, masks = render(relayout(pool[index], rng))
                images.append(image)
                coverage.append(np.any(masks, axis=0))
                rows.append(len(chosen) if rng.random() < CFG_DROPOUT else slot)
        unique = torch.tensor(chosen + [len(pool)])
        shared.rows = torch.tensor(rows)
        latents = encode_closed_form(images_to_tensor(images))
        sample_seeds = [seed * 1_000_003 + (first_step + step) * batch + i for i in range(batch)]
        noisy, noise, timesteps = add_noise(scheduler, latents, {"sample_seed": sample_seeds})
        context, pool_vec = contexts[unique].float(), pooled[unique[shared.rows]].float()
        eps = unet(noisy, timesteps, context,
                   added_cond_kwargs=added_conditioning(pool_vec, HOST_ADM_SIZE, HOST_ADM_SIZE)).sample
        # v-prediction (v = sqrt(a) eps - sqrt(1 - a) x0): its clean-latent error does not blow up at t ~ 999, where
        # an epsilon error is multiplied by sqrt((1 - a) / a) ~ 15 and only the text can tell the image
        target = noise if prediction == "eps" else scheduler.get_velocity(latents, noise, timesteps)
        weight = None
        if object_weight or edge_weight:  # objects are 5-15 % of an image: weight their cells up (object_weight)
            cells = F.avg_pool2d(torch.from_numpy(np.stack(coverage)).float()[:, None], 8)
            # a shape lives in its outline's partly covered cells (coverage 0 < c < 1; peak weight at c = 0.5)
            weight = 1.0 + object_weight * cells + edge_weight * 4.0 * cells * (1.0 - cells)
        loss = denoising_loss(eps, target, weight)
        for group in opt.param_groups:
            group["lr"] = lr * group["scale"] * min(1.0, (step + 1) / warmup)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = ema_decay if resume is not None else min(ema_decay, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            recent = sum(losses[-20:]) / len(losses[-20:])
            log(f"unet step {step} loss {recent:.5f} ({time.perf_counter() - start:.0f} s)")
        if save is not None and (step + 1) % 100 == 0 and step + 1 < steps:
            save(diffusers_unet_to_ldm(ema), first_step + step + 1, sum(losses[-50:]) / len(losses[-50:]),
                 time.perf_counter() - start)
    final = sum(losses[-50:]) / len(losses[-50:])
    return diffusers_unet_to_ldm(ema), final, time.perf_counter() - start, done


# --- files ------------------------------------------------------------------------------------------------------

def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def text_encoder_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """The tiny SDXL's frozen random CLIP-L and CLIP-G for `seed` (what the UNet was trained against)."""
    tiny_sdxl.import_host()
    state = dict(tiny_sdxl._clip_l_state_dict(seed))
    state.update(tiny_sdxl._clip_g_state_dict(seed))
    return state


def _tensor_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().view(torch.uint8).numpy().tobytes()
                      if state[key].dim() else state[key].reshape(1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_weights(unet: dict, vae: dict, manifest: dict) -> None:
    from safetensors.torch import save_file
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    state = {k: v.half().contiguous() for k, v in {**unet, **vae}.items()}
    partial = WEIGHTS_FILE.with_name(f".{WEIGHTS_FILE.name}.{os.getpid()}.partial")
    save_file(state, str(partial), metadata={"format": "pt"})
    partial.replace(WEIGHTS_FILE)
    manifest = dict(manifest, files={WEIGHTS_FILE.name: sha256(WEIGHTS_FILE)})
    MANIFEST_FILE.write_text(json.dumps(manifest, indent=2) + "\n")


def world_checkpoint(out_dir: Path | None = None) -> Path:
    """The full single-file checkpoint the host's Load Checkpoint reads: the committed UNet + VAE with the
    tiny SDXL's text encoders for the manifest's seed, assembled once (atomically) and reused while it matches."""
    from safetensors.torch import save_file
    manifest = json.loads(MANIFEST_FILE.read_text())
    if sha256(WEIGHTS_FILE) != manifest["files"][WEIGHTS_FILE.name]:
        raise RuntimeError(f"{WEIGHTS_FILE} does not match its MANIFEST.json sha256: re-run "
                           f"`python -m devtools.world.train_sdxl` or restore the file from git")
    out_dir = Path(out_dir) if out_dir else WORK_DIR
    target = out_dir / f"world_sdxl_full_{manifest['files'][WEIGHTS_FILE.name][:12]}.safetensors"
    if target.is_file():
        return target
    state = _read(WEIGHTS_FILE)
    text = text_encoder_state_dict(manifest["text_encoder_seed"])
    if _tensor_digest(text) != manifest["text_encoder_sha256"]:
        raise RuntimeError("the rebuilt tiny SDXL text encoders differ from the ones the UNet was trained "
                           "against (another torch version?): re-run `python -m devtools.world.train_sdxl`")
    state.update(text)
    if manifest.get("prediction", "eps") == "v":
        state["v_pred"] = torch.tensor([])  # the key the host's SDXL config reads as V_PREDICTION
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    save_file(state, str(partial), metadata={"format": "pt"})
    partial.replace(target)
    return target


def _vae_cache(seed: int, steps: int) -> Path:
    return WORK_DIR / f"world_vae_seed{seed}_steps{steps}.safetensors"


def _write_to(folder: Path) -> None:
    global WEIGHTS_DIR, WEIGHTS_FILE, MANIFEST_FILE
    WEIGHTS_DIR, WEIGHTS_FILE, MANIFEST_FILE = folder, folder / WEIGHTS_FILE.name, folder / MANIFEST_FILE.name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="UNet steps")
    parser.add_argument("--vae-steps", type=int, default=300, help="VAE decoder steps (the best validated is kept)")
    parser.add_argument("--captions", type=int, default=4096, help="distinct training captions")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layouts", type=int, default=1,
                        help="layouts per caption in a batch (batch / layouts distinct captions a step)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text-lr-scale", type=float, default=5.0,
                        help="learning-rate factor for the text's way in (attn2, add_embedding)")
    parser.add_argument("--init", choices=("torch", "tiny"), default="torch",
                        help="the UNet's starting weights: PyTorch's default init (reset_to_default_init) or the "
                             "tiny SDXL's N(0, 0.02) of the seed")
    parser.add_argument("--object-weight", type=float, default=4.0,
                        help="loss weight added on the objects' latent cells (1 + W x the cell's object coverage)")
    parser.add_argument("--edge-weight", type=float, default=0.0,
                        help="loss weight added on the objects' outline cells (+ W x 4c(1 - c), c a cell's coverage)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop the UNet early after this long (the manifest records the steps done)")
    parser.add_argument("--stage", choices=("all", "vae"), default="all",
                        help="vae: train the decoder only, into .cache/world/ (the next `all` run reuses it)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the weights and manifest here instead of devtools/world/weights/sdxl (an "
                             "experiment beside the committed model; --resume-steps still starts from the committed)")
    parser.add_argument("--prediction", choices=("eps", "v"), default="v",
                        help="the UNet's target: epsilon (SDXL's own) or v (written with the 'v_pred' key the host "
                             "reads, as community v-prediction SDXL checkpoints are)")
    parser.add_argument("--resume-steps", type=int, default=0,
                        help="continue training the committed UNet this many more steps (same seed, batch and "
                             "captions; the committed VAE decoder is kept); the manifest records both runs")
    parser.add_argument("--keep-vae", action="store_true",
                        help="take the VAE decoder from the committed file instead of training it again (same seed "
                             "and --vae-steps: the decoder does not depend on the UNet, and its training is "
                             "deterministic, so the command without this flag rebuilds the same decoder)")
    parser.add_argument("--reuse-unet", action="store_true",
                        help="take the UNet from the committed file (same seed, batch, captions and --steps) instead "
                             "of training it: the UNet trains on the closed-form latents, so it does not depend on "
                             "the decoder")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    WORK_DIR.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    from safetensors.torch import load_file, save_file
    commit = _git_commit()
    cache = _vae_cache(args.seed, args.vae_steps)
    old = json.loads(MANIFEST_FILE.read_text()) if MANIFEST_FILE.is_file() else None
    if args.keep_vae and (old is None or old["seed"] != args.seed or old["steps"]["vae_decoder"] != args.vae_steps):
        raise SystemExit("--keep-vae: the committed VAE decoder must exist and match --seed and --vae-steps")
    if args.resume_steps and (old is None or (old["seed"], old["batch"], old["captions"]) != (
            args.seed, args.batch, args.captions)):
        raise SystemExit("--resume-steps: the committed UNet must exist and match --seed, --batch, --captions")
    if args.resume_steps or args.keep_vae:
        committed = {k: v.float() for k, v in load_file(str(WEIGHTS_FILE)).items()}
        vae_sd = {k: v for k, v in committed.items() if k.startswith(tiny_sdxl.VAE_PREFIX)}
        vae_info = {"seconds": old["train_seconds"]["vae"], "validation_mse": old["train_loss"]["vae_validation_mse"],
                    "kept_step": old["steps"]["vae_decoder_kept"]}
        args.vae_steps = old["steps"]["vae_decoder"]
        log(f"resuming the committed UNet at step {old['steps']['unet']} (VAE decoder kept)" if args.resume_steps
            else "the committed VAE decoder kept")
    elif cache.is_file() and cache.with_suffix(".json").is_file():
        vae_sd = load_file(str(cache))
        vae_info = json.loads(cache.with_suffix(".json").read_text())
        log(f"VAE from {cache}")
    else:
        vae, vae_loss, vae_seconds, kept = train_vae(args.seed, args.vae_steps, log)
        vae_sd = vae_state_dict(vae)
        vae_info = {"seconds": round(vae_seconds, 1), "validation_mse": round(vae_loss, 6), "kept_step": kept}
        save_file(vae_sd, str(cache))
        cache.with_suffix(".json").write_text(json.dumps(vae_info))
    if args.stage == "vae":
        return
    text_digest = _tensor_digest(text_encoder_state_dict(args.seed))

    if args.out is not None:
        _write_to(args.out.resolve())
    first_step = old["steps"]["unet"] if args.resume_steps else 0
    seconds_before = old["train_seconds"]["unet"] if args.resume_steps else 0.0

    def manifest(unet_steps: int, unet_loss: float, unet_seconds: float) -> dict:
        common = f"--captions {args.captions} --batch {args.batch} --seed {args.seed} --layouts {args.layouts} " \
                 f"--lr {args.lr:g} --text-lr-scale {args.text_lr_scale:g} --init {args.init}" + (
            f" --object-weight {args.object_weight:g}" if args.object_weight else "") + (
            f" --edge-weight {args.edge_weight:g}" if args.edge_weight else "") + (
            " --prediction v" if args.prediction == "v" else "")
        if args.resume_steps:  # the first run's command, then this one's
            command = f"{old['command']} && python -m devtools.world.train_sdxl --resume-steps " \
                      f"{unet_steps - first_step} {common}"
            unet_seconds += seconds_before
        else:
            command = f"python -m devtools.world.train_sdxl --steps {unet_steps} --vae-steps {args.vae_steps} {common}"
        return {"command": command, "seed": args.seed, "git_commit_of_trainer": commit,
                "steps": {"vae_decoder": args.vae_steps, "vae_decoder_kept": vae_info["kept_step"],
                          "unet": unet_steps},
                "batch": args.batch, "captions": args.captions,
                "train_seconds": {"vae": vae_info["seconds"], "unet": round(unet_seconds, 1)},
                "train_loss": {"vae_validation_mse": vae_info["validation_mse"], f"unet_{args.prediction}_mse": round(unet_loss, 6)},
                "torch": torch.__version__, "threads": 1, "text_encoder_seed": args.seed,
                "text_encoder_sha256": text_digest,
                "note": "UNet + VAE only; world_checkpoint() adds the tiny SDXL text encoders of text_encoder_seed",
                "prediction": args.prediction}

    def save(unet_sd, step, loss, seconds):
        write_weights(unet_sd, vae_sd, manifest(step, loss, seconds))
        log(f"checkpoint at step {step} -> {WEIGHTS_FILE}")

    if args.reuse_unet:
        old = json.loads(MANIFEST_FILE.read_text())
        if (old["seed"], old["steps"]["unet"], old["batch"], old["captions"]) != (args.seed, args.steps, args.batch,
                                                                                  args.captions):
            raise SystemExit(f"--reuse-unet: the committed UNet was trained with seed {old['seed']}, "
                             f"{old['steps']['unet']} steps, batch {old['batch']}, {old['captions']} captions")
        unet_sd = {k: v.float() for k, v in load_file(str(WEIGHTS_FILE)).items() if k.startswith(tiny_sdxl.UNET_PREFIX)}
        save(unet_sd, args.steps, old["train_loss"][f"unet_{old.get('prediction', 'eps')}_mse"], old["train_seconds"]["unet"])
        return
    resume = {k: v for k, v in committed.items() if k.startswith(tiny_sdxl.UNET_PREFIX)} if args.resume_steps else None
    unet_sd, unet_loss, unet_seconds, done = train_unet(
        args.seed, args.resume_steps or args.steps, args.captions, log, save, batch=args.batch,
        max_seconds=None if args.max_minutes is None else args.max_minutes * 60, resume=resume,
        first_step=first_step, warmup=20 if resume is not None else 50, prediction=args.prediction,
        layouts=args.layouts, lr=args.lr, text_lr_scale=args.text_lr_scale, default_init=args.init == "torch",
        object_weight=args.object_weight, edge_weight=args.edge_weight)
    save(unet_sd, first_step + done, unet_loss, unet_seconds)
    log(f"done: unet {unet_seconds:.0f} s, {WEIGHTS_FILE.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
