"""Attention guidance maths, host-agnostic: A-STAR (MMIG §3.3, Eqs. 19-20) and Attend-and-Excite.

The pieces a guided sampler and a training recipe share: explicit cross-attention probabilities,
two map aggregations, the losses, the step-size schedule, the NaN-safe latent update, and the
prompt's token positions. The guided sampler itself (the host's patch protocol) is nodes/_guidance.py.

- A-STAR maps (the pack's own aggregation, used by the training recipe too): per layer, a softmax
  over the prompt's word tokens only (start, end and padding dropped), heads then layers averaged,
  then A&E's Gaussian. A-STAR publishes no step sizes, thresholds or iteration counts: the
  defaults below are Attend-and-Excite's where A&E has that setting, and say so where it has not.
- Attend-and-Excite maps (Chefer et al. 2023, as diffusers' StableDiffusionAttendAndExcitePipeline
  computes them): the probabilities of every layer at the chosen resolution averaged over layers and
  heads first, then a softmax of 100x them over context tokens [1:-1] (the end and padding tokens
  included), the altered tokens picked, A&E's Gaussian, each token's maximum.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

# Attend-and-Excite's defaults (the arguments of diffusers' pipeline and of the original run.py).
ATTEND_EXCITE_SCALE_FACTOR = 20.0      # step size scale_factor * sqrt(linspace(1, 0.5, T)[i])
ATTEND_EXCITE_GUIDED_STEPS = 25        # max_iter_to_alter: the first 25 (of 50) steps
ATTEND_EXCITE_SOFTMAX_SCALE = 100.0    # attention probabilities are multiplied by 100 before the text softmax
ATTEND_EXCITE_SMOOTHING = (3, 0.5)     # Gaussian kernel size and sigma (A&E's kernel formula, see gaussian_kernel)
ATTEND_EXCITE_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}  # refinement steps: refine until every max >= threshold
ATTEND_EXCITE_MAX_REFINE_ITERS = 20    # max_refinement_steps
# The pack's own choice: A&E has no binarisation, and A-STAR publishes no value for B_t's threshold.
BINARISE_THRESHOLD = 0.5               # B_t^m: the previous map above half its maximum
_EPS = 1e-8


class ConceptError(ValueError):
    """A concept that cannot be found in the prompt."""


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
    """Attend-and-Excite's kernel, exp(-((x - mu) / (2 sigma))^2) normalised to sum 1: note the
    2 sigma where the textbook Gaussian has sqrt(2) sigma, so it is a standard Gaussian of sigma * sqrt(2)."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-((coords / (2 * sigma)) ** 2))
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


# -- Attend-and-Excite's aggregation and loss -------------------------------------------------------

def attend_excite_maps(layer_head_sums: list[torch.Tensor], heads: int, size_hw: tuple[int, int],
                       token_positions: list[int], smoothing: tuple[int, float] = ATTEND_EXCITE_SMOOTHING,
                       softmax_scale: float = ATTEND_EXCITE_SOFTMAX_SCALE) -> torch.Tensor:
    """A&E's smoothed per-token maps. layer_head_sums: each layer's probabilities summed over its heads,
    [B, N, Nk]; heads: the heads of all layers together. Average over layers and heads, softmax of
    `softmax_scale` x the average over context tokens [1:-1], pick `token_positions` (context
    positions, 0 being the start token), smooth. -> [B, T, h, w]. A context of several 77-token chunks
    (a long prompt) is taken as one sequence: A&E itself only knows one chunk."""
    mean = torch.stack(layer_head_sums).sum(dim=0) / heads
    text = torch.softmax(mean[..., 1:-1] * softmax_scale, dim=-1)
    picked = text[..., [p - 1 for p in token_positions]]  # [B, N, T]
    b, _, t = picked.shape
    maps = picked.transpose(1, 2).reshape(b, t, *size_hw)
    return gaussian_smooth(maps, *smoothing)


def attend_excite_loss(maps: torch.Tensor) -> torch.Tensor:
    """max over the tokens of max(0, 1 - the token's highest smoothed attention). [B, T, h, w] -> [B]."""
    return (1 - maps.amax(dim=(-2, -1))).clamp_min(0).amax(dim=-1)


def attend_excite_step_size(scale_factor: float, step: int, steps: int) -> float:
    """A&E's alpha_i = scale_factor * sqrt(linspace(1, 0.5, steps)[i]) for sampler step i of `steps`."""
    fraction = step / (steps - 1) if steps > 1 else 0.0
    return scale_factor * math.sqrt(1.0 - 0.5 * min(max(fraction, 0.0), 1.0))


# -- losses ---------------------------------------------------------------------------------------

def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its maximum, so that concepts of different strength compare."""
    return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(_EPS)


def soft_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 * sum min(a, b) / sum (a + b) over the last two dims: 0 for disjoint maps, 1 for identical ones.

    Eqs. 19-20 print the ratio without the factor 2 (it then tops out at 0.5); with it the `1 -` of
    Eq. 20 reaches 0 for a fully retained concept. Both losses are then exactly 2x (plus a constant)
    the printed formulas: equivalent to 2x the step size of the printed formula."""
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
    """Attend-and-Excite's alpha_i = scale * sqrt(linspace(1, 0.5, T)[i]), with progress = i / (T - 1) in [0, 1]."""
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


@contextmanager
def frozen(module: torch.nn.Module):
    """For the duration: no parameter of `module` requires a gradient (restored on exit). A guided pass needs the
    gradient of its input (A-STAR's latent, the layered embeddings) only; a weight that requires one would make
    autograd keep every layer's input for the weight gradients and, with backward(), fill .grad with a copy of
    the weights."""
    thawed = [p for p in module.parameters() if p.requires_grad and not p.is_inference()]
    try:
        for p in thawed:
            p.requires_grad_(False)
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


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


# -- the prompt's tokens and the UNet's layers ----------------------------------------------------

def resolve_concepts(prompt_chunks: list[list[int]], concepts: dict[str, list[int]], start_id: int, end_id: int,
                     describe_token=str) -> tuple[list[list[int]], list[int]]:
    """Token positions of each concept in the prompt, and the prompt's word positions.

    prompt_chunks: the prompt's token ids per chunk (start, words, end, padding). concepts: each
    concept's own token ids (no start/end). Positions index the concatenated context."""
    flat, word_positions = [], []
    for chunk in prompt_chunks:
        in_words = False
        for i, token in enumerate(chunk):
            if i == 0 and token == start_id:
                in_words = True
            elif token == end_id:
                in_words = False
            elif in_words:
                word_positions.append(len(flat))
            flat.append(token)
    positions = []
    for name, ids in concepts.items():
        found = None
        for start in word_positions:
            if ids and flat[start:start + len(ids)] == ids:
                found = list(range(start, start + len(ids)))
                break
        if found is None:
            raise ConceptError(f"The concept '{name}' is not in the prompt. The prompt's tokens are: "
                               f"{describe_tokens(flat, word_positions, describe_token)}. Use one of these "
                               f"words, or give token_indices.")
        positions.append(found)
    return positions, word_positions


def describe_tokens(flat: list[int], word_positions: list[int], describe_token=str) -> str:
    return ", ".join(f"{p}:{describe_token(flat[p])}" for p in word_positions)


def layer_size(original_shape, tokens: int) -> tuple[int, int]:
    """The (h, w) of a layer with `tokens` queries, from the latent's shape (stride-2 downsampling)."""
    if not original_shape:
        side = int(round(tokens ** 0.5))
        return side, tokens // side
    h, w = original_shape[-2], original_shape[-1]
    while h * w > tokens:
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def cross_attention_blocks(diffusion_model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(block name, index, resolution level) of each UNet block holding cross-attention, where the
    level counts the downsamplings (0 = latent size). Read off the module tree by class name."""
    def has_cross_attention(module):
        return any(getattr(m, "attn2", None) is not None for m in module.modules())

    def count(module, name):
        return sum(type(m).__name__ == name for m in module.modules())

    found, level = [], 0
    for i, block in enumerate(getattr(diffusion_model, "input_blocks", [])):
        if has_cross_attention(block):
            found.append(("input", i, level))
        level += count(block, "Downsample")
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None and has_cross_attention(middle):
        found.append(("middle", 0, level))
    for i, block in enumerate(getattr(diffusion_model, "output_blocks", [])):
        if has_cross_attention(block):
            found.append(("output", i, level))
        level -= count(block, "Upsample")
    return found


def capture_layer_count(diffusion_model: torch.nn.Module, blocks: list[tuple[str, int]]) -> int:
    """How many cross-attention layers (modules with an attn2) the given (block name, index) blocks hold: the
    number of maps one UNet pass captures there, so the last capture layer is known when it runs."""
    def block(name, index):
        if name == "middle":
            return getattr(diffusion_model, "middle_block", None)
        blocks_of = getattr(diffusion_model, f"{name}_blocks", None)
        return blocks_of[index] if blocks_of is not None and index < len(blocks_of) else None

    found = (block(name, index) for name, index in blocks)
    return sum(getattr(m, "attn2", None) is not None for b in found if b is not None for m in b.modules())


def capture_blocks(diffusion_model: torch.nn.Module, target_level: int = 2) -> list[tuple[str, int]]:
    """The blocks nearest a quarter of the latent's side (16x16 for SD1.x at 512 px, 32x32 for SDXL at
    1024 px, the layers A-STAR and Attend-and-Excite read): every cross-attention block at the level
    closest to `target_level` downsamplings."""
    blocks = cross_attention_blocks(diffusion_model)
    if not blocks:
        return []
    levels = sorted({lvl for _, _, lvl in blocks}, key=lambda lvl: (abs(lvl - target_level), -lvl))
    return [(name, index) for name, index, lvl in blocks if lvl == levels[0]]
