"""The DiffRIR network (LLMGA §3.4, Eq. 7): DiffIR's restorer with the masked reference as extra input.

Input: concat(I_LQ, (1 - M)·I_ref), 6 channels, pixel-unshuffled by 4 (DiffIR's real-world x1 variant).
A Restormer-style U-Net (channel-attention transformer blocks, gated depthwise feed-forward) restores
it; every block scales and shifts its normalised features by a linear map of a compact 256-d prior.

Where the prior comes from:
- stage one (training only): `PriorEncoder` (CPEN) sees the input and the ground truth; this is the
  teacher prior;
- stage two (what ships): another CPEN sees the input only and conditions a 4-step diffusion chain
  over the prior vector (`DiffusionPrior`); the chain starts from noise, predicts x0 at each step and
  takes the posterior mean, as DiffIR does.

As the official DIRformer/DiffRIRS2 (Zj-BinXia/DiffRIR, `DiffRIR/archs/S2_arch.py`), checked against it
by tests/conformance/test_conformance_diffrir.py:
- the output's residual skip adds the *generated* image (the first 3 input channels);
- each level's feed-forward width is int(width · ffn_expansion_factor), so at 2.2 the ratio differs
  per level (140, 281, 563, 1126 at width 64);
- the prior is computed once per image, on the whole (padded) image; the pack's tiled path then runs the
  restorer per tile with that one prior (`prior_features` is the pre-pooling map, so tiles sum it exactly).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiffRIRConfig


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a [B, C, H, W] map; bias-free as in the published DiffRIR config."""

    def __init__(self, channels: int, with_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if with_bias else None

    def forward(self, x):
        variance = x.var(dim=1, keepdim=True, unbiased=False)
        if self.bias is None:  # bias-free: scale only, the mean is kept
            return x * torch.rsqrt(variance + 1e-5) * self.weight[:, None, None]
        centred = x - x.mean(dim=1, keepdim=True)
        return centred * torch.rsqrt(variance + 1e-5) * self.weight[:, None, None] + self.bias[:, None, None]


class PriorModulation(nn.Module):
    """x · a(z) + b(z): a per-channel scale and shift computed from the prior vector z."""

    def __init__(self, prior_dim: int, channels: int):
        super().__init__()
        self.to_scale_shift = nn.Linear(prior_dim, 2 * channels, bias=False)

    def forward(self, x, prior):
        scale, shift = self.to_scale_shift(prior)[:, :, None, None].chunk(2, dim=1)
        return x * scale + shift


class ChannelAttention(nn.Module):
    """Restormer's transposed attention: heads attend across channels, so cost is linear in pixels."""

    def __init__(self, dim: int, heads: int, bias: bool, prior_dim: int):
        super().__init__()
        self.heads = heads
        self.modulation = PriorModulation(prior_dim, dim)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=bias)
        self.qkv_depthwise = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x, prior):
        b, c, h, w = x.shape
        q, k, v = self.qkv_depthwise(self.qkv(self.modulation(x, prior))).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attention = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out((attention @ v).reshape(b, c, h, w))


class GatedFeedForward(nn.Module):
    """Restormer's gated depthwise feed-forward: GELU(a) · b after a 3x3 depthwise conv."""

    def __init__(self, dim: int, expansion: float, bias: bool, prior_dim: int):
        super().__init__()
        hidden = int(dim * expansion)
        self.modulation = PriorModulation(prior_dim, dim)
        self.project_in = nn.Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.depthwise = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x, prior):
        gate, value = self.depthwise(self.project_in(self.modulation(x, prior))).chunk(2, dim=1)
        return self.project_out(F.gelu(gate) * value)


class PriorModulatedBlock(nn.Module):
    def __init__(self, dim: int, heads: int, config: DiffRIRConfig):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, config.layernorm_with_bias)
        self.attn = ChannelAttention(dim, heads, config.bias, config.prior_dim)
        self.norm2 = LayerNorm2d(dim, config.layernorm_with_bias)
        self.ffn = GatedFeedForward(dim, config.ffn_expansion_factor, config.bias, config.prior_dim)

    def forward(self, x, prior):
        x = x + self.attn(self.norm1(x), prior)
        return x + self.ffn(self.norm2(x), prior)


class BlockStack(nn.ModuleList):
    def __init__(self, count: int, dim: int, heads: int, config: DiffRIRConfig):
        super().__init__(PriorModulatedBlock(dim, heads, config) for _ in range(count))

    def forward(self, x, prior):
        for block in self:
            x = block(x, prior)
        return x


def _downsample(dim: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


def _upsample(dim: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))


class Restorer(nn.Module):
    """The 4-level U-Net of prior-modulated blocks; output = generated image + predicted residual."""

    def __init__(self, config: DiffRIRConfig):
        super().__init__()
        d, n, h = config.dim, config.num_blocks, config.heads
        self.image_channels = config.image_channels
        self.unshuffle = nn.PixelUnshuffle(config.unshuffle)
        self.embed = nn.Conv2d(config.input_channels * config.unshuffle ** 2, d, 3, padding=1, bias=config.bias)
        self.encoder1 = BlockStack(n[0], d, h[0], config)
        self.down1 = _downsample(d)
        self.encoder2 = BlockStack(n[1], 2 * d, h[1], config)
        self.down2 = _downsample(2 * d)
        self.encoder3 = BlockStack(n[2], 4 * d, h[2], config)
        self.down3 = _downsample(4 * d)
        self.latent = BlockStack(n[3], 8 * d, h[3], config)
        self.up3 = _upsample(8 * d)
        self.reduce3 = nn.Conv2d(8 * d, 4 * d, 1, bias=config.bias)
        self.decoder3 = BlockStack(n[2], 4 * d, h[2], config)
        self.up2 = _upsample(4 * d)
        self.reduce2 = nn.Conv2d(4 * d, 2 * d, 1, bias=config.bias)
        self.decoder2 = BlockStack(n[1], 2 * d, h[1], config)
        self.up1 = _upsample(2 * d)  # no channel reduction at level 1: the decoder keeps 2d channels
        self.decoder1 = BlockStack(n[0], 2 * d, h[0], config)
        self.refinement = BlockStack(config.num_refinement_blocks, 2 * d, h[0], config)
        tail = []
        for _ in range(int(math.log2(config.unshuffle))):  # back to full resolution, 2x at a time
            tail += [nn.Conv2d(2 * d, 8 * d, 3, padding=1), nn.PixelShuffle(2)]
        tail.append(nn.Conv2d(2 * d, config.image_channels, 3, padding=1))
        self.tail = nn.Sequential(*tail)

    def forward(self, x, prior):
        level1 = self.encoder1(self.embed(self.unshuffle(x)), prior)
        level2 = self.encoder2(self.down1(level1), prior)
        level3 = self.encoder3(self.down2(level2), prior)
        y = self.latent(self.down3(level3), prior)
        y = self.decoder3(self.reduce3(torch.cat([self.up3(y), level3], 1)), prior)
        y = self.decoder2(self.reduce2(torch.cat([self.up2(y), level2], 1)), prior)
        y = self.decoder1(torch.cat([self.up1(y), level1], 1), prior)
        y = self.refinement(y, prior)
        return self.tail(y) + x[:, :self.image_channels]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.leaky_relu(self.conv1(x), 0.1))


class PriorEncoder(nn.Module):
    """CPEN: convolutions, a global average pool and an MLP map an image stack to the prior vector.

    `features` (everything before the pool) and `head` (the pool's mean onward) are separate so a
    tiled caller can sum the features tile by tile and get exactly the whole image's mean.
    """

    def __init__(self, in_channels: int, config: DiffRIRConfig):
        super().__init__()
        f, p = config.prior_features, config.prior_dim
        self.unshuffle = nn.PixelUnshuffle(config.unshuffle)
        self.stem = nn.Conv2d(in_channels * config.unshuffle ** 2, f, 3, padding=1)
        self.res_blocks = nn.Sequential(*(ResidualBlock(f) for _ in range(config.prior_res_blocks)))
        self.widen = nn.ModuleList([nn.Conv2d(f, 2 * f, 3, padding=1), nn.Conv2d(2 * f, 2 * f, 3, padding=1),
                                    nn.Conv2d(2 * f, p, 3, padding=1)])
        self.mlp = nn.ModuleList([nn.Linear(p, p), nn.Linear(p, p)])

    @staticmethod
    def receptive_radius(config: DiffRIRConfig) -> int:
        """Pixels of context each feature sees on each side, at full resolution."""
        return (1 + 2 * config.prior_res_blocks + 3) * config.unshuffle + config.unshuffle

    def features(self, x):
        y = self.res_blocks(F.leaky_relu(self.stem(self.unshuffle(x)), 0.1))
        for conv in self.widen:
            y = F.leaky_relu(conv(y), 0.1)
        return y

    def head(self, pooled):
        for linear in self.mlp:
            pooled = F.leaky_relu(linear(pooled), 0.1)
        return pooled

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class PriorDenoiser(nn.Module):
    """Predicts the clean prior from a noisy one, the step t and the input's CPEN code (x0-prediction)."""

    def __init__(self, config: DiffRIRConfig):
        super().__init__()
        p = config.prior_dim
        self.max_period = config.timesteps * 10
        self.layers = nn.ModuleList([nn.Linear(2 * p + 1, p)] +
                                    [nn.Linear(p, p) for _ in range(config.denoise_res_blocks)])

    def forward(self, noisy, t, condition):
        t = (t.float() / self.max_period).view(-1, 1).to(noisy.dtype)
        y = torch.cat([condition, t, noisy], dim=1)
        for linear in self.layers:
            y = F.leaky_relu(linear(y), 0.1)
        return y


def beta_schedule(config: DiffRIRConfig) -> torch.Tensor:
    """DDPM's "linear" schedule (linear in sqrt(beta)), in float64."""
    return torch.linspace(config.linear_start ** 0.5, config.linear_end ** 0.5, config.timesteps,
                          dtype=torch.float64) ** 2


class DiffusionPrior(nn.Module):
    """The stage-two prior: a `timesteps`-step reverse chain over the prior vector."""

    def __init__(self, config: DiffRIRConfig):
        super().__init__()
        self.timesteps = config.timesteps
        betas = beta_schedule(config)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Not saved: derived from the config, so the file holds learned weights only.
        for name, value in {
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_x0_coef": betas * previous.sqrt() / (1 - alphas_cumprod),
            "posterior_xt_coef": (1 - previous) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)

    def add_noise(self, prior, noise):
        """q(z_T | z_0): the teacher prior noised to the chain's first step (training)."""
        t = self.timesteps - 1
        return self.sqrt_alphas_cumprod[t] * prior + self.sqrt_one_minus_alphas_cumprod[t] * noise

    def sample(self, denoiser: PriorDenoiser, condition, start, *, return_steps: bool = False):
        z, steps = start, []
        for t in reversed(range(self.timesteps)):
            t_batch = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
            x0 = denoiser(z, t_batch, condition)
            z = self.posterior_x0_coef[t] * x0 + self.posterior_xt_coef[t] * z  # posterior mean, no noise
            steps.append(z)
        return (z, steps) if return_steps else z


class DiffRIR(nn.Module):
    """The shipped (stage-two) network: restorer + CPEN on the input + diffusion prior."""

    def __init__(self, config: DiffRIRConfig):
        super().__init__()
        config.check()
        self.config = config
        self.restorer = Restorer(config)
        self.prior_encoder = PriorEncoder(config.input_channels, config)
        self.denoiser = PriorDenoiser(config)
        self.diffusion = DiffusionPrior(config)

    @staticmethod
    def make_input(generated, reference, mask):
        """concat(I_LQ, (1 - M)·I_ref) of Eq. 7; mask is [B, 1, H, W], 1 where content was generated."""
        return torch.cat([generated, reference * (1 - mask)], dim=1)

    def prior_from_condition(self, condition, generator: torch.Generator | None = None):
        noise = torch.randn(condition.shape[0], self.config.prior_dim, generator=generator,
                            device="cpu", dtype=torch.float32).to(condition)
        return self.diffusion.sample(self.denoiser, condition, noise)

    def forward(self, x, generator: torch.Generator | None = None):
        """Untiled restoration of a stacked input whose sides are multiples of `config.multiple`."""
        prior = self.prior_from_condition(self.prior_encoder(x), generator)
        return self.restorer(x, prior)
