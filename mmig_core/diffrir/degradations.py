"""Training degradations of DiffRIR (LLMGA Eqs. 8-9) and the masks it trains with.

I_LQ = D_2(D_1(I_GT)), then clipped to [0, 1] and rounded to 8 bits, as the official training does
(Zj-BinXia/DiffRIR `DiffRIR/models/DiffIR_S2_model.py`, `feed_data`, at scale 1):
- D_1, the second-order real-world degradation (Real-ESRGAN's), with the ranges and probabilities of
  `options/train_DiffRIRS2_x1.yml` (`RealDegradation`):
  1. blur with a random kernel (7..21 px; iso/aniso Gaussian, generalized Gaussian, plateau, or with
     `sinc_prob` a sinc), resize up/down/keep (`resize_prob`) by `resize_range`, Gaussian noise
     (`gaussian_noise_prob`, sigma in 8-bit levels) or Poisson noise (`poisson_scale_range`), each grey
     with `gray_noise_prob`, clipped; JPEG (`jpeg_range`);
  2. with `second_blur_prob` a second blur (`blur_sigma2`, ...), a resize relative to the ORIGINAL size
     (`resize_prob2`, `resize_range2`), noise of the second round (`noise_range2`, `poisson_scale_range2`);
  3. 50/50 either [resize back + final sinc filter] then JPEG, or JPEG then [resize back + sinc]; the final
     sinc is a sinc kernel with `final_sinc_prob`, else the identity.
  Per image: kernels, noise sigma/scale, grey-or-colour, JPEG quality. Per batch (as the official code,
  which draws them once per batch): resize direction, scale and mode, Gaussian-or-Poisson, final order.
  Kernels, noise and JPEG are computed as basicsr's (`random_mixed_kernels`, `circular_lowpass_kernel`,
  `random_add_*_noise_pt`, `DiffJPEG(differentiable=False)`), written here from their definitions; kernels
  and JPEG are tested against basicsr's own outputs (tests/conformance/diffrir_basicsr/).
- D_2(x) = c_1·x + c_2, c_1 ~ U[0.94, 1.06] (contrast), c_2 ~ U[-0.05, 0.05] (brightness), one pair
  per image and the same for R, G and B, clipped (the official `add_lumi_error`).

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
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


@dataclass(frozen=True)
class RealDegradation:
    """D_1's ranges and probabilities: the official x1 training options (noise sigmas in 8-bit levels)."""
    # Blur kernels (the official dataset's part), drawn per image.
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    final_sinc_prob: float = 0.8
    # The first round.
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # The second round.
    second_blur_prob: float = 0.8
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)


def _uniform(low: float, high: float, n: int, generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device="cpu").to(device)


def _chance(p: float, generator) -> bool:
    return float(torch.rand(1, generator=generator)) < p


def _choice(weights, generator) -> int:
    return int(torch.multinomial(torch.tensor(weights, dtype=torch.float64), 1, generator=generator))


# ---- kernels: [size, size] float64, normalised ------------------------------------------------------

def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """d^T Σ^-1 d on the kernel grid, Σ = R diag(σx², σy²) R^T (rotation θ)."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    cos, sin = math.cos(theta), math.sin(theta)
    u = cos * xx + sin * yy   # coordinates along the rotated axes
    v = -sin * xx + cos * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def kernel_from_params(kind: str, size: int, sigma_x: float, sigma_y: float, theta: float,
                       beta: float = 1.0) -> torch.Tensor:
    """basicsr's bivariate Gaussian / generalized Gaussian (exp(-q^β / 2)) / plateau (1 / (1 + q^β)) kernel,
    normalised; iso kinds use sigma_x on both axes and no rotation."""
    if not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    q = _quadratic_form(size, sigma_x, sigma_y, theta)
    if kind.startswith("generalized"):
        kernel = torch.exp(-0.5 * q ** beta)
    elif kind.startswith("plateau"):
        kernel = 1 / (q ** beta + 1)
    else:
        kernel = torch.exp(-0.5 * q)
    return kernel / kernel.sum()


def mixed_kernel(kind: str, size: int, sigma_range, betag_range, betap_range, generator) -> torch.Tensor:
    """A kernel of one of KERNEL_TYPES, its parameters drawn as basicsr's `random_mixed_kernels` draws them."""
    sigma_x = float(_uniform(*sigma_range, 1, generator, "cpu"))
    sigma_y, theta = sigma_x, 0.0
    if kind.endswith("aniso"):
        sigma_y = float(_uniform(*sigma_range, 1, generator, "cpu"))
        theta = float(_uniform(-math.pi, math.pi, 1, generator, "cpu"))
    beta = 1.0
    if kind.startswith(("generalized", "plateau")):
        low, high = betag_range if kind.startswith("generalized") else betap_range
        beta = float(_uniform(low, 1.0, 1, generator, "cpu") if _chance(0.5, generator)
                     else _uniform(1.0, high, 1, generator, "cpu"))
    return kernel_from_params(kind, size, sigma_x, sigma_y, theta, beta)


def sinc_kernel(cutoff: float, size: int) -> torch.Tensor:
    """The circular low-pass (2-D sinc) kernel of Real-ESRGAN: cutoff·J1(cutoff·r) / (2π r), normalised."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    radius = (r[:, None] ** 2 + r[None, :] ** 2).sqrt()
    kernel = cutoff * torch.special.bessel_j1(cutoff * radius) / (2 * math.pi * radius)
    kernel[(size - 1) // 2, (size - 1) // 2] = cutoff ** 2 / (4 * math.pi)
    return kernel / kernel.sum()


def _pad_kernel(kernel: torch.Tensor, size: int = 21) -> torch.Tensor:
    pad = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, [pad] * 4)


def random_blur_kernel(ranges: RealDegradation, generator, second: bool = False) -> torch.Tensor:
    """One image's blur kernel of round 1 or 2, zero-padded to 21x21 (the official dataset's kernel1/kernel2)."""
    size = ranges.kernel_sizes[int(torch.randint(len(ranges.kernel_sizes), (1,), generator=generator))]
    sinc_prob = ranges.sinc_prob2 if second else ranges.sinc_prob
    if _chance(sinc_prob, generator):
        low = math.pi / 3 if size < 13 else math.pi / 5
        return _pad_kernel(sinc_kernel(float(_uniform(low, math.pi, 1, generator, "cpu")), size))
    kinds, probs = (ranges.kernel_list2, ranges.kernel_prob2) if second else (ranges.kernel_list, ranges.kernel_prob)
    sigma = ranges.blur_sigma2 if second else ranges.blur_sigma
    betag, betap = (ranges.betag_range2, ranges.betap_range2) if second else (ranges.betag_range, ranges.betap_range)
    kind = kinds[_choice(probs, generator)]
    return _pad_kernel(mixed_kernel(kind, size, sigma, betag, betap, generator))


def final_sinc_kernel(ranges: RealDegradation, generator) -> torch.Tensor:
    """With `final_sinc_prob` a sinc kernel (cutoff U[π/3, π]), else the identity, 21x21."""
    if _chance(ranges.final_sinc_prob, generator):
        size = ranges.kernel_sizes[int(torch.randint(len(ranges.kernel_sizes), (1,), generator=generator))]
        return _pad_kernel(sinc_kernel(float(_uniform(math.pi / 3, math.pi, 1, generator, "cpu")), size))
    pulse = torch.zeros(21, 21, dtype=torch.float64)
    pulse[10, 10] = 1
    return pulse


def filter2d(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each image filtered with its own kernel ([B, k, k]), every channel alike, reflect-padded."""
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    mode = "reflect" if min(h, w) > k // 2 else "replicate"
    padded = F.pad(x, [k // 2] * 4, mode=mode)
    weight = kernels.to(x)[:, None].repeat_interleave(c, dim=0)
    return F.conv2d(padded.reshape(1, b * c, *padded.shape[-2:]), weight, groups=b * c).reshape(b, c, h, w)


# ---- resize, noise, JPEG ---------------------------------------------------------------------------

_MODES = ("area", "bilinear", "bicubic")


def _interpolate(x, size, generator, scale_factor=None):
    """A resize with a random mode (area, bilinear, bicubic), to `size` or by `scale_factor` as the official
    round 1 does (the output is floor(side · scale), the sampling grid follows the scale itself)."""
    mode = _MODES[int(torch.randint(3, (1,), generator=generator))]
    options = {} if mode == "area" else {"align_corners": False}
    if scale_factor is not None:
        return F.interpolate(x, scale_factor=scale_factor, mode=mode, **options)
    return F.interpolate(x, size=size, mode=mode, **options)


def random_scale(prob, scale_range, generator) -> float:
    """Up (U[1, high]), down (U[low, 1]) or keep (1), with the probabilities `prob` (up, down, keep)."""
    direction = _choice(prob, generator)
    if direction == 0:
        return float(_uniform(1.0, scale_range[1], 1, generator, "cpu"))
    if direction == 1:
        return float(_uniform(scale_range[0], 1.0, 1, generator, "cpu"))
    return 1.0


def _to_gray(x):
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def gaussian_noise(x, sigma_range, gray_prob, generator):
    """basicsr's Gaussian noise: sigma ~ U(sigma_range) / 255 per image, grey (one channel) with gray_prob."""
    b = x.shape[0]
    sigma = (_uniform(*sigma_range, b, generator, x.device) / 255).to(x)[:, None, None, None]
    gray = (torch.rand(b, generator=generator) < gray_prob).to(x)[:, None, None, None]
    noise = torch.randn(x.shape, generator=generator).to(x) * sigma
    noise_gray = torch.randn((b, 1, *x.shape[-2:]), generator=generator).to(x) * sigma
    return noise * (1 - gray) + noise_gray * gray


def poisson_noise(x, scale_range, gray_prob, generator):
    """basicsr's Poisson (shot) noise on the 8-bit image: counts of 2^ceil(log2(distinct values)) levels,
    times a scale ~ U(scale_range) per image, grey with gray_prob."""
    b = x.shape[0]
    scale = _uniform(*scale_range, b, generator, x.device).to(x)[:, None, None, None]
    gray = (torch.rand(b, generator=generator) < gray_prob).to(x)[:, None, None, None]
    noise = shot_noise(x, generator)
    if bool(gray.any()):
        noise = noise * (1 - gray) + shot_noise(_to_gray(x), generator).expand_as(noise) * gray
    return noise * scale


def shot_noise(img, generator):
    """Unscaled Poisson noise of basicsr's `generate_poisson_noise_pt`: the 8-bit image as counts of
    2^ceil(log2(its number of distinct values)) levels, Poisson-sampled, minus the image."""
    img = (img * 255).round().clamp(0, 255) / 255
    vals = torch.tensor([2.0 ** math.ceil(math.log2(len(torch.unique(i)))) for i in img],
                        dtype=img.dtype)[:, None, None, None]
    counts = torch.poisson(img.cpu() * vals, generator=generator)
    return (counts / vals).to(img) - img


def random_noise(x, gaussian_prob, sigma_range, poisson_range, gray_prob, generator):
    """Gaussian (with gaussian_prob) or Poisson noise for the batch, then clipped to [0, 1]."""
    if _chance(gaussian_prob, generator):
        noise = gaussian_noise(x, sigma_range, gray_prob, generator)
    else:
        noise = poisson_noise(x, poisson_range, gray_prob, generator)
    return (x + noise).clamp(0, 1)


# The JPEG luminance and chrominance quantisation tables (ITU-T T.81 Annex K), as [row, column]; used
# transposed, as basicsr's DiffJPEG (and so the official training) applies them.
_Y_TABLE = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_C_TABLE = torch.full((8, 8), 99.0)
_C_TABLE[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])


def _dct_basis() -> torch.Tensor:
    """[8, 8] orthonormal DCT-II matrix D, so that D @ block @ D.T is the 2-D DCT of a block."""
    k = torch.arange(8, dtype=torch.float64)
    basis = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * 0.5
    basis[0] /= math.sqrt(2)
    return basis.float()


def quality_to_factor(quality: torch.Tensor) -> torch.Tensor:
    """The IJG scaling of the quantisation tables: 5000/q below 50, else 200 - 2q, in percent."""
    return torch.where(quality < 50, 5000 / quality, 200 - 2 * quality) / 100


def jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG compression and decompression of [B, 3, H, W] in 0..1, one quality per image, as Real-ESRGAN's
    (basicsr's DiffJPEG with differentiable=False): YCbCr, 4:2:0 chroma by 2x2 means, 8x8 DCT, quantisation
    by the tables scaled for the quality with true rounding, nearest chroma upsampling, clipped to [0, 1].
    Images are zero-padded to multiples of 16 and cropped back."""
    b, _, h, w = x.shape
    x = F.pad(x, (0, (-w) % 16, 0, (-h) % 16))
    to_ycbcr = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
    ycbcr = torch.einsum("bchw,dc->bdhw", x * 255, to_ycbcr.to(x)) + torch.tensor([0.0, 128, 128]).to(x)[:, None, None]
    factor = quality_to_factor(quality.to(x))[:, None, None, None, None]
    dct = _dct_basis().to(x)
    planes = []
    for channel in range(3):
        plane = ycbcr[:, channel]
        if channel:
            plane = F.avg_pool2d(plane[:, None], 2)[:, 0]
        ph, pw = plane.shape[-2:]
        blocks = plane.reshape(b, ph // 8, 8, pw // 8, 8).permute(0, 1, 3, 2, 4) - 128  # [B, by, bx, 8, 8]
        table = (_C_TABLE if channel else _Y_TABLE).T.to(x) * factor
        coefficients = torch.round(dct @ blocks @ dct.T / table) * table
        plane = (dct.T @ coefficients @ dct + 128).permute(0, 1, 3, 2, 4).reshape(b, ph, pw)
        if channel:
            plane = plane.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        planes.append(plane)
    to_rgb = torch.tensor([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]])
    shifted = torch.stack(planes, 1) - torch.tensor([0.0, 128, 128]).to(x)[:, None, None]
    rgb = torch.einsum("bchw,dc->bdhw", shifted, to_rgb.to(x))
    return (rgb.clamp(0, 255) / 255)[..., :h, :w]


def random_jpeg(x, quality_range, generator):
    """JPEG at a quality ~ U(quality_range) per image, of the clipped image."""
    quality = _uniform(*quality_range, x.shape[0], generator, x.device)
    return jpeg(x.clamp(0, 1), quality)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """The official last step: clip and round to 8-bit levels."""
    return (x * 255).round().clamp(0, 255) / 255


def degrade_real(x: torch.Tensor, generator: torch.Generator | None = None,
                 ranges: RealDegradation = RealDegradation()) -> torch.Tensor:
    """D_1: [B, 3, H, W] in 0..1 -> the same size, the official second-order degradation (not yet rounded)."""
    b, _, h, w = x.shape
    kernels1 = torch.stack([random_blur_kernel(ranges, generator) for _ in range(b)])
    kernels2 = torch.stack([random_blur_kernel(ranges, generator, second=True) for _ in range(b)])
    sinc = torch.stack([final_sinc_kernel(ranges, generator) for _ in range(b)])
    # Round 1.
    y = filter2d(x, kernels1)
    scale = max(random_scale(ranges.resize_prob, ranges.resize_range, generator), 1 / min(h, w))
    y = _interpolate(y, None, generator, scale_factor=scale)
    y = random_noise(y, ranges.gaussian_noise_prob, ranges.noise_range, ranges.poisson_scale_range,
                     ranges.gray_noise_prob, generator)
    y = random_jpeg(y, ranges.jpeg_range, generator)
    # Round 2: the resize is relative to the original size.
    if _chance(ranges.second_blur_prob, generator):
        y = filter2d(y, kernels2)
    scale = random_scale(ranges.resize_prob2, ranges.resize_range2, generator)
    y = _interpolate(y, (max(1, int(h * scale)), max(1, int(w * scale))), generator)
    y = random_noise(y, ranges.gaussian_noise_prob2, ranges.noise_range2, ranges.poisson_scale_range2,
                     ranges.gray_noise_prob2, generator)
    # The two final orders, 50/50.
    if _chance(0.5, generator):
        y = filter2d(_interpolate(y, (h, w), generator), sinc)
        y = random_jpeg(y, ranges.jpeg_range2, generator)
    else:
        y = random_jpeg(y, ranges.jpeg_range2, generator)
        y = filter2d(_interpolate(y, (h, w), generator), sinc)
    return y


def sample_color_disturbance(batch: int, generator: torch.Generator | None = None):
    """(c_1, c_2) of Eq. 8, one pair per image, each [B]."""
    contrast = _uniform(*CONTRAST_RANGE, batch, generator, "cpu")
    brightness = _uniform(*BRIGHTNESS_RANGE, batch, generator, "cpu")
    return contrast, brightness


def disturb_color(x: torch.Tensor, contrast: torch.Tensor, brightness: torch.Tensor) -> torch.Tensor:
    """D_2(x) = c_1·x + c_2 (Eq. 8), on all RGB channels alike."""
    return x * contrast.to(x)[:, None, None, None] + brightness.to(x)[:, None, None, None]


def degrade(gt: torch.Tensor, generator: torch.Generator | None = None,
            ranges: RealDegradation = RealDegradation()) -> torch.Tensor:
    """I_LQ = D_2(D_1(I_GT)) (Eq. 9), clipped and rounded to 8 bits as the official training does."""
    contrast, brightness = sample_color_disturbance(gt.shape[0], generator)
    return quantize_8bit(disturb_color(degrade_real(gt, generator, ranges), contrast, brightness).clamp(0, 1))


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
