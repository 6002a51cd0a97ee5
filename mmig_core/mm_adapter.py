"""MM-Adapter (MMIG Eq. 6), laid out and placed as LaVIN's `RepAdapter_Router` (luogen1996/LaVIN,
lavin/mm_adapter.py, its `attn` placement, the one LaVIN trains):

    Z' = Z + s * (w_0 f_up0(drop(f_down(Z))) + w_1 f_up1(drop(f_down(Z)))),   w = softmax(W_r z_0 / tau)

Z is the attention input of a decoder layer, after its input norm; the layer's residual stream is left alone
(the attention's output is added to the un-adapted hidden states, as in LaVIN). f_down is ONE 1x1 convolution
shared by both experts (LaVIN's conv_A), each expert has its own grouped 1x1 up-convolution (conv_B, conv_D),
dropout 0.1 sits on the shared bottleneck (training only).

z_0 is LaVIN's "decision token": a learned modality embedding (index 1: the input holds an image, 0: text
only) that LaVIN puts at position 0 and masks out of every other token's attention, so it only steers the
router. Its state at each layer depends on the modality alone, and the pack computes it that way: at each
prefill (or uncached pass) the two modality embeddings go through the decoder layers as a one-token sequence
at position 0 (the adapters routing on it, as in LaVIN), which gives every layer's routing per modality; the
input's rows take theirs by whether they hold the image token, and every decoded token reuses it (LaVIN's
`cache_weights`). No token reads a later one, so the language model stays causal, and cached decoding equals
an uncached pass. Where the pack differs: it does not put the decision token into the host model's sequence
(same result: no token attends to it), so positions, masks and `generate` stay the host's; LaVIN rounds the
routing weights to fp16 (autocast), the pack keeps the adapter's dtype; LaVIN's cached generator
(lavin/generator.py) gives each decoded token a rotary position one less than its training pass does, while the
pack's positions are the host model's, so its cached decoding equals the uncached (training) pass. The
up-convolutions start at zero, so an untrained MM-Adapter is an exact identity.

Key names (pack <- LaVIN): `adapters.{i}.down` <- `layers.{i}.adapter_attn.conv_A`, `.up.0` <- `.conv_B`,
`.up.1` <- `.conv_D`, `.router` <- `.expert_weights`, `modality_embedding` <- `adapter_modality_embedding`.

`attach_mm_adapters(text_model, adapters, image_token_id)` hooks the decoder layers' self-attention (a forward
pre-hook: it rewrites the attention input only); `save_mm_adapters` / `load_mm_adapters` keep the set in one
safetensors file with its config and format version in the metadata.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from .model_files import (ModelFilesError, check_config_numbers, check_parameter_count, load_weights_exactly,
                          read_config_metadata, save_safetensors_atomic)

FORMAT = "mmig-mm-adapter"
FORMAT_VERSION = 2  # 1: mean-token routing, a down-projection per expert, in front of the whole decoder layer
RETRAIN_HINT = ("Retrain it with MMIG training stage 2 (`python -m training mmig --config "
                "training/configs/mmig_stage2.yaml`, which exports <out_dir>/export/mm_adapter.safetensors); "
                "it cannot be converted, because the old layout routes on another token and sits at another place "
                "in the layer, so its weights were trained for a different function")


@dataclass
class MMAdapterConfig:
    dim: int                    # the language model's hidden size
    num_layers: int             # one adapter per decoder layer
    hidden: int = 8             # the shared bottleneck width (LaVIN's adapter_dim: 8)
    groups: int = 2             # groups of the up-convolutions (LaVIN: 2)
    scale: float = 1.0          # s (LaVIN's adapter_scale: 1)
    temperature: float = 10.0   # tau of the router's softmax (LaVIN: 10; 5 in its 13B instruction tuning)
    dropout: float = 0.1        # on the bottleneck, in training (LaVIN: 0.1)

    def __post_init__(self):
        check_config_numbers("MM-Adapter", self, positive=("dim", "num_layers", "hidden", "groups"),
                             finite_positive=("temperature",), finite=("scale", "dropout"),
                             divisible=(("hidden", "groups"), ("dim", "groups")))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"MM-Adapter config: dropout must be in [0, 1), got {self.dropout!r}")
        check_parameter_count("MM-Adapter", self.parameter_count(), self)

    def parameter_count(self) -> int:
        """The parameters of MMAdapterSet(self), computed from the sizes (nothing is allocated)."""
        d, h, g = self.dim, self.hidden, self.groups
        per_layer = (d * h + h) + 2 * (h // g * d + d) + (2 * d + 2)  # down, two up-convolutions, router
        return self.num_layers * per_layer + 2 * d  # + the modality embedding


class MMAdapter(nn.Module):
    """One layer's adapter: a shared down-convolution, two grouped up-convolutions mixed by the router."""

    def __init__(self, dim: int, hidden: int = 8, groups: int = 2, scale: float = 1.0, temperature: float = 10.0,
                 dropout: float = 0.1):
        super().__init__()
        if hidden % groups or dim % groups:
            raise ValueError(f"hidden {hidden} and dim {dim} must be divisible by groups {groups}")
        self.scale, self.temperature = scale, temperature
        self.down = nn.Conv1d(dim, hidden, 1)
        self.up = nn.ModuleList(nn.Conv1d(hidden, dim, 1, groups=groups) for _ in range(2))
        self.router = nn.Linear(dim, 2)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        for up in self.up:
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.by_modality: torch.Tensor | None = None  # [2, 2]: the routing of a text-only and an image input
        self.held: torch.Tensor | None = None  # [B, 2]: the routing of the last prefill, reused while decoding

    def route(self, first_token: torch.Tensor) -> torch.Tensor:
        """w [B, 2]: the experts' mixing weights, from the first token [B, D] of the attention input."""
        return torch.softmax(self.router(first_token.to(self.router.weight.dtype)) / self.temperature, dim=-1)

    def forward(self, z: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, L, D] -> [B, L, D]; `weights` [B, 2] default to the routing of z's own first token."""
        dtype = z.dtype
        x = z.to(self.down.weight.dtype)
        w = self.route(x[:, 0]) if weights is None else weights.to(x.dtype)
        bottleneck = self.dropout(self.down(x.transpose(1, 2)))
        mixed = w[:, 0, None, None] * self.up[0](bottleneck) + w[:, 1, None, None] * self.up[1](bottleneck)
        return (x + self.scale * mixed.transpose(1, 2)).to(dtype)


class MMAdapterSet(nn.Module):
    """One MM-Adapter per decoder layer and the modality embedding added to the first token."""

    def __init__(self, config: MMAdapterConfig):
        super().__init__()
        self.config = config
        self.adapters = nn.ModuleList(MMAdapter(config.dim, config.hidden, config.groups, config.scale,
                                                config.temperature, config.dropout) for _ in range(config.num_layers))
        self.modality_embedding = nn.Embedding(2, config.dim)  # LaVIN's decision token (N(0, 1) at init, as there)
        self.image_rows: torch.Tensor | None = None  # which rows of the current input hold an image
        self.deciding = False  # True while the decision tokens go through the layers


def _cache_of(kwargs: dict):
    """The KV cache a transformers call carries (`cache` in transformers >= 5.x, `past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _is_prefill(kwargs: dict, layer_idx: int | None = None) -> bool:
    """True for a pass that starts at position 0: no cache (an uncached pass), or an empty one (prefill)."""
    cache = _cache_of(kwargs)
    if cache is None or not hasattr(cache, "get_seq_length"):
        return True
    return int(cache.get_seq_length(layer_idx or 0)) == 0


def attach_mm_adapters(text_model: nn.Module, adapter_set: MMAdapterSet, image_token_id: int | None = None) -> list:
    """Attach adapter i to the self-attention input of `text_model.layers[i]`; returns the hook handles (to
    detach). `image_token_id` marks the rows that hold an image (None: every input counts as text only)."""
    layers = list(text_model.layers)
    if len(layers) != len(adapter_set.adapters):
        raise ValueError(f"the MM-Adapter file has {len(adapter_set.adapters)} adapters but the language model has "
                         f"{len(layers)} decoder layers: use the MM-Adapter trained for this VLM")
    if any(getattr(layer, "self_attn", None) is None for layer in layers):
        raise ValueError(f"the decoder layers of {type(text_model).__name__} have no `self_attn`: the MM-Adapter "
                         f"sits on the attention input and supports Llama/Mistral-style layers only")
    embeddings = text_model.get_input_embeddings()
    handles = [embeddings.register_forward_hook(
        lambda _m, args, _out: _note_image_rows(adapter_set, args[0] if args else None, image_token_id))]

    def decide(_module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_tensor(input_ids) and not input_ids.is_floating_point():  # called with ids: note them here
            _note_image_rows(adapter_set, input_ids, image_token_id)
        rows, adapter_set.image_rows = adapter_set.image_rows, None
        if not _is_prefill(kwargs):
            return None
        _run_decision_tokens(text_model, layers, adapter_set)
        batch = _batch_size(args, kwargs)
        if rows is None or rows.shape[0] != batch:
            rows = torch.zeros(batch, dtype=torch.long)
        for adapter in adapter_set.adapters:
            adapter.held = adapter.by_modality[rows.to(adapter.by_modality.device)]
        return None

    handles.append(text_model.register_forward_pre_hook(decide, with_kwargs=True))

    def after(*_):
        adapter_set.image_rows = None  # a call with input_ids embeds them inside: no later call may read that
        for adapter in adapter_set.adapters:  # decoding needs the values only, not a training step's graph
            adapter.held = None if adapter.held is None else adapter.held.detach()
            adapter.by_modality = None if adapter.by_modality is None else adapter.by_modality.detach()

    handles.append(text_model.register_forward_hook(after))
    for layer, adapter in zip(layers, adapter_set.adapters):
        def adapt(_module, args, kwargs, adapter=adapter):
            z = args[0] if args else kwargs["hidden_states"]
            if adapter_set.deciding:  # the decision token routes on itself (LaVIN's x[:, 0])
                weights = adapter.route(z[:, 0])
                adapter.by_modality = weights
            elif adapter.held is None or adapter.held.shape[0] != z.shape[0]:
                raise RuntimeError("MM-Adapter: the decoder layers ran without the language model's prefill (or "
                                   "with another batch size): call the model, not its layers")
            else:
                weights = adapter.held
            z = adapter(z, weights)
            if args:
                return (z, *args[1:]), kwargs
            kwargs["hidden_states"] = z
            return args, kwargs
        handles.append(layer.self_attn.register_forward_pre_hook(adapt, with_kwargs=True))
    return handles


def _batch_size(args, kwargs) -> int:
    for value in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), *(a for a in args if torch.is_tensor(a))):
        if value is not None:
            return value.shape[0]
    raise ValueError("MM-Adapter: the language model was called without input_ids or inputs_embeds")


def _run_decision_tokens(text_model: nn.Module, layers: list, adapter_set: MMAdapterSet) -> None:
    """Both modality embeddings through the decoder layers as one-token sequences at position 0 (they attend to
    themselves only, as LaVIN's masked decision token does); each adapter records the routing they give."""
    table = adapter_set.modality_embedding.weight
    parameter = next(text_model.parameters())
    h = table[:, None].to(parameter.device, parameter.dtype)  # [2, 1, D]
    position_ids = torch.zeros(2, 1, dtype=torch.long, device=h.device)
    rotary = getattr(text_model, "rotary_emb", None)
    extra = {"position_embeddings": rotary(h, position_ids)} if rotary is not None else {}
    adapter_set.deciding = True
    try:
        for layer in layers:
            out = layer(h, attention_mask=None, position_ids=position_ids, **extra)
            h = out[0] if isinstance(out, tuple) else out
    finally:
        adapter_set.deciding = False


def _note_image_rows(adapter_set: MMAdapterSet, input_ids, image_token_id: int | None) -> None:
    if image_token_id is None or not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        adapter_set.image_rows = None
        return
    adapter_set.image_rows = (input_ids == image_token_id).any(dim=1).long()


def save_mm_adapters(adapter_set: MMAdapterSet, path: str | os.PathLike) -> Path:
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(asdict(adapter_set.config))}
    return save_safetensors_atomic(adapter_set.state_dict(), path, metadata)


def load_mm_adapters(path: str | os.PathLike) -> MMAdapterSet:
    from .model_files import check_safetensors_file
    raw = read_config_metadata(path, file_format=FORMAT, what="MM-Adapter", article="an",
                               where="put MM-Adapters (.safetensors) in ComfyUI/models/mmig/")
    version = check_safetensors_file(path).get("format_version", "1")
    if version != str(FORMAT_VERSION):
        raise ModelFilesError(f"{path} is an MM-Adapter in layout version {version}; this pack reads version "
                              f"{FORMAT_VERSION} (LaVIN's: first-token routing held while decoding, one shared "
                              f"down-projection, on the attention input after the norm). {RETRAIN_HINT}.")
    try:
        config = MMAdapterConfig(**{f.name: raw[f.name] for f in fields(MMAdapterConfig) if f.name in raw})
        adapter_set = MMAdapterSet(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFilesError(f"{path}: the MM-Adapter config in the metadata is refused ({e})") from None
    return load_weights_exactly(adapter_set, path).eval()
