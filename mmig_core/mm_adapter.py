"""MM-Adapter (MMIG Eq. 6, LaVIN's mixture-of-modality adapter):

    Z' = Z + s * router(f_a1(Z), f_a2(Z); w_hat)

f_a1 and f_a2 are RepAdapters (a narrow 1x1-convolution bottleneck whose up-projection is grouped), and
the router mixes them with weights w_hat = softmax(W_r z / tau) computed from the mean token z, so a
text-only and a multimodal input can take different paths. The experts' up-projections start at zero,
so an untrained MM-Adapter is an exact identity and attaching it leaves the VLM unchanged.

`attach_mm_adapters(language_model_layers, adapters)` puts one adapter before each decoder layer with a
forward pre-hook; `save_mm_adapters` / `load_mm_adapters` keep them in one safetensors file with their
config in the metadata.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .model_files import ModelFilesError, load_weights_exactly, read_config_metadata, save_safetensors_atomic

FORMAT = "mmig-mm-adapter"


@dataclass
class MMAdapterConfig:
    dim: int                    # the language model's hidden size
    num_layers: int             # one adapter per decoder layer
    hidden: int = 8             # RepAdapter bottleneck width (LaVIN: 8)
    groups: int = 2             # groups of the up-projection
    scale: float = 1.0          # s
    temperature: float = 10.0   # tau of the router's softmax


class RepAdapter(nn.Module):
    """LaVIN's RepAdapter: a 1x1 conv down to a narrow bottleneck, a grouped 1x1 conv back up (zero at start)."""

    def __init__(self, dim: int, hidden: int, groups: int):
        super().__init__()
        if hidden % groups or dim % groups:
            raise ValueError(f"hidden {hidden} and dim {dim} must be divisible by groups {groups}")
        self.down = nn.Conv1d(dim, hidden, 1)
        self.up = nn.Conv1d(hidden, dim, 1, groups=groups)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        return self.up(self.down(x.transpose(1, 2))).transpose(1, 2)


class MMAdapter(nn.Module):
    def __init__(self, dim: int, hidden: int = 8, groups: int = 2, scale: float = 1.0, temperature: float = 10.0):
        super().__init__()
        self.scale, self.temperature = scale, temperature
        self.experts = nn.ModuleList(RepAdapter(dim, hidden, groups) for _ in range(2))
        self.router = nn.Linear(dim, 2)

    def route(self, z: torch.Tensor) -> torch.Tensor:
        """w_hat [B, 2]: the mixing weights of the two experts, from the mean token."""
        return torch.softmax(self.router(z.mean(dim=1)) / self.temperature, dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dtype = z.dtype
        x = z.to(self.router.weight.dtype)
        w = self.route(x)
        mixed = w[:, 0, None, None] * self.experts[0](x) + w[:, 1, None, None] * self.experts[1](x)
        return (x + self.scale * mixed).to(dtype)


class MMAdapterSet(nn.Module):
    """One MM-Adapter per decoder layer."""

    def __init__(self, config: MMAdapterConfig):
        super().__init__()
        self.config = config
        self.adapters = nn.ModuleList(MMAdapter(config.dim, config.hidden, config.groups, config.scale,
                                                config.temperature) for _ in range(config.num_layers))


def attach_mm_adapters(layers, adapter_set: MMAdapterSet) -> list:
    """Apply adapter i to the hidden states entering decoder layer i; returns the hook handles (to detach)."""
    layers = list(layers)
    if len(layers) != len(adapter_set.adapters):
        raise ValueError(f"the MM-Adapter file has {len(adapter_set.adapters)} adapters but the language model has "
                         f"{len(layers)} decoder layers: use the MM-Adapter trained for this VLM")
    handles = []
    for layer, adapter in zip(layers, adapter_set.adapters):
        def hook(_module, args, kwargs, adapter=adapter):
            if args:
                return (adapter(args[0]), *args[1:]), kwargs
            kwargs["hidden_states"] = adapter(kwargs["hidden_states"])
            return args, kwargs
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def save_mm_adapters(adapter_set: MMAdapterSet, path: str | os.PathLike) -> Path:
    metadata = {"format": FORMAT, "config": json.dumps(asdict(adapter_set.config))}
    return save_safetensors_atomic(adapter_set.state_dict(), path, metadata)


def load_mm_adapters(path: str | os.PathLike) -> MMAdapterSet:
    raw = read_config_metadata(path, file_format=FORMAT, what="MM-Adapter", article="an",
                               where="put MM-Adapters (.safetensors) in ComfyUI/models/mmig/")
    try:
        config = MMAdapterConfig(**{f.name: raw[f.name] for f in fields(MMAdapterConfig) if f.name in raw})
        adapter_set = MMAdapterSet(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFilesError(f"{path}: the MM-Adapter config in the metadata is unreadable ({e})") from None
    return load_weights_exactly(adapter_set, path).eval()
