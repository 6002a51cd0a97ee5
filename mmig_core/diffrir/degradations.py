"""Training degradations of DiffRIR (LLMGA Eqs. 8-9) and the masks it trains with.

I_LQ = D_2(D_1(I_GT)):
- D_1, the real-world degradation of Real-ESRGAN, here at scale 1 (the output keeps the input's
  size): two rounds of blur -> resize -> noise -> JPEG, then a resize back. Simplified from
  Real-ESRGAN where noted: isotropic and anisotropic Gaussian kernels only (no generalised/plateau/
  sinc kernels), Gaussian and Poisson-like noise, kornia's differentiable JPEG.
- D_2(x) = c_1·x + c_2, c_1 ~ U[0.94, 1.06] (contrast), c_2 ~ U[-0.05, 0.05] (brightness), one pair
  per image and the same for R, G and B. No clamping inside D_2, so it is exactly Eq. 8; the LQ
  image is clamped to [0, 1] afterwards.

Masks are [B, 1, H, W] with 1 where content is (re)generated: irregular brush strokes, boxes, and
outpainting borders.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CONTRAST_RANGE = (0.94, 1.06)
BRIGHTNESS_RANGE = (-0.05, 0.05)


@dataclass(frozen=True)
class RealDegradation:
    """Ranges of D_1 (Real-ESRGAN's first and second rounds, scale 1)."""
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    kernel_size: int = 21
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    noise_sigma: tuple[float, float] = (1 / 255, 30 / 255)
    noise_sigma2: tuple[float, float] = (1 / 255, 25 / 255)
    poisson_prob: float = 0.5
    jpeg_quality: tuple[float, float] = (30.0, 95.0)
    second_blur_prob: float = 0.8


def _uniform(low: float, high: float, n: int, generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device="cpu").to(device)


def gaussian_kernels(sigma_x, sigma_y, theta, size: int) -> torch.Tensor:
    """[B, size, size] normalised anisotropic Gaussian kernels, one per image."""
    r = torch.arange(size, dtype=torch.float32, device=sigma_x.device) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u = cos * xx + sin * yy
    v = -sin * xx + cos * yy
    k = torch.exp(-0.5 * ((u / sigma_x[:, None, None]) ** 2 + (v / sigma_y[:, None, None]) ** 2))
    return k / k.sum(dim=(1, 2), keepdim=True)


def random_blur(x, sigma_range, size, generator):
    b = x.shape[0]
    sigma_x = _uniform(*sigma_range, b, generator, x.device)
    isotropic = torch.rand(b, generator=generator) < 0.65
    sigma_y = torch.where(isotropic.to(x.device), sigma_x, _uniform(*sigma_range, b, generator, x.device))
    theta = _uniform(0, math.pi, b, generator, x.device)
    kernels = gaussian_kernels(sigma_x, sigma_y, theta, size).to(x.dtype)
    c = x.shape[1]
    padded = F.pad(x, [size // 2] * 4, mode="reflect") if min(x.shape[-2:]) > size // 2 else \
        F.pad(x, [size // 2] * 4, mode="replicate")
    # Grouped conv: each image with its own kernel, each channel separately.
    weight = kernels[:, None].repeat_interleave(c, dim=0)
    out = F.conv2d(padded.reshape(1, b * c, *padded.shape[-2:]), weight, groups=b * c)
    return out.reshape(b, c, *x.shape[-2:])


def random_resize(x, scale_range, generator):
    scale = float(_uniform(*scale_range, 1, generator, "cpu"))
    mode = ["area", "bilinear", "bicubic"][int(torch.randint(3, (1,), generator=generator))]
    h, w = (max(4, round(s * scale)) for s in x.shape[-2:])
    return F.interpolate(x, size=(h, w), mode=mode, **({} if mode == "area" else {"align_corners": False}))


def random_noise(x, sigma_range, poisson_prob, generator):
    b = x.shape[0]
    if float(torch.rand(1, generator=generator)) < poisson_prob:
        # Poisson-like shot noise: variance grows with intensity (Gaussian approximation).
        scale = _uniform(0.05, 3.0, b, generator, x.device)[:, None, None, None]
        std = (x.clamp(min=0) * scale / 10).sqrt() / math.sqrt(25.5)
    else:
        std = _uniform(*sigma_range, b, generator, x.device)[:, None, None, None]
    grey = torch.rand(b, generator=generator).to(x.device)[:, None, None, None] < 0.4
    noise = torch.randn(x.shape, generator=generator).to(x)
    noise = torch.where(grey, noise[:, :1].expand_as(noise), noise)
    return x + noise * std


def random_jpeg(x, quality_range, generator):
    from kornia.enhance import jpeg_codec_differentiable
    quality = _uniform(*quality_range, x.shape[0], generator, x.device).to(x.dtype)
    h, w = x.shape[-2:]
    padded = F.pad(x.clamp(0, 1), (0, (-w) % 16, 0, (-h) % 16), mode="replicate")  # kornia wants 16x16 blocks
    return jpeg_codec_differentiable(padded, quality)[..., :h, :w]


def degrade_real(x: torch.Tensor, generator: torch.Generator | None = None,
                 ranges: RealDegradation = RealDegradation()) -> torch.Tensor:
    """D_1: [B, 3, H, W] in 0..1 -> same size, degraded as in Real-ESRGAN (two rounds, scale 1)."""
    h, w = x.shape[-2:]
    y = random_blur(x, ranges.blur_sigma, ranges.kernel_size, generator)
    y = random_resize(y, ranges.resize_range, generator)
    y = random_noise(y, ranges.noise_sigma, ranges.poisson_prob, generator)
    y = random_jpeg(y, ranges.jpeg_quality, generator)
    if float(torch.rand(1, generator=generator)) < ranges.second_blur_prob:
        y = random_blur(y, ranges.blur_sigma2, ranges.kernel_size, generator)
    y = random_resize(y, ranges.resize_range2, generator)
    y = random_noise(y, ranges.noise_sigma2, ranges.poisson_prob, generator)
    y = F.interpolate(y, size=(h, w), mode="bicubic", align_corners=False)
    return random_jpeg(y, ranges.jpeg_quality, generator).clamp(0, 1)


def sample_color_disturbance(batch: int, generator: torch.Generator | None = None):
    """(c_1, c_2) of Eq. 8, one pair per image, each [B]."""
    contrast = _uniform(*CONTRAST_RANGE, batch, generator, "cpu")
    brightness = _uniform(*BRIGHTNESS_RANGE, batch, generator, "cpu")
    return contrast, brightness


def disturb_color(x: torch.Tensor, contrast: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
    """D_2(x) = c_1·x + c_2 (Eq. 8), on all RGB channels alike."""
    return x * contrast.to(x)[:, None, None, None] + brightness.to(x)[:, None, None, None]


def degrade(gt: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """I_LQ = D_2(D_1(I_GT)) (Eq. 9), clamped to [0, 1]."""
    contrast, brightness = sample_color_disturbance(gt.shape[0], generator)
    return disturb_color(degrade_real(gt, generator), contrast, brightness).clamp(0, 1)


# ---- masks: [B, 1, H, W], 1 = the region that was (re)generated ---------------------------------

def box_masks(batch, height, width, generator=None, min_frac=0.1, max_frac=0.5):
    masks = torch.zeros(batch, 1, height, width)
    for i in range(batch):
        bh = max(1, int(height * float(_uniform(min_frac, max_frac, 1, generator, "cpu"))))
        bw = max(1, int(width * float(_uniform(min_frac, max_frac, 1, generator, "cpu"))))
        top = int(torch.randint(0, height - bh + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - bw + 1, (1,), generator=generator))
        masks[i, 0, top:top + bh, left:left + bw] = 1
    return masks


def outpaint_masks(batch, height, width, generator=None, max_frac=0.4):
    """Borders: each side gets a margin of 0..max_frac of the size; at least one side is non-zero."""
    masks = torch.zeros(batch, 1, height, width)
    for i in range(batch):
        fracs = _uniform(0.0, max_frac, 4, generator, "cpu") * (torch.rand(4, generator=generator) < 0.5)
        if fracs.sum() == 0:
            fracs[int(torch.randint(4, (1,), generator=generator))] = max_frac / 2
        top, bottom = max(int(fracs[0] * height), int(fracs[0] > 0)), max(int(fracs[1] * height), int(fracs[1] > 0))
        left, right = max(int(fracs[2] * width), int(fracs[2] > 0)), max(int(fracs[3] * width), int(fracs[3] > 0))
        masks[i, 0, :top] = 1
        masks[i, 0, height - bottom:height] = 1 if bottom else 0
        masks[i, 0, :, :left] = 1
        if right:
            masks[i, 0, :, width - right:] = 1
    return masks


def irregular_masks(batch, height, width, generator=None, strokes=(2, 6), thickness=(0.03, 0.1)):
    """Free-form brush strokes: thick polylines with random vertices (as in inpainting benchmarks)."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    masks = torch.zeros(batch, 1, height, width)
    size = float(min(height, width))
    for i in range(batch):
        for _ in range(int(torch.randint(strokes[0], strokes[1] + 1, (1,), generator=generator))):
            radius = max(1.0, size * float(_uniform(*thickness, 1, generator, "cpu")))
            points = torch.rand(int(torch.randint(2, 6, (1,), generator=generator)), 2, generator=generator)
            points = points * torch.tensor([height - 1, width - 1])
            for a, b in zip(points[:-1], points[1:]):
                d = b - a
                t = (((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / d.dot(d).clamp(min=1e-6)).clamp(0, 1)
                dist2 = (yy - a[0] - t * d[0]) ** 2 + (xx - a[1] - t * d[1]) ** 2
                masks[i, 0][dist2 <= radius ** 2] = 1
    return masks


def random_masks(batch, height, width, generator=None):
    """A mix of the three kinds, chosen per image."""
    kinds = torch.randint(3, (batch,), generator=generator)
    makers = (irregular_masks, box_masks, outpaint_masks)
    return torch.cat([makers[int(k)](1, height, width, generator) for k in kinds])
