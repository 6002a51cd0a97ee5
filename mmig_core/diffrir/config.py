"""Sizes of a DiffRIR network, as a dataclass that travels inside the weights file's metadata."""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class DiffRIRConfig:
    # Restorer (a Restormer-style U-Net, DiffIR's "DIRformer")
    image_channels: int = 3          # the generated image; the reference adds as many again (Eq. 7)
    unshuffle: int = 4               # pixel-unshuffle factor before the first conv (DiffIR's x1 variant)
    dim: int = 64                    # width at the first level; doubles at each of the three downsamplings
    num_blocks: tuple[int, int, int, int] = (13, 1, 1, 1)
    num_refinement_blocks: int = 13
    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    ffn_expansion_factor: float = 2.2
    bias: bool = False
    layernorm_with_bias: bool = False  # the published DiffRIR configs use the bias-free LayerNorm
    # Prior: a compact vector that scales and shifts the features of every transformer block
    prior_dim: int = 256
    prior_features: int = 64         # CPEN width ("n_feats")
    prior_res_blocks: int = 9        # CPEN residual blocks ("n_encoder_res")
    # Stage-two prior: a short diffusion chain over the prior vector, conditioned on the input's CPEN code
    denoise_res_blocks: int = 1
    timesteps: int = 4
    linear_start: float = 0.1
    linear_end: float = 0.99

    @property
    def input_channels(self) -> int:
        return 2 * self.image_channels

    @property
    def multiple(self) -> int:
        """Height and width of the network's input must be multiples of this (unshuffle, then 3 halvings)."""
        return self.unshuffle * 8

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DiffRIRConfig":
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown DiffRIR config fields {unknown}; the file was written by a newer pack?")
        for name in ("num_blocks", "heads"):
            if name in raw:
                raw[name] = tuple(raw[name])
        return cls(**raw)

    def check(self) -> None:
        """ValueError naming the field and value when the sizes cannot make a network, or imply more than
        MAX_PARAMETERS parameters (computed, nothing allocated)."""
        from ..model_files import check_config_numbers, check_parameter_count
        for name in ("num_blocks", "heads"):
            if not isinstance(getattr(self, name), (tuple, list)) or len(getattr(self, name)) != 4:
                raise ValueError(f"DiffRIR config: {name} must list 4 levels, got {getattr(self, name)!r}")
        check_config_numbers("DiffRIR", self, positive=(
            "image_channels", "unshuffle", "dim", "num_blocks", "num_refinement_blocks", "heads", "prior_dim",
            "prior_features", "timesteps"), finite_positive=("ffn_expansion_factor", "linear_start", "linear_end"))
        for name in ("prior_res_blocks", "denoise_res_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"DiffRIR config: {name} must be an integer >= 0, got {value!r}")
        if self.unshuffle & (self.unshuffle - 1):
            raise ValueError(f"DiffRIR config: unshuffle must be a power of 2, got {self.unshuffle}")
        if not self.linear_start < 1 or not self.linear_end < 1:
            raise ValueError(f"DiffRIR config: linear_start {self.linear_start} and linear_end {self.linear_end} "
                             f"(the beta schedule) must lie in (0, 1)")
        for level, heads in enumerate(self.heads):
            width = self.dim * 2 ** min(level, 3)
            if width % heads:
                raise ValueError(f"DiffRIR config: width {width} at level {level + 1} is not divisible by "
                                 f"its {heads} heads (heads[{level}])")
        if int(self.dim * self.ffn_expansion_factor) < 1:
            raise ValueError(f"DiffRIR config: ffn_expansion_factor {self.ffn_expansion_factor} gives an empty "
                             f"feed-forward at dim {self.dim}")
        check_parameter_count("DiffRIR", self.parameter_count(), self)

    def parameter_count(self) -> int:
        """The parameters of DiffRIR(self) (network.py), computed from the sizes."""
        d, p, b = self.dim, self.prior_dim, int(self.bias)
        norm = 2 if self.layernorm_with_bias else 1

        def block(dim, heads):
            hidden = int(dim * self.ffn_expansion_factor)
            attention = 2 * p * dim + heads + 3 * dim * dim + 27 * dim + dim * dim + b * 7 * dim
            feed_forward = 2 * p * dim + 2 * hidden * dim + 18 * hidden + hidden * dim + b * (4 * hidden + dim)
            return 2 * norm * dim + attention + feed_forward

        n, h = self.num_blocks, self.heads
        blocks = (n[0] * block(d, h[0]) + n[1] * block(2 * d, h[1]) + n[2] * block(4 * d, h[2])
                  + n[3] * block(8 * d, h[3]) + n[2] * block(4 * d, h[2]) + n[1] * block(2 * d, h[1])
                  + (n[0] + self.num_refinement_blocks) * block(2 * d, h[0]))
        embed = self.input_channels * self.unshuffle ** 2 * d * 9 + b * d
        resampling = 9 * (d * (d // 2) + 2 * d * d + 4 * d * 2 * d) + 9 * (8 * d * 16 * d + 4 * d * 8 * d + 2 * d * 4 * d)
        reduce = 8 * d * 4 * d + 4 * d * 2 * d + b * 6 * d
        tail = (int(math.log2(self.unshuffle)) * (2 * d * 8 * d * 9 + 8 * d)
                + 2 * d * self.image_channels * 9 + self.image_channels)
        f = self.prior_features
        prior_encoder = (self.input_channels * self.unshuffle ** 2 * f * 9 + f
                         + self.prior_res_blocks * 2 * (9 * f * f + f)
                         + (9 * f * 2 * f + 2 * f) + (9 * 4 * f * f + 2 * f) + (9 * 2 * f * p + p) + 2 * (p * p + p))
        denoiser = (2 * p + 1) * p + p + self.denoise_res_blocks * (p * p + p)
        return blocks + embed + resampling + reduce + tail + prior_encoder + denoiser


def paper_config() -> DiffRIRConfig:
    """The published DiffRIR x1 sizes (Zj-BinXia/DiffRIR `inference_diffrir.py`, `options/*_x1.yml`): 64-wide,
    13+13 blocks, ffn 2.2, bias-free LayerNorm, 256-d prior, 4 diffusion steps."""
    return DiffRIRConfig()


def tiny_config() -> DiffRIRConfig:
    """For tests and demos: the same interfaces (6-channel input, 256-d prior, 4 steps), tiny widths inside."""
    return DiffRIRConfig(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, ffn_expansion_factor=2.0,
                         prior_features=8, prior_res_blocks=1)
