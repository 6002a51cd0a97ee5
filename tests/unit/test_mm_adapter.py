"""MM-Adapter (MMIG Eq. 6) as LaVIN's: identity at init, first-token routing held while decoding, one shared
down-projection, dropout in training, on the attention input after the norm; causal and cache-exact on the VLM."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.tiny_models import TINY_IDEFICS2  # noqa: E402
from mmig_core.mm_adapter import (FORMAT, MMAdapter, MMAdapterConfig, MMAdapterSet, load_mm_adapters,  # noqa: E402
                                  save_mm_adapters)
from mmig_core.mm_prompt import build_prompt  # noqa: E402
from mmig_core.model_files import ModelFilesError, save_safetensors_atomic  # noqa: E402
from mmig_core.vlm import chat_inputs, decoder_layers, encode_prompts, load_vlm  # noqa: E402

TEXT_LAYERS = 2  # the tiny Idefics2's decoder depth
TEXT_HIDDEN = 64


def trained_set(seed: int = 0, std: float = 0.3) -> MMAdapterSet:
    """An MM-Adapter set with every weight random (up-projections, router, modality embedding)."""
    torch.manual_seed(seed)
    adapters = MMAdapterSet(MMAdapterConfig(dim=TEXT_HIDDEN, num_layers=TEXT_LAYERS))
    for name, p in adapters.named_parameters():
        torch.nn.init.normal_(p, std=std if "router" not in name else 1.0)
    return adapters


def image_prompt(seed: int = 0):
    return build_prompt("a <image1> dog on the grass",
                        {1: torch.rand(1, 20, 20, 3, generator=torch.Generator().manual_seed(seed))})


@pytest.fixture(scope="module")
def vlm_with_adapter(tiny_models, tmp_path_factory):
    path = save_mm_adapters(trained_set(), tmp_path_factory.mktemp("mm") / "trained.safetensors")
    return load_vlm(tiny_models / TINY_IDEFICS2, mm_adapter_path=path)


def test_untrained_adapter_is_an_exact_identity():
    z = torch.randn(2, 7, 16)
    assert torch.equal(MMAdapter(16, hidden=8, groups=2)(z), z)


def test_one_shared_down_projection_two_grouped_ups_and_first_token_routing():
    torch.manual_seed(0)
    adapter = MMAdapter(16, hidden=8, groups=2, scale=0.5, temperature=10.0).eval()
    for p in adapter.parameters():
        torch.nn.init.normal_(p)
    assert adapter.down.weight.shape == (8, 16, 1) and adapter.down.groups == 1
    assert [(up.weight.shape, up.groups) for up in adapter.up] == [((16, 4, 1), 2)] * 2
    z = torch.randn(3, 5, 16)
    w = adapter.route(z[:, 0])
    torch.testing.assert_close(w, torch.softmax(adapter.router(z[:, 0]) / 10.0, -1))
    b = adapter.down(z.transpose(1, 2))
    mixed = w[:, 0, None, None] * adapter.up[0](b) + w[:, 1, None, None] * adapter.up[1](b)
    expected = z + 0.5 * mixed.transpose(1, 2)
    torch.testing.assert_close(adapter(z), expected)
    later = z.clone()
    later[:, 1:] = torch.randn(3, 4, 16)  # the routing reads the first token only
    torch.testing.assert_close(adapter.route(later[:, 0]), w)
    torch.testing.assert_close(adapter(later)[:, 0], adapter(z)[:, 0])


def test_dropout_on_the_bottleneck_in_training_only():
    torch.manual_seed(0)
    adapter = MMAdapter(16, hidden=8, groups=2, dropout=0.1)
    for up in adapter.up:
        torch.nn.init.normal_(up.weight)
    assert adapter.dropout.p == 0.1
    z = torch.randn(2, 64, 16)
    adapter.train()
    assert not torch.allclose(adapter(z), adapter(z))
    adapter.eval()
    assert torch.equal(adapter(z), adapter(z))


def test_attached_to_the_vlm_identity_then_change(tiny_models, tmp_path):
    folder = tiny_models / TINY_IDEFICS2
    prompt = [image_prompt()]
    plain = encode_prompts(load_vlm(folder), prompt).hidden_states
    fresh = save_mm_adapters(MMAdapterSet(MMAdapterConfig(dim=TEXT_HIDDEN, num_layers=TEXT_LAYERS)),
                             tmp_path / "mm.safetensors")
    torch.testing.assert_close(encode_prompts(load_vlm(folder, mm_adapter_path=fresh), prompt).hidden_states, plain,
                               rtol=0, atol=0)
    trained = trained_set()
    path = save_mm_adapters(trained, tmp_path / "trained.safetensors")
    loaded = load_mm_adapters(path)
    assert loaded.config == trained.config and not loaded.training
    changed = encode_prompts(load_vlm(folder, mm_adapter_path=path), prompt).hidden_states
    assert not torch.allclose(changed, plain)
    wrong = save_mm_adapters(MMAdapterSet(MMAdapterConfig(dim=TEXT_HIDDEN, num_layers=3)),
                             tmp_path / "wrong.safetensors")
    with pytest.raises(ModelFilesError, match="3 adapters but the language model has 2"):
        load_vlm(folder, mm_adapter_path=wrong)


def test_adapter_rewrites_the_attention_input_after_the_norm_not_the_residual_stream(vlm_with_adapter):
    vlm = vlm_with_adapter
    layer = decoder_layers(vlm.model)[1]
    adapter = vlm.model.mm_adapters.adapters[1]
    seen = {}

    def keep(name, pick):
        return lambda *hook_args: seen.__setitem__(name, pick(*hook_args))
    first_input = (lambda m, a, k: a[0] if a else k["hidden_states"])  # noqa: E731
    hooks = [layer.register_forward_pre_hook(keep("x", first_input), with_kwargs=True),
             layer.input_layernorm.register_forward_hook(keep("normed", lambda m, a, out: out)),
             layer.self_attn.register_forward_pre_hook(keep("attn_in", first_input), with_kwargs=True),
             layer.self_attn.register_forward_hook(keep("attn_out", lambda m, a, out: out[0])),
             layer.post_attention_layernorm.register_forward_pre_hook(keep("h", lambda m, a: a[0]))]
    try:
        with torch.no_grad():
            vlm.model(**chat_inputs(vlm, image_prompt()), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    normed = seen["normed"]
    torch.testing.assert_close(seen["attn_in"], adapter(normed, adapter.held))
    assert not torch.allclose(seen["attn_in"], normed)
    torch.testing.assert_close(seen["h"], seen["x"] + seen["attn_out"])  # the residual is the un-adapted input


def test_the_decision_token_routes_text_and_image_inputs_and_never_enters_the_sequence(vlm_with_adapter):
    vlm, adapters = vlm_with_adapter, vlm_with_adapter.model.mm_adapters
    seen = {}
    hook = vlm.model.model.text_model.register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("embeds", k["inputs_embeds"].clone()), with_kwargs=True)
    held = {}
    try:
        with torch.no_grad():
            for prompt, index in ((image_prompt(), 1), (build_prompt("a dog on the grass", {}), 0)):
                inputs = chat_inputs(vlm, prompt)
                vlm.model(**inputs, use_cache=False)
                # the host model's own embeddings: the modality embedding is not added to any token
                text_rows = inputs["input_ids"][0] != vlm.model.config.image_token_id
                plain = vlm.model.get_input_embeddings()(inputs["input_ids"])
                torch.testing.assert_close(seen["embeds"][0, text_rows], plain[0, text_rows], rtol=0, atol=0)
                held[index] = [a.held.clone() for a in adapters.adapters]
                for adapter, weights in zip(adapters.adapters, held[index]):
                    torch.testing.assert_close(weights[0], adapter.by_modality[index])
    finally:
        hook.remove()
    assert all(not torch.allclose(i, t) for i, t in zip(held[1], held[0]))


def test_position_i_never_sees_a_later_token(vlm_with_adapter):
    vlm = vlm_with_adapter
    inputs = chat_inputs(vlm, image_prompt())
    ids = inputs["input_ids"]
    cut = ids.shape[1] - 4
    changed = dict(inputs, input_ids=torch.cat([ids[:, :cut], torch.randint(3, 200, (1, 4))], dim=1))
    assert not torch.equal(changed["input_ids"], ids)
    with torch.no_grad():
        a = vlm.model(**inputs, use_cache=False).logits
        b = vlm.model(**changed, use_cache=False).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def test_cached_greedy_decoding_equals_an_uncached_pass_over_the_whole_sequence(vlm_with_adapter):
    vlm = vlm_with_adapter
    inputs = chat_inputs(vlm, image_prompt())
    start, new = inputs["input_ids"].shape[1], 6
    with torch.no_grad():
        out = vlm.model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                                 output_logits=True, return_dict_in_generate=True)
        sequence = out.sequences
        assert sequence.shape[1] == start + new
        full = dict(inputs, input_ids=sequence, attention_mask=torch.ones_like(sequence))
        uncached = vlm.model(**full, use_cache=False).logits[:, start - 1:-1]
    cached = torch.stack(out.logits, dim=1)
    print(f"cached vs uncached logits: max abs diff {(cached - uncached).abs().max().item():.3g}")
    # float32 rounding only: the cached pass multiplies one row at a time, the uncached one all rows at once, so the
    # sums run in another order (a fresh-clone CI run saw 1.13e-5 on logits of ~1); the tokens must be the same
    torch.testing.assert_close(cached, uncached, rtol=0, atol=5e-5)
    assert torch.equal(uncached.argmax(-1), sequence[:, start:])
    held = [a.held for a in vlm.model.mm_adapters.adapters]
    assert all(h is not None and h.shape == (1, 2) for h in held)


def test_a_file_in_the_old_layout_says_how_to_retrain(tmp_path):
    old_state = {f"adapters.0.experts.{e}.{part}.{kind}": torch.zeros(shape)
                 for e in range(2) for part, shapes in (("down", ((8, 64, 1), (8,))), ("up", ((64, 4, 1), (64,))))
                 for kind, shape in zip(("weight", "bias"), shapes)}
    old_state.update({"adapters.0.router.weight": torch.zeros(2, 64), "adapters.0.router.bias": torch.zeros(2)})
    path = save_safetensors_atomic(old_state, tmp_path / "old.safetensors", {
        "format": FORMAT, "config": '{"dim": 64, "num_layers": 1, "hidden": 8, "groups": 2, "scale": 1.0, '
                                    '"temperature": 10.0}'})
    with pytest.raises(ModelFilesError, match=r"layout version 1.*python -m training mmig --config "
                                              r"training/configs/mmig_stage2\.yaml"):
        load_mm_adapters(path)


def test_every_adapter_weight_trains_through_the_vlm(tiny_models, tmp_path):
    """Stage 2 back-propagates L_MMT into the routers and the decision token too, not only the experts."""
    path = save_mm_adapters(trained_set(seed=1), tmp_path / "trained.safetensors")
    vlm = load_vlm(tiny_models / TINY_IDEFICS2, mm_adapter_path=path)
    vlm.model.requires_grad_(False)
    adapters = vlm.model.mm_adapters.requires_grad_(True).train()
    logits = vlm.model(**chat_inputs(vlm, image_prompt()), use_cache=False).logits
    logits.float().pow(2).mean().backward()
    no_grad = [n for n, p in adapters.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], no_grad
    # an image prompt routes on the image row of the decision token only
    assert adapters.modality_embedding.weight.grad[1].abs().sum() > 0
    assert adapters.modality_embedding.weight.grad[0].abs().sum() == 0
