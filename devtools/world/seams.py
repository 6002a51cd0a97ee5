"""Inpainting/outpainting seams on world images: the data DiffRIR learns and the benchmark scores it on.

A seam sample is a clean world image whose masked region (an inpaint mask or an outpaint border) was
"redrawn" the way a diffusion inpainting pass redraws it: the same content, but
- with a colour/brightness shift over the whole region (a contrast gain, a brightness offset and a
  per-channel colour cast, as the VAE/sampler drift of a real pass gives),
- blended into the kept pixels over a soft inward ramp (a feathered transition),
- blurred and noisy in a band along the region's boundary (where real seams show texture breaks).
Outside the mask the image is the reference itself (what the host's inpainting and DiffRIR's paste-back
keep), so all the damage lies inside the mask and the seam band is measured there.

Masks mix four kinds: a dilated object mask (inpaint one object), a box, free-form strokes (the DiffRIR
training masks, `mmig_core.diffrir.degradations`) and an outpainting border.

Everything is torch on the CPU, drawn from one `torch.Generator`, so the recipe's per-sample seeds make
every sample reproducible. Images are [3, H, W] float in 0..1, masks [H, W] float with 1 = redrawn.

The colour-transfer baseline (`colour_transfer`) is the classic seam fix DiffRIR is compared with: the
region's per-channel mean and standard deviation matched to those of a ring of kept pixels around it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mmig_core.diffrir.degradations import box_masks, irregular_masks, outpaint_masks

from . import render, sample_scene

BAND = 6  # seam band: pixels inside the mask within this many pixels of its boundary
RING = 8  # colour transfer: the kept pixels within this many pixels of the mask are its "surroundings"
MASK_KINDS = ("object", "box", "irregular", "outpaint")
# Shift ranges (fractions of full scale). Real inpainting seams are a few percent off in tone.
CONTRAST = (0.88, 1.12)
BRIGHTNESS = (-0.08, 0.08)
COLOUR_CAST = (-0.06, 0.06)
FEATHER = (1.0, 4.0)  # px, the inward ramp from kept to redrawn
BAND_BLUR = (0.6, 1.8)  # Gaussian sigma (px) in the boundary band
BAND_NOISE = (3.0, 12.0)  # Gaussian noise sigma (8-bit levels) in the boundary band


def _uniform(low: float, high: float, generator: torch.Generator, n: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """[H, W] 0/1 -> 0/1, grown by `radius` px (square structuring element)."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]


def erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """[H, W] 0/1 -> 0/1, shrunk by `radius` px; the image border counts as inside (so an outpainting
    border's outer edge is not a seam)."""
    if radius <= 0:
        return mask
    padded = F.pad(mask[None, None], [radius] * 4, mode="replicate")
    return -F.max_pool2d(-padded, 2 * radius + 1, stride=1)[0, 0]


def seam_band(mask: torch.Tensor, width: int = BAND) -> torch.Tensor:
    """Boolean [H, W]: the redrawn pixels within `width` px of a kept pixel."""
    mask = (mask >= 0.5).float()
    return (mask - erode(mask, width)) > 0.5


def surroundings(mask: torch.Tensor, width: int = RING) -> torch.Tensor:
    """Boolean [H, W]: the kept pixels within `width` px of the mask."""
    mask = (mask >= 0.5).float()
    return (dilate(mask, width) - mask) > 0.5


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """[C, H, W] blurred with a separable Gaussian (reflect padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], [radius, radius, 0, 0], mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    y = F.pad(y, [0, 0, radius, radius], mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)[0]


def _distance_inside(mask: torch.Tensor, limit: int) -> torch.Tensor:
    """Chessboard distance (px, capped at `limit`) from each redrawn pixel to the nearest kept pixel; 0 outside."""
    distance = torch.zeros_like(mask)
    current = mask
    for step in range(1, limit + 1):
        current = erode(current, 1)
        distance = distance + current
    return distance * mask


def object_mask(masks: list[np.ndarray], generator: torch.Generator, size: int) -> torch.Tensor:
    """One object's mask (or the background where there is none), dilated by 2..8 px: inpaint that object."""
    if not masks:
        return box_masks(1, size, size, generator)[0, 0]
    chosen = torch.from_numpy(masks[int(torch.randint(len(masks), (1,), generator=generator))].astype(np.float32))
    return dilate(chosen, int(torch.randint(2, 9, (1,), generator=generator)))


def random_seam_mask(masks: list[np.ndarray], generator: torch.Generator, size: int,
                     kind: str | None = None) -> torch.Tensor:
    """A [size, size] 0/1 mask of one of MASK_KINDS (drawn when `kind` is None); never empty nor full."""
    kind = kind or MASK_KINDS[int(torch.randint(len(MASK_KINDS), (1,), generator=generator))]
    for _ in range(8):
        if kind == "object":
            mask = object_mask(masks, generator, size)
        elif kind == "box":
            mask = box_masks(1, size, size, generator, min_frac=0.2, max_frac=0.6)[0, 0]
        elif kind == "irregular":
            mask = irregular_masks(1, size, size, generator, strokes=(1, 4), thickness=(0.05, 0.12))[0, 0]
        elif kind == "outpaint":
            mask = outpaint_masks(1, size, size, generator, max_frac=0.35)[0, 0]
        else:
            raise ValueError(f"unknown seam mask kind {kind!r}; one of {', '.join(MASK_KINDS)}")
        covered = float(mask.mean())
        if 0.02 < covered < 0.85 and bool(seam_band(mask).any()):
            return mask
    mask = torch.zeros(size, size)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    return mask


def redraw(clean: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The seamed image: `clean` [3, H, W] with the region `mask` [H, W] redrawn shifted, feathered, and
    blurred + noisy along its boundary; kept pixels unchanged; rounded to 8 bits."""
    contrast = float(_uniform(*CONTRAST, generator))
    brightness = float(_uniform(*BRIGHTNESS, generator))
    cast = _uniform(*COLOUR_CAST, generator, 3)[:, None, None]
    shifted = ((clean - 0.5) * contrast + 0.5 + brightness + cast).clamp(0, 1)
    feather = float(_uniform(*FEATHER, generator))
    ramp = (_distance_inside(mask, int(math.ceil(feather)) + 1) / feather).clamp(0, 1)
    out = clean + (shifted - clean) * ramp
    band = seam_band(mask, int(torch.randint(2, BAND + 1, (1,), generator=generator))).float()
    blurred = gaussian_blur(out, float(_uniform(*BAND_BLUR, generator)))
    noise = torch.randn(clean.shape, generator=generator) * float(_uniform(*BAND_NOISE, generator)) / 255
    out = out + (blurred - out + noise) * band
    out = clean + (out - clean) * mask  # blur must not leak kept pixels' damage: outside is the reference
    return ((out.clamp(0, 1) * 255).round() / 255)


def seam_sample(image: np.ndarray, masks: list[np.ndarray], generator: torch.Generator,
                kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seamed [3, H, W], clean [3, H, W], mask [H, W]) from a world image (uint8 HxWx3) and its object masks."""
    clean = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
    mask = random_seam_mask(masks, generator, clean.shape[-1], kind)
    return redraw(clean, mask, generator), clean, mask


def eval_sample(index: int, kind: str | None = None):
    """The benchmark/test sample i: world evaluation scene 1_000_000 + i (never trained on), its seam drawn
    from a generator seeded by the same number. (seamed, clean, mask) as `seam_sample`."""
    seed = 1_000_000 + index
    image, masks = render(sample_scene(seed))
    return seam_sample(image, masks, torch.Generator().manual_seed(seed), kind)


def colour_transfer(seamed: torch.Tensor, mask: torch.Tensor, ring: int = RING) -> torch.Tensor:
    """Baseline: each channel of the masked region affinely mapped so its mean and standard deviation equal those
    of the kept pixels within `ring` px of the mask (Reinhard-style statistics matching, in RGB); kept pixels
    unchanged. Inputs as `redraw`'s."""
    region, around = mask >= 0.5, surroundings(mask, ring)
    if not region.any() or not around.any():
        return seamed.clone()
    out = seamed.clone()
    for c in range(seamed.shape[0]):
        inside, outside = seamed[c][region], seamed[c][around]
        scale = outside.std(unbiased=False) / inside.std(unbiased=False).clamp(min=1e-3)
        out[c][region] = ((inside - inside.mean()) * scale + outside.mean()).clamp(0, 1)
    return out


def band_error(image: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor, width: int = BAND) -> float:
    """Mean absolute error (8-bit levels, over channels) against the clean image in the seam band."""
    band = seam_band(mask, width)
    return float((image - clean).abs().mean(0)[band].mean() * 255)


def region_error(image: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean absolute error (8-bit levels) against the clean image over the whole redrawn region."""
    return float((image - clean).abs().mean(0)[mask >= 0.5].mean() * 255)
