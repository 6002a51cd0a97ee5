"""LaVIN's MM-Adapter (`lavin/mm_adapter.py`, `RepAdapter_Router` + `set_MMAdapter(..., 'attn')`), run by its
own code:

- `manifest.json`: the adapter's key names and shapes in a LaVIN-7B model (LLaMA-7B's params: dim 4096,
  32 layers, 32 heads; LaVIN's defaults adapter_dim 8, scale 1, temperature 10), built on the meta device by
  `lavin.model.Transformer`'s blocks and LaVIN's `set_MMAdapter`, plus `adapter_modality_embedding`.
- `adapter.safetensors`: one `RepAdapter_Router` (dim 16, hidden 8, groups 2, scale 0.5, t 10) with seeded
  random weights, its input and its outputs (its own fp16 routing, and explicit fp32 routing weights).
- `blocks.safetensors`: two LLaMA blocks of `lavin.model` (dim 32, 4 heads) with the adapters attached by
  `set_MMAdapter` and LaVIN's forward (`forward_llama_attn`), on the sequence LaVIN's `Transformer.forward`
  builds: the modality embedding of the image indicator in front of the token embeddings, the decision-token
  mask (no token attends to position 0), then LaVIN's final RMSNorm. Weights, inputs and outputs are saved.

Heavy imports the adapter does not need at this point (fairscale, timm, CLIP) are stubbed.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import sys
import types
from pathlib import Path

import torch
from torch import nn

from . import importable

REFERENCE = "luogen1996/LaVIN"

LAVIN_7B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-6}
ADAPTER = {"in_features": 16, "hidden_dim": 8, "groups": 2, "scale": 0.5, "t": 10.0}
BLOCKS = {"dim": 32, "n_layers": 2, "n_heads": 4, "multiple_of": 16, "norm_eps": 1e-5, "adapter_dim": 8,
          "adapter_scale": 0.5, "temperature": 10.0, "vocab": 40, "image_token": 7}


class _ParallelLinear(nn.Linear):
    """fairscale's model-parallel linear on one process is a plain linear."""

    def __init__(self, in_features, out_features, bias=True, **_):
        super().__init__(in_features, out_features, bias=bias)


class _ParallelEmbedding(nn.Embedding):
    def __init__(self, num, dim, **_):
        super().__init__(num, dim)


class _DropPath(nn.Module):
    def __init__(self, p=0.0):
        super().__init__()

    def forward(self, x):
        return x


class _ResidualAttentionBlock(nn.Module):
    pass


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


@contextlib.contextmanager
def lavin_modules(tree: Path):
    """`lavin.model`, `lavin.eval_model` and `lavin.mm_adapter` imported from the checkout, with the heavy
    imports they do not need stubbed; everything is taken off sys.modules again afterwards."""
    stubs = {
        "fairscale": _module("fairscale"), "fairscale.nn": _module("fairscale.nn"),
        "fairscale.nn.model_parallel": _module("fairscale.nn.model_parallel"),
        "fairscale.nn.model_parallel.initialize": _module("fairscale.nn.model_parallel.initialize",
                                                          get_model_parallel_world_size=lambda: 1),
        "fairscale.nn.model_parallel.layers": _module("fairscale.nn.model_parallel.layers",
                                                      ParallelEmbedding=_ParallelEmbedding,
                                                      RowParallelLinear=_ParallelLinear,
                                                      ColumnParallelLinear=_ParallelLinear),
        "timm": _module("timm"), "timm.models": _module("timm.models"),
        "timm.models.layers": _module("timm.models.layers", DropPath=_DropPath),
        "clip": _module("clip", load=lambda *a, **k: (nn.Module(), None)),
        "clip.model": _module("clip.model", ResidualAttentionBlock=_ResidualAttentionBlock),
        "lavin": _module("lavin", __path__=[str(tree / "lavin")]),  # its __init__ pulls in the tokenizer
    }
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        with importable(tree):
            model = importlib.import_module("lavin.model")
            eval_model = importlib.import_module("lavin.eval_model")
            mm_adapter = importlib.import_module("lavin.mm_adapter")
            yield model, eval_model, mm_adapter
    finally:
        for name in [n for n in sys.modules if n == "lavin" or n.startswith("lavin.")]:
            sys.modules.pop(name)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _manifest(model, mm_adapter) -> dict:
    args = model.ModelArgs(**LAVIN_7B)
    with torch.device("meta"):
        container = nn.Module()
        container.layers = nn.ModuleList(model.TransformerBlock(i, args) for i in range(args.n_layers))
        mm_adapter.set_MMAdapter(container, "attn", dim=8, s=1, t=10.0)
        modality = nn.Embedding(2, args.dim)  # Transformer.__init__: adapter_modality_embedding = nn.Embedding(2, dim)
    keys = {name: list(p.shape) for name, p in container.named_parameters() if "adapter" in name}
    keys["adapter_modality_embedding.weight"] = list(modality.weight.shape)
    return {"config": {**LAVIN_7B, "adapter_type": "attn", "adapter_dim": 8, "adapter_scale": 1, "temperature": 10.0},
            "note": "the keys of the LaVIN-7B language model that hold its MM-Adapter (set_MMAdapter 'attn', "
                    "`'adapter' in name` as LaVIN selects its trainable parameters; adapter_proj, the CLIP-feature "
                    "projection, and the CLIP adapters are not part of the MM-Adapter and not listed)",
            "keys": keys}


def _seeded(module: nn.Module, generator: torch.Generator, std: float = 0.3) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)


def _adapter_fixture(mm_adapter) -> dict:
    generator = torch.Generator().manual_seed(0)
    adapter = mm_adapter.RepAdapter_Router(**ADAPTER).eval()
    _seeded(adapter, generator)
    x = torch.randn(3, 5, ADAPTER["in_features"], generator=generator)
    with torch.no_grad():
        out = adapter(x)  # LaVIN's own routing (its softmax, rounded to fp16)
        weights = torch.softmax(adapter.expert_weights(x[:, 0]) / adapter.t, -1)  # the same router, in fp32
        out_fp32 = adapter(x, weights=weights)
    tensors = {f"weights.{k}": v for k, v in adapter.state_dict().items()}
    tensors.update({"input": x, "output": out, "output_fp32_routing": out_fp32, "routing_fp32": weights})
    return tensors


def _blocks_fixture(model, mm_adapter) -> dict:
    c = BLOCKS
    generator = torch.Generator().manual_seed(1)
    args = model.ModelArgs(dim=c["dim"], n_layers=c["n_layers"], n_heads=c["n_heads"], multiple_of=c["multiple_of"],
                           norm_eps=c["norm_eps"], max_seq_len=64)
    container = nn.Module()
    container.layers = nn.ModuleList(model.TransformerBlock(i, args) for i in range(args.n_layers))
    mm_adapter.set_MMAdapter(container, "attn", dim=c["adapter_dim"], s=c["adapter_scale"], t=c["temperature"])
    container.norm = model.RMSNorm(args.dim, eps=args.norm_eps)
    container.tok_embeddings = nn.Embedding(c["vocab"], args.dim)
    container.adapter_modality_embedding = nn.Embedding(2, args.dim)
    _seeded(container, generator)
    with torch.no_grad():
        container.norm.weight.add_(1.0)
        for layer in container.layers:
            layer.attention_norm.weight.add_(1.0)
            layer.ffn_norm.weight.add_(1.0)
    container.eval()
    tensors = {f"weights.{k}": v for k, v in container.state_dict().items()}
    freqs_cis = model.precompute_freqs_cis(args.dim // args.n_heads, args.max_seq_len * 2)
    for indicator in (0, 1):
        tokens = torch.randint(0, c["vocab"], (1, 9), generator=generator)
        tokens[tokens == c["image_token"]] = c["image_token"] + 1
        tokens[0, 0] = 1  # BOS
        tokens[0, 3] = c["image_token"] if indicator else c["image_token"] + 1
        with torch.no_grad():
            # Transformer.forward: the modality embedding in front, the decision token masked from every other token
            h = torch.cat([container.adapter_modality_embedding(torch.tensor([[indicator]])),
                           container.tok_embeddings(tokens)], 1)
            seqlen = h.shape[1]
            mask = torch.triu(torch.full((1, 1, seqlen, seqlen), float("-inf")), diagonal=1)
            mask[:, :, 1:, 0] = float("-inf")
            for layer in container.layers:
                h = layer(h, 0, freqs_cis[:seqlen], mask)
            out = container.norm(h)
        tensors[f"tokens_{indicator}"] = tokens
        tensors[f"output_{indicator}"] = out[:, 1:]  # the tokens' states (position 0 is the decision token)
    return tensors


def regenerate(reference: Path, out: Path) -> None:
    from safetensors.torch import save_file
    with lavin_modules(Path(reference)) as (model, _eval_model, mm_adapter):
        manifest = _manifest(model, mm_adapter)
        keys = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.pop("keys").items())
        head = json.dumps(manifest, indent=1)[:-2]
        (out / "manifest.json").write_text(f"{head},\n \"keys\": {{\n{keys}\n }}\n}}\n")
        save_file({k: v.contiguous() for k, v in _adapter_fixture(mm_adapter).items()},
                  str(out / "adapter.safetensors"), metadata={"config": json.dumps(ADAPTER)})
        save_file({k: v.contiguous() for k, v in _blocks_fixture(model, mm_adapter).items()},
                  str(out / "blocks.safetensors"), metadata={"config": json.dumps(BLOCKS)})
