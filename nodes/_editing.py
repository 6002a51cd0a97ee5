"""Direct Inversion + prompt-to-prompt in the host's protocol: the maths is mmig_core/p2p.py; this file reaches the
host's model through a ModelPatcher (duck-typed, like nodes/_guidance.py, so benches and tests use it in-process).

- the UNet is asked through the model's own `apply_model` (its calculate_input / calculate_denoised, so DDIM runs in
  the model's own prediction type, eps or v) with the conditioning turned into model inputs by the model's own
  `extra_conds` (SDXL's pooled/size vector included);
- the controllers sit in attn1/attn2 replacement patches of a clone of the MODEL (the given one is not changed);
- the schedule is the model's own sigmas at DDIM's timesteps.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..mmig_core import astar, p2p
from ..mmig_core.p2p import EditError

log = logging.getLogger("mmig.p2p")
CHUNK = 77  # one CLIP chunk: the words prompt-to-prompt aligns


@dataclass
class Inversion:
    """MMIG_INVERSION: the trajectory z*_0 .. z*_T (the model's latent space), its schedule, what made it."""
    trajectory: list[torch.Tensor]
    schedule: p2p.Schedule
    sampling_type: str
    model_key: tuple
    source_fingerprint: tuple
    latent_shape: tuple

    def __repr__(self) -> str:
        return (f"Inversion(steps={self.schedule.steps}, latent={list(self.latent_shape)}, "
                f"sampling={self.sampling_type})")


def sampling_type(model) -> str:
    """The prediction type and schedule family of the host's model_sampling, e.g. 'EPS+ModelSamplingDiscrete'."""
    sampling = model.model.model_sampling
    names = [c.__name__ for c in type(sampling).__mro__ if c.__name__ not in ("object", "Module", "ModelSampling")]
    return "+".join(names) or type(sampling).__name__


def model_key(model) -> tuple:
    return (id(model.model), type(model.model).__name__, sampling_type(model))


def all_sigmas(model) -> list[float]:
    sigmas = getattr(model.model.model_sampling, "sigmas", None)
    if sigmas is None or len(sigmas) < 2:
        raise EditError("Direct Inversion needs a model with a discrete noise schedule (SD1.x, SDXL): this model's "
                        "sampling has no table of sigmas.")
    return [float(s) for s in sigmas]


def fingerprint(cond: torch.Tensor) -> tuple:
    c = cond.float()
    return tuple(cond.shape), round(float(c.sum()), 3), round(float(c.abs().sum()), 3)


def first(conditioning, what: str):
    if not conditioning:
        raise EditError(f"The {what} CONDITIONING is empty: connect a CLIP Text Encode.")
    if len(conditioning) > 1:
        raise EditError(f"The {what} CONDITIONING holds {len(conditioning)} entries (combined or concatenated "
                        f"conditioning); prompt-to-prompt needs one prompt per branch.")
    cond, extra = conditioning[0]
    if cond.shape[1] > CHUNK:
        log.warning("MMIG prompt-to-prompt: the %s prompt has %d context tokens; the first %d are used (PnPInversion "
                    "truncates its prompts to CLIP's 77 tokens too).", what, cond.shape[1], CHUNK)
        cond = cond[:, :CHUNK]
    return cond, dict(extra)


def model_inputs(model, conditioning, what: str, noise: torch.Tensor, device) -> dict:
    """One conditioning entry as the model's keyword inputs (c_crossattn, and SDXL's y), batch 1."""
    cond, extra = first(conditioning, what)
    params = {**extra, "cross_attn": cond, "device": device, "noise": noise, "width": extra.get("width", noise.shape[3] * 8),
              "height": extra.get("height", noise.shape[2] * 8), "prompt_type": "positive"}
    out = model.model.extra_conds(**params)
    inputs = {}
    for key in ("c_crossattn", "y"):
        if key in out and out[key] is not None:
            inputs[key] = getattr(out[key], "cond", out[key])
    if "c_crossattn" not in inputs:
        inputs["c_crossattn"] = cond
    return inputs


def stack_inputs(rows: list[dict], what: list[str]) -> dict:
    lengths = {name: r["c_crossattn"].shape[1] for name, r in zip(what, rows)}
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{n} {k} tokens" for n, k in lengths.items())
        raise EditError(f"The prompts' contexts differ in length ({listing}): prompt-to-prompt maps one context "
                        f"onto another; encode every prompt with the same CLIP.")
    return {key: torch.cat([r[key] for r in rows]) for key in rows[0]}


def eps_function(model, inputs: dict, transformer_options: dict, device, dtype=torch.float32):
    """eps(z, sigma) for the mmig_core loops: the host's apply_model at noise level sigma on the UNet input z
    (x = z * sqrt(1 + sigma^2) in the host's k-diffusion space), eps = (x - denoised) / sigma."""
    base = model.model
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def eps(z: torch.Tensor, sigma: float) -> torch.Tensor:
        b = z.shape[0]
        sig = torch.full((b,), sigma, device=device, dtype=torch.float32)
        x = z.to(device, torch.float32) * math.sqrt(1.0 + sigma * sigma)
        options = {**transformer_options, "sigmas": sig, "cond_or_uncond": [0] * b}
        rows = {k: (v if v.shape[0] == b else v.repeat(b // v.shape[0], *([1] * (v.ndim - 1)))) for k, v in inputs.items()}
        denoised = base.apply_model(x, sig, transformer_options=options, **rows)
        return ((x - denoised.float()) / sigma).to(dtype)
    return eps


# -- the CLIP's tokens ----------------------------------------------------------------------------

def prompt_tokens(clip, text: str, what: str):
    """(token ids from the start token to the end token, decode) of `text` as the host's CLIP tokenizes it."""
    tokenizer = clip.tokenizer
    inner = getattr(tokenizer, "clip_l", None) or getattr(tokenizer, getattr(tokenizer, "clip", ""), None)
    end_id = getattr(inner, "end_token", 49407)
    inv_vocab = getattr(inner, "inv_vocab", {})

    def decode(token: int) -> str:
        return inv_vocab.get(token, str(token)).replace("</w>", "")

    tokens = clip.tokenize(text)
    chunks = tokens["l"] if "l" in tokens else next(iter(tokens.values()))
    ids = [t[0] if isinstance(t, (tuple, list)) else int(t) for t in chunks[0]]  # the first chunk, as `first` keeps
    end = ids.index(end_id, 1) if end_id in ids[1:] else len(ids) - 1
    return ids[:end + 1], decode


def word_ids(clip, words: str) -> list[tuple[str, list[int]]]:
    out = []
    for name in (w.strip() for w in words.split(",")):
        if name:
            ids, _ = prompt_tokens(clip, name, "word")
            out.append((name, ids[1:-1]))
    return out


# -- the patched model ----------------------------------------------------------------------------

def attention_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    blocks = astar.cross_attention_blocks(diffusion_model)
    if not blocks:
        raise EditError("prompt-to-prompt needs a UNet with cross-attention (SD1.x, SDXL); this model has none.")
    return blocks


def patched_model(model, controller: p2p.P2PController):
    """A clone of `model` whose every attn1/attn2 goes through the controller (the given model is unchanged)."""
    patched = model.clone()

    def self_hook(q, k, v, extra_options):
        block = extra_options.get("block")
        return controller.self_attention(q, k, v, extra_options["n_heads"], layer=_layer(extra_options, block))

    def cross_hook(q, k, v, extra_options):
        block = extra_options.get("block")
        hw = astar.layer_size(extra_options.get("original_shape"), q.shape[1])
        return controller.cross_attention(q, k, v, extra_options["n_heads"], hw=hw, layer=_layer(extra_options, block),
                                          blend_layer=not block or block[0] != "middle")

    for name, index, _ in attention_blocks(model.model.diffusion_model):
        patched.set_model_attn1_replace(self_hook, name, index)
        patched.set_model_attn2_replace(cross_hook, name, index)
    return patched


def _layer(extra_options, block):
    return (block[0], block[1], extra_options.get("block_index", 0)) if block else None


def blend_tokens(diffusion_model, latent_hw) -> int:
    """Queries of the layers LocalBlend reads: PnPInversion's 16x16 at SD1.x 512 px, a quarter of the side."""
    h, w = latent_hw
    levels = sorted({lvl for _, _, lvl in attention_blocks(diffusion_model)}, key=lambda lvl: (abs(lvl - 2), -lvl))
    level = levels[0]
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h * w


def self_max_tokens(latent_hw) -> int:
    """PnPInversion copies self-attention on layers of at most 32x32 queries at SD1.x 512 px (64x64 latent): the
    layers at half the latent's side or smaller. The pack keeps that rule relative to the latent's size."""
    h, w = latent_hw
    return ((h + 1) // 2) * ((w + 1) // 2)
