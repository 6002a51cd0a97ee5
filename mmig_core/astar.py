"""A-STAR attention segregation and retention (MMIG §3.3, Eqs. 19-20), host-agnostic.

The pieces a guided sampler and a training recipe share: explicit cross-attention probabilities,
the per-concept map aggregation (drop the start token, softmax over the text tokens, average heads
and layers, Gaussian smoothing), the two losses, the step-size schedule and the NaN-safe latent
update. Defaults come from Attend-and-Excite (Chefer et al. 2023), because A-STAR does not publish its
step sizes, thresholds or iteration counts.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# Attend-and-Excite defaults (its pipeline's arguments), used because A-STAR publishes none.
ATTEND_EXCITE_SCALE_FACTOR = 20.0      # step size 20 * sqrt(linspace(1, 0.5, T))
ATTEND_EXCITE_GUIDED_STEPS = 25        # max_iter_to_alter: the first 25 of 50 steps
ATTEND_EXCITE_SOFTMAX_SCALE = 100.0    # attention probabilities are multiplied by 100 before the text softmax
ATTEND_EXCITE_SMOOTHING = (3, 0.5)     # Gaussian kernel size and sigma
BINARISE_THRESHOLD = 0.5               # B_t^m: the previous map above half its maximum
_EPS = 1e-8


# -- attention ------------------------------------------------------------------------------------

def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, in float32: [B, Nq, heads*d] x [B, Nk, heads*d] -> [B, heads, Nq, Nk].

    Computed explicitly because fast kernels (SDPA, xformers) never return the probabilities."""
    b, nq, inner = q.shape
    d = inner // heads
    qh = q.float().reshape(b, nq, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)


def attention_output(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs [B, heads, Nq, Nk] applied to v [B, Nk, heads*d] -> [B, Nq, heads*d] in v's dtype."""
    b, heads, nq, nk = probs.shape
    vh = v.float().reshape(b, nk, heads, -1).transpose(1, 2)
    return (probs @ vh).transpose(1, 2).reshape(b, nq, -1).to(v.dtype)


def text_token_maps(probs: torch.Tensor, word_positions: list[int],
                    softmax_scale: float = ATTEND_EXCITE_SOFTMAX_SCALE) -> torch.Tensor:
    """One layer's share of the aggregation: keep the prompt's word tokens (the start token, end and
    padding dropped), softmax over them, average the heads. [B, heads, N, Nk] -> [B, N, len(word_positions)]."""
    words = probs[..., word_positions] * softmax_scale
    return torch.softmax(words, dim=-1).mean(dim=1)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def gaussian_smooth(maps: torch.Tensor, size: int = ATTEND_EXCITE_SMOOTHING[0],
                    sigma: float = ATTEND_EXCITE_SMOOTHING[1]) -> torch.Tensor:
    """Depthwise Gaussian blur of [B, C, h, w] maps, reflect-padded so the borders keep their mass."""
    if size <= 1 or sigma <= 0:
        return maps
    b, c, h, w = maps.shape
    pad = size // 2
    kernel = gaussian_kernel(size, sigma).to(maps)[None, None].expand(c, 1, size, size)
    mode = "reflect" if min(h, w) > pad else "replicate"
    return F.conv2d(F.pad(maps, (pad, pad, pad, pad), mode=mode), kernel, groups=c)


def concept_maps(layer_maps: list[torch.Tensor], size_hw: tuple[int, int], concept_columns: list[list[int]],
                 smoothing: tuple[int, float] = ATTEND_EXCITE_SMOOTHING) -> torch.Tensor:
    """Average the layers' [B, N, W] word maps, pick each concept's columns (a word split into several
    tokens takes their mean) and smooth: -> A_t, [B, C, h, w]."""
    h, w = size_hw
    mean = torch.stack(layer_maps).mean(dim=0)
    per_concept = torch.stack([mean[..., cols].mean(dim=-1) for cols in concept_columns], dim=1)
    return gaussian_smooth(per_concept.reshape(mean.shape[0], len(concept_columns), h, w), *smoothing)


# -- losses ---------------------------------------------------------------------------------------

def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its maximum, so that concepts of different strength compare."""
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(_EPS)


def soft_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 * sum min(a, b) / sum (a + b) over the last two dims: 0 for disjoint maps, 1 for identical ones.

    Eqs. 19-20 print the ratio without the factor 2 (it then tops out at 0.5); the factor makes the
    `1 -` of Eq. 20 reach 0 for a fully retained concept, as A-STAR intends. Gradients only scale."""
    inter = torch.minimum(a, b).sum(dim=(-2, -1))
    return 2 * inter / (a + b).sum(dim=(-2, -1)).clamp_min(_EPS)


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """L_AS (Eq. 19): the overlap summed over every concept pair m > n. maps [B, C, h, w] -> [B]."""
    c = maps.shape[1]
    loss = maps.new_zeros(maps.shape[0])
    for m in range(c):
        for n in range(m):
            loss = loss + soft_overlap(maps[:, m], maps[:, n])
    return loss


def binarise(maps: torch.Tensor, threshold: float = BINARISE_THRESHOLD) -> torch.Tensor:
    """B_t^m: the detached map, 1 where it exceeds `threshold` times its maximum."""
    return (normalise(maps.detach()) > threshold).to(maps.dtype)


def retention_loss(maps: torch.Tensor, previous_binary: torch.Tensor) -> torch.Tensor:
    """L_AR (Eq. 20): sum over concepts of 1 - overlap(A_{t-1}^m, B_t^m). [B, C, h, w] x2 -> [B]."""
    return (1 - soft_overlap(maps, previous_binary)).sum(dim=1)


def step_size(scale_factor: float, progress: float) -> float:
    """Attend-and-Excite's alpha_t = scale * sqrt(linspace(1, 0.5, T)[i]), with progress = i / T in [0, 1]."""
    return scale_factor * math.sqrt(1.0 - 0.5 * min(max(progress, 0.0), 1.0))


def safe_update(latent: torch.Tensor, grad: torch.Tensor | None, alpha: float) -> tuple[torch.Tensor, bool]:
    """z - alpha * grad, or z unchanged (and False) when the step would hold NaN/Inf: never write NaN."""
    if grad is None or not torch.isfinite(grad).all():
        return latent, False
    updated = latent - alpha * grad
    if not torch.isfinite(updated).all():
        return latent, False
    return updated, True


# -- making a loaded model differentiable ----------------------------------------------------------

def make_weights_differentiable(module: torch.nn.Module) -> int:
    """Replace parameters and buffers created under torch.inference_mode() by ordinary copies.

    Hosts load models under inference mode; autograd refuses to save such tensors for backward even
    when only the input needs a gradient. Same values, same device and dtype, frozen; call outside
    inference mode. Returns how many tensors were replaced."""
    replaced = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    replaced += 1
            for name, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_inference():
                    sub._buffers[name] = buf.clone()
                    replaced += 1
    return replaced


def has_inference_weights(module: torch.nn.Module) -> bool:
    return any(p.is_inference() for p in module.parameters())


# The host's transformer blocks add residuals in place (x += n) right after normalising x, and
# autograd refuses to backpropagate through a tensor changed after it was saved. Their norms are
# made to work on a copy, only in passes that need gradients.

def residual_norms(diffusion_model: torch.nn.Module):
    """(dotted path, module) of the norms in front of each transformer block's attention layers."""
    for name, block in diffusion_model.named_modules():
        if getattr(block, "attn2", None) is not None:
            for norm in ("norm1", "norm2"):
                if hasattr(block, norm):
                    yield f"{name}.{norm}", getattr(block, norm)


def forward_on_a_copy(forward):
    def copying_forward(x, *args, **kwargs):
        return forward(x.clone() if x.requires_grad else x, *args, **kwargs)
    return copying_forward


@contextmanager
def norms_on_copies(diffusion_model: torch.nn.Module):
    """For the duration: the residual norms copy their input when it needs a gradient."""
    patched = []  # (norm, the instance-level forward it had, if any: host object patches set one)
    try:
        for _, norm in residual_norms(diffusion_model):
            patched.append((norm, norm.__dict__.get("forward")))
            norm.forward = forward_on_a_copy(norm.forward)
        yield
    finally:
        for norm, previous in patched:
            if previous is None:
                del norm.forward
            else:
                norm.forward = previous
