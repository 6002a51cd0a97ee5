"""MM-Adapter (MMIG Eq. 6): an exact identity at init, a real change once trained, attached to the VLM's layers."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.tiny_models import TINY_IDEFICS2  # noqa: E402
from mmig_core.mm_adapter import MMAdapter, MMAdapterConfig, MMAdapterSet, load_mm_adapters, save_mm_adapters  # noqa: E402
from mmig_core.mm_prompt import build_prompt  # noqa: E402
from mmig_core.model_files import ModelFilesError  # noqa: E402
from mmig_core.vlm import encode_prompts, load_vlm  # noqa: E402


def test_untrained_adapter_is_an_exact_identity():
    z = torch.randn(2, 7, 16)
    assert torch.equal(MMAdapter(16, hidden=8, groups=2)(z), z)


def test_router_mixes_two_experts():
    torch.manual_seed(0)
    adapter = MMAdapter(16, hidden=8, groups=2, scale=0.5)
    for expert in adapter.experts:
        torch.nn.init.normal_(expert.up.weight)
    z = torch.randn(3, 5, 16)
    w = adapter.route(z)
    assert w.shape == (3, 2) and torch.allclose(w.sum(-1), torch.ones(3))
    expected = z + 0.5 * (w[:, :1, None] * adapter.experts[0](z) + w[:, 1:, None] * adapter.experts[1](z))
    torch.testing.assert_close(adapter(z), expected)
    assert not torch.allclose(adapter(z), z)


def test_attached_to_the_vlm_identity_then_change(tiny_models, tmp_path):
    folder = tiny_models / TINY_IDEFICS2
    prompt = [build_prompt("a <image1> dog", {1: torch.rand(1, 20, 20, 3, generator=torch.Generator().manual_seed(0))})]
    plain = encode_prompts(load_vlm(folder), prompt).hidden_states
    text_layers = 2  # the tiny Idefics2's decoder depth
    fresh = save_mm_adapters(MMAdapterSet(MMAdapterConfig(dim=64, num_layers=text_layers)), tmp_path / "mm.safetensors")
    torch.testing.assert_close(encode_prompts(load_vlm(folder, mm_adapter_path=fresh), prompt).hidden_states, plain,
                               rtol=0, atol=0)
    trained = MMAdapterSet(MMAdapterConfig(dim=64, num_layers=text_layers))
    for adapter in trained.adapters:
        torch.nn.init.normal_(adapter.experts[0].up.weight, std=0.5)
    path = save_mm_adapters(trained, tmp_path / "trained.safetensors")
    assert load_mm_adapters(path).config == trained.config
    changed = encode_prompts(load_vlm(folder, mm_adapter_path=path), prompt).hidden_states
    assert not torch.allclose(changed, plain)
    wrong = save_mm_adapters(MMAdapterSet(MMAdapterConfig(dim=64, num_layers=3)), tmp_path / "wrong.safetensors")
    with pytest.raises(ModelFilesError, match="3 adapters but the language model has 2"):
        load_vlm(folder, mm_adapter_path=wrong)
