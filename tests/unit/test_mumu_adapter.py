"""The MUMU adapter (mmig_core.mumu_adapter): SDXL shapes, 77-token padding, safetensors round trip."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mmig_core.model_files import ModelFilesError
from mmig_core.mumu_adapter import MUMUAdapter, MUMUAdapterConfig, init_adapter, load_adapter, save_adapter


@pytest.fixture
def adapter():
    return init_adapter(MUMUAdapter(MUMUAdapterConfig(input_dim=24, width=16, num_layers=2, num_heads=2)),
                        seed=1, std=0.2).eval()


def states(b, length, dim=24, seed=0):
    return torch.randn(b, length, dim, generator=torch.Generator().manual_seed(seed))


def test_default_config_is_mumus_sixteen_layers():
    config = MUMUAdapterConfig(input_dim=4096)
    assert (config.num_layers, config.context_dim, config.pooled_dim, config.pad_multiple) == (16, 2048, 1280, 77)


@pytest.mark.parametrize("length, padded", [(1, 77), (77, 77), (78, 154), (200, 231)])
def test_sdxl_shapes_padded_to_multiples_of_77(adapter, length, padded):
    context, pooled = adapter(states(2, length))
    assert context.shape == (2, padded, 2048) and pooled.shape == (2, 1280)
    assert torch.isfinite(context).all() and torch.isfinite(pooled).all()


def test_padding_does_not_change_real_tokens(adapter):
    x = states(1, 10)
    context, pooled = adapter(x)
    adapter.config.pad_multiple = 5  # 10 tokens need no padding at all now
    unpadded, pooled_unpadded = adapter(x)
    assert unpadded.shape[1] == 10
    torch.testing.assert_close(context[:, :10], unpadded)
    torch.testing.assert_close(pooled, pooled_unpadded)


def test_batch_masks_keep_each_prompt_as_if_alone(adapter):
    short, long = states(1, 5, seed=1), states(1, 12, seed=2)
    batch = torch.zeros(2, 12, 24)
    batch[0, :5], batch[1] = short[0], long[0]
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :5], mask[1] = True, True
    context, pooled = adapter(batch, mask)
    alone, alone_pooled = adapter(short)
    torch.testing.assert_close(context[0, :5], alone[0, :5])
    torch.testing.assert_close(pooled[0], alone_pooled[0])
    assert not torch.allclose(pooled[0], pooled[1])


def test_wrong_input_width_is_named(adapter):
    with pytest.raises(ValueError, match="24"):
        adapter(states(1, 4, dim=32))


def test_round_trip_through_safetensors(adapter, tmp_path):
    path = save_adapter(adapter, tmp_path / "adapter.safetensors")
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    loaded = load_adapter(path)
    assert loaded.config == adapter.config
    x = states(1, 9)
    torch.testing.assert_close(loaded(x), adapter(x))


def test_files_that_are_not_adapters_are_refused(adapter, tmp_path):
    other = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ModelFilesError, match="not a MUMU adapter"):
        load_adapter(other)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    tensors = {k: v for k, v in adapter.state_dict().items() if not k.startswith("pool_")}
    meta = {"format": "mmig-mumu-adapter", "config": json.dumps(adapter.config.__dict__)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    with pytest.raises(ModelFilesError, match="missing"):
        load_adapter(path)
