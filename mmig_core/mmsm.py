"""MMSM, the multi-modality mutual support module (MMIG paper §3.2, Eqs. 9-13).

It injects the multimodal LLM's text embedding e_0 (tokens x text_dim) into a UNet feature map e_1
(channels x H x W):

    e_3 = MLP(e_0)                         (Eq. 9)   tokens    -> width
    e_2 = DomainEncoder(e_1)               (Eq. 10)  positions -> width (LayerNorm + linear per position)
    e_4 = CrossAttention(q=e_2, k/v=e_3)   (Eq. 11)
    e_6 = e_1 + DomainDecoder(e_4)         (Eq. 12)  width -> channels, zero-initialised
    L_MMSM = 1/2 ||e_3 - e_2||^2           (Eq. 13)

The decoder starts at zero, so an untrained MMSM is the identity. For Eq. 13 the two sides have
different lengths (text tokens vs feature positions), so each is mean-pooled first: e_3 over its valid
tokens (the attention mask), e_2 over all H*W positions; the squared distance is summed over the width
and averaged over the batch (`mmsm_loss`).

A saved MMSM is one safetensors file; its config is JSON in the metadata (`save_mmsm`, `load_mmsm`).
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .astar import make_weights_differentiable
from .model_files import (ModelFilesError, check_config_numbers, check_parameter_count, check_safetensors_file,
                          load_weights_exactly, read_config_metadata, save_safetensors_atomic)

FORMAT = "mmig-mmsm"
FORMAT_VERSION = "1"
INSERTION_BLOCKS = ("output",)  # the host's output-block patch; index 0 sees the UNet's mid-block output


@dataclass(frozen=True)
class MMSMConfig:
    text_dim: int  # e_0's width: the LLM's hidden size
    feature_channels: int  # e_1's channels at the insertion point (1280 for SDXL's mid block)
    width: int = 512  # the shared width of e_2, e_3, e_4
    num_heads: int = 8
    mlp_hidden: int = 1024
    insertion_block: str = "output"
    insertion_index: int = 0

    def __post_init__(self):
        check_config_numbers("MMSM", self, positive=("text_dim", "feature_channels", "width", "num_heads", "mlp_hidden"),
                             divisible=(("width", "num_heads"),))
        if self.insertion_block not in INSERTION_BLOCKS or isinstance(self.insertion_index, bool) \
                or not isinstance(self.insertion_index, numbers.Integral) or self.insertion_index < 0:
            raise ValueError(f"MMSM config: insertion point ({self.insertion_block!r}, {self.insertion_index!r}) "
                             f"is not supported; use one of {INSERTION_BLOCKS} with an integer index >= 0")
        check_parameter_count("MMSM", self.parameter_count(), self)

    def parameter_count(self) -> int:
        """The parameters of MMSM(self), computed from the sizes (nothing is allocated)."""
        t, c, w, h = self.text_dim, self.feature_channels, self.width, self.mlp_hidden
        mlp = t * h + h + h * w + w
        domain_encoder = 2 * c + c * w + w
        cross_attention = 4 * w * w + 4 * w  # in_proj (q, k, v) and out_proj, with biases
        return mlp + domain_encoder + cross_attention + w * c + c


class MMSM(torch.nn.Module):
    def __init__(self, config: MMSMConfig):
        super().__init__()
        self.config = config
        self.mlp = torch.nn.Sequential(torch.nn.Linear(config.text_dim, config.mlp_hidden), torch.nn.GELU(),
                                       torch.nn.Linear(config.mlp_hidden, config.width))
        self.domain_encoder = torch.nn.Sequential(torch.nn.LayerNorm(config.feature_channels),
                                                  torch.nn.Linear(config.feature_channels, config.width))
        self.cross_attention = torch.nn.MultiheadAttention(config.width, config.num_heads, batch_first=True)
        self.domain_decoder = torch.nn.Linear(config.width, config.feature_channels)
        torch.nn.init.zeros_(self.domain_decoder.weight)  # untrained MMSM = identity (Eq. 12)
        torch.nn.init.zeros_(self.domain_decoder.bias)

    def check_inputs(self, text: torch.Tensor, features: torch.Tensor) -> None:
        if text.shape[-1] != self.config.text_dim:
            raise ValueError(f"the LLM embedding has width {text.shape[-1]}, but this MMSM takes "
                             f"{self.config.text_dim}: use an MMSM trained for this LLM")
        if features.shape[1] != self.config.feature_channels:
            raise ValueError(f"the UNet features at ({self.config.insertion_block}, {self.config.insertion_index}) "
                             f"have {features.shape[1]} channels, but this MMSM was built for "
                             f"{self.config.feature_channels}: use an MMSM trained for this UNet")

    def encode(self, text, text_mask, features):
        """e_3 (B, T, width), e_2 (B, HW, width) and e_4 (B, HW, width) for text (B, T, D), features (B, C, H, W)."""
        self.check_inputs(text, features)
        e3 = self.mlp(text)
        e2 = self.domain_encoder(features.flatten(2).transpose(1, 2))
        padding = None if text_mask is None else ~text_mask.bool()
        e4, _ = self.cross_attention(e2, e3, e3, key_padding_mask=padding, need_weights=False)
        return e3, e2, e4

    def forward(self, text, features, text_mask=None, strength: float = 1.0):
        """e_6 = e_1 + strength * DomainDecoder(e_4), the same shape as `features`."""
        _, _, e4 = self.encode(text, text_mask, features)
        delta = self.domain_decoder(e4).transpose(1, 2).reshape(features.shape)
        return features + strength * delta


def check_insertion_point(config: MMSMConfig, output_blocks: int, name: str) -> None:
    """An MMSM placed at an output block the UNet does not have would never run: say which points it has."""
    if config.insertion_index >= output_blocks:
        raise ValueError(f"the MMSM '{name}' is inserted at ({config.insertion_block!r}, {config.insertion_index}), "
                         f"but this model's UNet has {output_blocks} output blocks, so its insertion points are "
                         f"({config.insertion_block!r}, 0) to ({config.insertion_block!r}, {output_blocks - 1}): "
                         f"use an MMSM trained for this model")


def mmsm_loss(e3: torch.Tensor, e2: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 13: 1/2 ||mean_tokens(e_3) - mean_positions(e_2)||^2, summed over width, mean over the batch."""
    if text_mask is None:
        pooled_text = e3.mean(dim=1)
    else:
        weights = text_mask.to(e3.dtype).unsqueeze(-1)
        pooled_text = (e3 * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return 0.5 * (pooled_text - e2.mean(dim=1)).pow(2).sum(dim=-1).mean()


def init_mmsm(mmsm: MMSM, seed: int = 0, std: float = 0.02, *, decoder_std: float = 0.0) -> MMSM:
    """Seeded weights; the decoder stays zero unless `decoder_std` > 0 (used by tests of a trained MMSM)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in mmsm.named_parameters():
            if name.startswith("domain_encoder.0."):
                continue  # the LayerNorm keeps its 1 / 0
            if name.startswith("domain_decoder."):
                param.copy_(torch.randn(param.shape, generator=generator) * decoder_std)
            elif param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            else:
                param.zero_()
    return mmsm


def save_mmsm(mmsm: MMSM, path: str | os.PathLike) -> Path:
    """Write the weights and config atomically."""
    tensors = {k: v.float() for k, v in mmsm.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(asdict(mmsm.config))}
    return save_safetensors_atomic(tensors, path, metadata)


def is_mmsm_file(path: str | os.PathLike) -> bool:
    try:
        return check_safetensors_file(path).get("format") == FORMAT
    except (ModelFilesError, OSError):
        return False


def load_mmsm(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MMSM:
    raw = read_config_metadata(path, file_format=FORMAT, what="MMSM", article="an",
                               where="put MMSM .safetensors files in ComfyUI/models/mmig/")
    try:
        config = MMSMConfig(**raw)
    except (TypeError, ValueError) as e:
        raise ModelFilesError(f"{path}: the MMSM config in the metadata is refused ({e})") from None
    return load_weights_exactly(MMSM(config), path).to(dtype).eval()


class OutputBlockPatch:
    """The host's output-block patch `(h, hsp, transformer_options) -> (h, hsp)` running MMSM on `h` at one block.

    At ("output", 0), `h` is the UNet's mid-block output. The batch holds one chunk per entry of
    transformer_options["cond_or_uncond"] (0 = cond, 1 = uncond): cond chunks get the LLM embedding
    (one prompt for the whole chunk, or one per sample); uncond chunks get a zero embedding (one token),
    the embedding of an empty prompt.
    """

    def __init__(self, mmsm: MMSM, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                 strength: float, on_fire=None):
        if hidden_states.shape[-1] != mmsm.config.text_dim:
            raise ValueError(f"the LLM embedding has width {hidden_states.shape[-1]}, but this MMSM takes "
                             f"{mmsm.config.text_dim}: use an MMSM trained for this LLM")
        self.mmsm = mmsm
        self.hidden_states = hidden_states
        self.attention_mask = (torch.ones(hidden_states.shape[:2], dtype=torch.bool) if attention_mask is None
                               else attention_mask.bool())
        self.strength = strength
        self.block = (mmsm.config.insertion_block, mmsm.config.insertion_index)
        self.on_fire = on_fire  # called with the block each time MMSM runs (tests count it)

    def _embedding(self, chunk_is_uncond: bool, batch: int, device, dtype):
        if chunk_is_uncond:
            text = torch.zeros(batch, 1, self.mmsm.config.text_dim)
            mask = torch.ones(batch, 1, dtype=torch.bool)
        else:
            prompts = self.hidden_states.shape[0]
            if prompts not in (1, batch):
                raise ValueError(f"the LLM embedding holds {prompts} prompts but the latent batch is {batch}: "
                                 f"give one prompt, or one per latent")
            text = self.hidden_states.expand(batch, -1, -1)
            mask = self.attention_mask.expand(batch, -1)
        return text.to(device=device, dtype=dtype), mask.to(device)

    def _leave_inference_mode(self) -> None:
        """A gradient pass of another node (A-STAR's) runs through this patch: autograd refuses to save tensors
        made under the host's inference mode, as the loaded weights and the LLM embedding are. Ordinary copies,
        same values, frozen; made once (until the host moves the module again under inference mode)."""
        make_weights_differentiable(self.mmsm)
        if self.hidden_states.is_inference():
            self.hidden_states = self.hidden_states.clone()
        if self.attention_mask.is_inference():
            self.attention_mask = self.attention_mask.clone()

    def __deepcopy__(self, memo):
        # The host deep-copies model_options on every clone; the patch's module and tensors are read-only, so share them.
        return self

    def __call__(self, h, hsp, transformer_options):
        if tuple(transformer_options.get("block", ())) != self.block:
            return h, hsp
        if self.on_fire is not None:
            self.on_fire(self.block)
        chunks = transformer_options.get("cond_or_uncond") or [0]
        if h.shape[0] % len(chunks):
            raise ValueError(f"batch of {h.shape[0]} does not split into {len(chunks)} cond/uncond chunks")
        per_chunk = h.shape[0] // len(chunks)
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            self._leave_inference_mode()
        self.mmsm.to(device=h.device, dtype=h.dtype)
        outputs = []
        for i, kind in enumerate(chunks):
            features = h[i * per_chunk:(i + 1) * per_chunk]
            text, mask = self._embedding(kind == 1, per_chunk, h.device, h.dtype)
            outputs.append(self.mmsm(text, features, mask, self.strength))
        return torch.cat(outputs), hsp
