"""Sizes of a DiffRIR network, as a dataclass that travels inside the weights file's metadata."""
from __future__ import annotations

import json
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
        for level, heads in enumerate(self.heads):
            width = self.dim * 2 ** min(level, 3)
            if width % heads:
                raise ValueError(f"DiffRIR config: width {width} at level {level + 1} is not divisible by "
                                 f"its {heads} heads")
        if self.timesteps < 1 or self.unshuffle < 1:
            raise ValueError("DiffRIR config: timesteps and unshuffle must be at least 1")


def paper_config() -> DiffRIRConfig:
    """The published DiffRIR x1 sizes (Zj-BinXia/DiffRIR `inference_diffrir.py`, `options/*_x1.yml`): 64-wide,
    13+13 blocks, ffn 2.2, bias-free LayerNorm, 256-d prior, 4 diffusion steps."""
    return DiffRIRConfig()


def tiny_config() -> DiffRIRConfig:
    """For tests and demos: the same interfaces (6-channel input, 256-d prior, 4 steps), tiny widths inside."""
    return DiffRIRConfig(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, ffn_expansion_factor=2.0,
                         prior_features=8, prior_res_blocks=1)
