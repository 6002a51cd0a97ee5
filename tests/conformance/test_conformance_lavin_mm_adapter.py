"""The pack's MM-Adapter against LaVIN's own code (fixtures from `python -m devtools.conformance lavin_mm_adapter`):
the same keys and shapes as a LaVIN-7B adapter, and the same outputs on the same weights, for one adapter and
for two LLaMA blocks with LaVIN's decision token, uncached and with cached decoding."""
from __future__ import annotations

import inspect
import json
import re
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmig_core.mm_adapter import MMAdapter, MMAdapterConfig, MMAdapterSet, attach_mm_adapters

FIXTURES = Path(__file__).parent / "lavin_mm_adapter"
PACK_NAMES = {"conv_A": "down", "conv_B": "up.0", "conv_D": "up.1", "expert_weights": "router"}


def pack_key(lavin_key: str) -> str:
    """A LaVIN MM-Adapter key as the pack names it."""
    if lavin_key.startswith("adapter_modality_embedding."):
        return lavin_key.replace("adapter_modality_embedding", "modality_embedding")
    match = re.fullmatch(r"layers\.(\d+)\.adapter_attn\.(\w+)\.(weight|bias)", lavin_key)
    assert match, f"not a LaVIN MM-Adapter key: {lavin_key}"
    layer, part, kind = match.groups()
    return f"adapters.{layer}.{PACK_NAMES[part]}.{kind}"


def load(name: str) -> tuple[dict, dict]:
    with safe_open(str(FIXTURES / name), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["config"])


def with_lavin_fp16_routing(adapter: MMAdapter) -> MMAdapter:
    """LaVIN rounds its routing weights to fp16 (`.half()` under autocast); the pack keeps them in fp32."""
    adapter.route = types.MethodType(lambda self, z: MMAdapter.route(self, z).half().float(), adapter)
    return adapter


def test_pack_keys_and_shapes_are_lavin_7b_s():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    config = manifest["config"]
    with torch.device("meta"):
        pack = MMAdapterSet(MMAdapterConfig(dim=config["dim"], num_layers=config["n_layers"],
                                            hidden=config["adapter_dim"], scale=config["adapter_scale"],
                                            temperature=config["temperature"]))
    pack_shapes = {k: list(v.shape) for k, v in pack.state_dict().items()}
    lavin_shapes = {pack_key(k): shape for k, shape in manifest["keys"].items()}
    # per layer conv_A, conv_B, conv_D, expert_weights (weight and bias each), and the modality embedding
    assert len(lavin_shapes) == len(manifest["keys"]) == 32 * 8 + 1
    assert pack_shapes == lavin_shapes


def test_one_adapter_equals_lavins_repadapter_router():
    tensors, config = load("adapter.safetensors")
    adapter = MMAdapter(config["in_features"], hidden=config["hidden_dim"], groups=config["groups"],
                        scale=config["scale"], temperature=config["t"]).eval()
    adapter.load_state_dict({pack_key(f"layers.0.adapter_attn.{k[len('weights.'):]}")[len("adapters.0."):]: v
                             for k, v in tensors.items() if k.startswith("weights.")})
    x = tensors["input"]
    with torch.no_grad():
        torch.testing.assert_close(adapter.route(x[:, 0]), tensors["routing_fp32"], rtol=0, atol=1e-6)
        ours = adapter(x)
        diff = (ours - tensors["output_fp32_routing"]).abs().max().item()
        print(f"adapter vs LaVIN (fp32 routing): max abs diff {diff:.3g}")
        assert diff <= 1e-5
        lavin_rounding = adapter(x, adapter.route(x[:, 0]).half())
        diff = (lavin_rounding - tensors["output"]).abs().max().item()
        print(f"adapter vs LaVIN (its fp16 routing): max abs diff {diff:.3g}; "
              f"without the rounding {(ours - tensors['output']).abs().max().item():.3g}")
        assert diff <= 1e-5


def lavin_blocks_as_llama(tensors: dict, config: dict):
    """An HF LlamaModel with LaVIN's block weights (q/k rows permuted from Meta's interleaved rotary layout to
    HF's half-split one, as transformers' LLaMA conversion does) and the pack's MM-Adapter from LaVIN's."""
    from transformers import LlamaConfig, LlamaModel
    dim, heads = config["dim"], config["n_heads"]
    hidden = int(2 * 4 * dim / 3)
    hidden = config["multiple_of"] * ((hidden + config["multiple_of"] - 1) // config["multiple_of"])
    llama_config = LlamaConfig(vocab_size=config["vocab"], hidden_size=dim, intermediate_size=hidden,
                               num_hidden_layers=config["n_layers"], num_attention_heads=heads,
                               num_key_value_heads=heads, rms_norm_eps=config["norm_eps"], rope_theta=10000.0,
                               max_position_embeddings=128, attention_bias=False, mlp_bias=False)
    llama_config._attn_implementation = "eager"
    model = LlamaModel(llama_config).eval()

    def rotary_rows(w):
        return w.view(heads, dim // heads // 2, 2, dim).transpose(1, 2).reshape(dim, dim)
    w = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    state = {"embed_tokens.weight": w["tok_embeddings.weight"], "norm.weight": w["norm.weight"]}
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        state.update({p + "self_attn.q_proj.weight": rotary_rows(w[p + "attention.wq.weight"]),
                      p + "self_attn.k_proj.weight": rotary_rows(w[p + "attention.wk.weight"]),
                      p + "self_attn.v_proj.weight": w[p + "attention.wv.weight"],
                      p + "self_attn.o_proj.weight": w[p + "attention.wo.weight"],
                      p + "mlp.gate_proj.weight": w[p + "feed_forward.w1.weight"],
                      p + "mlp.up_proj.weight": w[p + "feed_forward.w3.weight"],
                      p + "mlp.down_proj.weight": w[p + "feed_forward.w2.weight"],
                      p + "input_layernorm.weight": w[p + "attention_norm.weight"],
                      p + "post_attention_layernorm.weight": w[p + "ffn_norm.weight"]})
    model.load_state_dict(state, strict=True)
    adapters = MMAdapterSet(MMAdapterConfig(dim=dim, num_layers=config["n_layers"], hidden=config["adapter_dim"],
                                            scale=config["adapter_scale"], temperature=config["temperature"])).eval()
    adapters.load_state_dict({pack_key(k): v for k, v in w.items() if "adapter" in k}, strict=True)
    attach_mm_adapters(model, adapters, image_token_id=config["image_token"])
    return model, adapters


@pytest.mark.parametrize("lavin_rounding", [True, False], ids=["lavin-fp16-routing", "fp32-routing"])
def test_two_llama_blocks_with_the_decision_token_equal_lavins_uncached_and_cached(lavin_rounding):
    from transformers import DynamicCache
    tensors, config = load("blocks.safetensors")
    model, adapters = lavin_blocks_as_llama(tensors, config)
    if lavin_rounding:
        for adapter in adapters.adapters:
            with_lavin_fp16_routing(adapter)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    diffs = []
    with torch.no_grad():
        for indicator in (0, 1):
            tokens, expected = tensors[f"tokens_{indicator}"], tensors[f"output_{indicator}"]
            uncached = model(input_ids=tokens, use_cache=False).last_hidden_state
            cache, prefill = DynamicCache(config=model.config), 5
            steps = [model(input_ids=tokens[:, :prefill], use_cache=True, **{cache_name: cache}).last_hidden_state]
            for position in range(prefill, tokens.shape[1]):
                steps.append(model(input_ids=tokens[:, position:position + 1], use_cache=True,
                                   **{cache_name: cache}).last_hidden_state)
            cached = torch.cat(steps, dim=1)
            diffs += [(uncached - expected).abs().max().item(), (cached - expected).abs().max().item()]
    print(f"LLaMA blocks + MM-Adapter vs LaVIN ({'its fp16' if lavin_rounding else 'fp32'} routing), "
          f"uncached/cached per modality: max abs diff {max(diffs):.3g} ({', '.join(f'{d:.2g}' for d in diffs)})")
    # LaVIN's fp16 routing weights are off by up to 2^-11 relative; with that rounding the rest agrees to 1e-5
    assert max(diffs) <= (1e-5 if lavin_rounding else 2e-3)
