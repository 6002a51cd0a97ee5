"""MUMU's adapter: a non-causal transformer from a VLM's hidden states to SDXL's cross-attention context.

    context [B, N, 2048], pooled [B, 1280] = MUMUAdapter(hidden_states [B, L, H_vlm], mask [B, L])

Every token attends to every real token (no causal mask; MUMU uses 16 layers). The pooled vector, which
SDXL takes from CLIP-G's pooled text embedding, comes from attention pooling: a learned query attends
over the real tokens. The sequence is extended with a learned padding token to a multiple of 77, as
CLIP pads its 77-token windows, so the conditioning batches with a text-encoded negative prompt
in the host; padding attends to the prompt but no real token attends to padding, so the real tokens'
outputs do not depend on how much padding there is.

A saved adapter is one safetensors file with its config as JSON in the metadata (`save_adapter`,
`load_adapter`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model_files import (ModelFilesError, check_config_numbers, check_parameter_count, load_weights_exactly,
                          read_config_metadata, save_safetensors_atomic)

FORMAT = "mmig-mumu-adapter"
FORMAT_VERSION = "1"


@dataclass
class MUMUAdapterConfig:
    input_dim: int                # the VLM's hidden size
    width: int = 1024
    num_layers: int = 16          # MUMU's adapter depth
    num_heads: int = 16
    mlp_ratio: float = 4.0
    context_dim: int = 2048       # SDXL cross-attention width
    pooled_dim: int = 1280        # SDXL pooled text embedding
    pad_multiple: int = 77        # CLIP's window length

    def __post_init__(self):
        check_config_numbers("MUMU adapter", self, positive=("input_dim", "width", "num_layers", "num_heads",
                                                              "context_dim", "pooled_dim", "pad_multiple"),
                             finite_positive=("mlp_ratio",), divisible=(("width", "num_heads"),))
        if int(self.width * self.mlp_ratio) < 1:
            raise ValueError(f"MUMU adapter config: mlp_ratio {self.mlp_ratio} gives an empty MLP at width {self.width}")
        check_parameter_count("MUMU adapter", self.parameter_count(), self)

    def parameter_count(self) -> int:
        """The parameters of MUMUAdapter(self), computed from the sizes (nothing is allocated)."""
        i, w, hidden = self.input_dim, self.width, int(self.width * self.mlp_ratio)
        block = 4 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * hidden + hidden + hidden * w + w)
        return (2 * i + i * w + w + w + self.num_layers * block + 2 * w + w * self.context_dim + self.context_dim
                + w + 2 * w * w + 2 * w + w * self.pooled_dim + self.pooled_dim)


SDXL_CONTEXT_DIM = 2048  # SDXL's cross-attention width
SDXL_POOLED_DIM = 1280   # SDXL's pooled text embedding (CLIP-G)


def check_sdxl_widths(config: MUMUAdapterConfig, name: str) -> None:
    """A clear error, instead of a matmul error deep in the sampler, for an adapter whose outputs are not
    SDXL's widths (e.g. one built for SD1.5's 768-d context)."""
    if (config.context_dim, config.pooled_dim) != (SDXL_CONTEXT_DIM, SDXL_POOLED_DIM):
        raise ValueError(f"the adapter '{name}' outputs {config.context_dim}-d context tokens and a "
                         f"{config.pooled_dim}-d pooled vector, but SDXL's UNet takes {SDXL_CONTEXT_DIM}-d context "
                         f"and a {SDXL_POOLED_DIM}-d pooled vector: load an adapter trained for SDXL")


def _attention(q, k, v, heads: int, key_mask: torch.Tensor) -> torch.Tensor:
    """Multi-head attention; key_mask [B, Lk] True where a key may be attended to."""
    b, lq, width = q.shape
    split = lambda t: t.view(b, t.shape[1], heads, width // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=key_mask[:, None, None, :])
    return out.transpose(1, 2).reshape(b, lq, width)


class AdapterBlock(nn.Module):
    """Pre-norm transformer block with bidirectional attention."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(_attention(q, k, v, self.heads, key_mask))
        return x + self.mlp(self.norm2(x))


class MUMUAdapter(nn.Module):
    def __init__(self, config: MUMUAdapterConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.in_norm = nn.LayerNorm(config.input_dim)
        self.in_proj = nn.Linear(config.input_dim, w)
        self.pad_token = nn.Parameter(torch.zeros(w))
        self.blocks = nn.ModuleList(AdapterBlock(w, config.num_heads, config.mlp_ratio)
                                    for _ in range(config.num_layers))
        self.out_norm = nn.LayerNorm(w)
        self.out_proj = nn.Linear(w, config.context_dim)
        self.pool_query = nn.Parameter(torch.zeros(w))
        self.pool_kv = nn.Linear(w, 2 * w)
        self.pool_proj = nn.Linear(w, config.pooled_dim)

    def padded_length(self, tokens: int) -> int:
        m = self.config.pad_multiple
        return max(1, math.ceil(tokens / m)) * m

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor | None = None):
        """[B, L, input_dim] (+ mask [B, L], True = real token) -> ([B, N, context_dim], [B, pooled_dim])."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.input_dim:
            raise ValueError(f"the adapter takes hidden states [batch, tokens, {self.config.input_dim}], got "
                             f"{tuple(hidden_states.shape)}")
        b, length, _ = hidden_states.shape
        dtype = self.in_proj.weight.dtype
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.bool, device=hidden_states.device)
        mask = mask.to(hidden_states.device, torch.bool)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every prompt needs at least one token")
        x = self.in_proj(self.in_norm(hidden_states.to(dtype)))
        n = self.padded_length(length)
        pad = self.pad_token.to(x.dtype).expand(b, n, -1).clone()
        pad[:, :length] = torch.where(mask[..., None], x, pad[:, :length])
        x = pad
        key_mask = F.pad(mask, (0, n - length), value=False)  # nothing attends to padding
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.out_norm(x)
        context = self.out_proj(x)
        k, v = self.pool_kv(x).chunk(2, dim=-1)
        query = self.pool_query.to(x.dtype).expand(b, 1, -1)
        pooled = self.pool_proj(_attention(query, k, v, self.config.num_heads, key_mask)[:, 0])
        return context, pooled


def init_adapter(adapter: MUMUAdapter, seed: int = 0, std: float = 0.02) -> MUMUAdapter:
    """Deterministic initialisation (the weights of a fresh adapter, before training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if p.dim() > 1 or name in ("pad_token", "pool_query"):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            elif name.endswith("weight"):  # LayerNorm gains
                p.fill_(1.0)
            else:
                p.zero_()
    return adapter


def save_adapter(adapter: MUMUAdapter, path: str | os.PathLike) -> Path:
    """Write the adapter's weights and config to one safetensors file, atomically."""
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(asdict(adapter.config))}
    return save_safetensors_atomic(adapter.state_dict(), path, metadata)


def load_adapter(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MUMUAdapter:
    """Read an adapter written by `save_adapter`; any problem is a ModelFilesError naming the file."""
    raw = read_config_metadata(path, file_format=FORMAT, what="MUMU adapter",
                               where="put MUMU adapters (.safetensors) in ComfyUI/models/mmig/")
    try:
        known = {f.name for f in fields(MUMUAdapterConfig)}
        config = MUMUAdapterConfig(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ModelFilesError(f"{path}: the adapter config in the metadata is refused ({e})") from None
    return load_weights_exactly(MUMUAdapter(config), path).to(dtype).eval()
