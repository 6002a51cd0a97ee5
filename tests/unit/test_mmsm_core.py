"""MMSM (MMIG Eqs. 9-13): shapes, identity at init, the loss by hand, and the safetensors round trip."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from devtools.tiny_mmsm import build_tiny_mmsm, tiny_mmsm_config
from mmig_core.mmsm import MMSM, FORMAT, OutputBlockPatch, init_mmsm, load_mmsm, mmsm_loss, save_mmsm
from mmig_core.model_files import ModelFilesError


def random_inputs(batch=2, tokens=5, side=4, seed=0):
    config = tiny_mmsm_config()
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, tokens, config.text_dim, generator=g)
    features = torch.randn(batch, config.feature_channels, side, side, generator=g)
    return text, features


@pytest.mark.parametrize("batch,side", [(1, 8), (2, 12), (2, 16)])
def test_shapes_hold_and_an_untrained_mmsm_is_the_identity(batch, side):
    mmsm = init_mmsm(MMSM(tiny_mmsm_config()), seed=1)
    text, features = random_inputs(batch=batch, side=side)
    mask = torch.ones(batch, text.shape[1], dtype=torch.bool)
    e3, e2, e4 = mmsm.encode(text, mask, features)
    assert e3.shape == (batch, text.shape[1], 32) and e2.shape == e4.shape == (batch, side * side, 32)
    assert torch.equal(mmsm(text, features, mask), features)


def test_a_trained_decoder_changes_the_features_and_masked_tokens_are_ignored():
    mmsm = init_mmsm(MMSM(tiny_mmsm_config()), seed=1, decoder_std=0.1)
    text, features = random_inputs(batch=1, tokens=4)
    out = mmsm(text, features)
    assert out.shape == features.shape and (out - features).abs().max() > 1e-3
    padded = torch.cat([text, torch.randn(1, 3, text.shape[-1]) * 50], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    assert torch.allclose(mmsm(padded, features, mask), out, atol=1e-5)


def test_loss_matches_a_hand_computation():
    e3 = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # the last token is padding
    mask = torch.tensor([[True, True, False]])
    e2 = torch.tensor([[[0.0, 0.0], [2.0, 2.0], [1.0, 4.0], [1.0, 2.0]]])
    # pooled e_3 = (2, 3); pooled e_2 = (1, 2); 1/2 * ((2-1)^2 + (3-2)^2) = 1
    assert mmsm_loss(e3, e2, mask).item() == pytest.approx(1.0)
    # Without a mask every token counts: pooled e_3 = (104/3, 106/3).
    expected = 0.5 * ((104 / 3 - 1) ** 2 + (106 / 3 - 2) ** 2)
    assert mmsm_loss(e3, e2).item() == pytest.approx(expected, rel=1e-6)


def test_weights_and_config_round_trip_through_safetensors(tmp_path):
    path = build_tiny_mmsm(tmp_path / "m.safetensors", seed=3, decoder_std=0.05, insertion_index=1)
    loaded = load_mmsm(path)
    original = init_mmsm(MMSM(tiny_mmsm_config(insertion_index=1)), seed=3, decoder_std=0.05)
    assert loaded.config == original.config and loaded.config.insertion_index == 1
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelFilesError, match="not found"):
        load_mmsm(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, other, metadata={"format": "something-else"})
    with pytest.raises(ModelFilesError, match="is not an MMSM"):
        load_mmsm(other)
    path = save_mmsm(MMSM(tiny_mmsm_config()), tmp_path / "m.safetensors")
    tensors = load_file(path)
    tensors.pop("domain_decoder.weight")
    config = json.dumps(tiny_mmsm_config().__dict__)
    save_file(tensors, path, metadata={"format": FORMAT, "config": config})
    with pytest.raises(ModelFilesError, match="missing"):
        load_mmsm(path)


def test_width_mismatches_name_both_sizes():
    mmsm = MMSM(tiny_mmsm_config())
    with pytest.raises(ValueError, match="width 48, but this MMSM takes 64"):
        OutputBlockPatch(mmsm, torch.zeros(1, 3, 48), None, 1.0)
    text, _ = random_inputs()
    with pytest.raises(ValueError, match="have 32 channels, but this MMSM was built for 64"):
        mmsm(text, torch.zeros(2, 32, 4, 4))


def test_patch_gives_cond_chunks_the_embedding_and_uncond_chunks_zeros():
    mmsm = init_mmsm(MMSM(tiny_mmsm_config()), seed=2, decoder_std=0.1)
    text, features = random_inputs(batch=1)
    fired = []
    patch = OutputBlockPatch(mmsm, text, None, 1.0, on_fire=fired.append)
    h = torch.cat([features, features])
    out, hsp = patch(h, "skip", {"block": ("output", 0), "cond_or_uncond": [0, 1]})
    assert hsp == "skip" and fired == [("output", 0)]
    assert torch.allclose(out[:1], mmsm(text, features))
    assert torch.allclose(out[1:], mmsm(torch.zeros(1, 1, text.shape[-1]), features))
    same, _ = patch(h, None, {"block": ("output", 1), "cond_or_uncond": [0, 1]})
    assert same is h and fired == [("output", 0)]


def test_a_patch_made_under_inference_mode_lets_a_gradient_pass_through():
    # The host loads the MMSM and computes the LLM embedding under inference mode; A-STAR then runs the UNet,
    # this patch included, with gradients outside it (nodes/_guidance.py).
    options = {"block": ("output", 0), "cond_or_uncond": [0, 1]}
    with torch.inference_mode():
        mmsm = init_mmsm(MMSM(tiny_mmsm_config()), seed=2, decoder_std=0.1)
        text, features = random_inputs(batch=1)
        patch = OutputBlockPatch(mmsm, text, torch.ones(1, text.shape[1]), 1.0)
        expected, _ = patch(torch.cat([features, features]), None, options)
    assert mmsm.domain_decoder.weight.is_inference() and patch.hidden_states.is_inference()
    decoder_before = mmsm.domain_decoder.weight.clone()
    h = torch.cat([features, features]).clone().requires_grad_(True)
    out, _ = patch(h, None, options)
    out.pow(2).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert torch.allclose(out, expected)
    weight = mmsm.domain_decoder.weight
    assert not weight.is_inference() and not weight.requires_grad and weight.grad is None
    assert torch.equal(weight, decoder_before)
    assert not patch.hidden_states.is_inference() and not patch.attention_mask.is_inference()
    with torch.inference_mode():  # and the host's own passes still run it
        again, _ = patch(torch.cat([features, features]), None, options)
    assert torch.allclose(again, expected)
