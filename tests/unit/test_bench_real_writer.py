"""bench/_real.py's streamed checkpoint writer: the file reads back with safetensors, 0-d tensors included (the
real SDXL's CLIP-G logit_scale is one, and the first 512 px SDXL run failed on it)."""
import math

import torch
from safetensors.torch import load_file

from bench import _real


def test_the_streamed_file_reads_back_with_every_shape_and_dtype(tmp_path):
    layout = {"conditioner.embedders.1.model.logit_scale": ((), torch.float16),
              "model.diffusion_model.out.2.weight": ((4, 320, 3, 3), torch.float16),
              "model.diffusion_model.out.2.bias": ((4,), torch.float32),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": ((1, 77), torch.int64)}
    path = _real.stream_safetensors(tmp_path / "x.safetensors", layout, 0, "test")
    state = load_file(str(path))
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == layout
    assert math.isclose(float(state["conditioner.embedders.1.model.logit_scale"]), math.log(100.0), rel_tol=1e-3)
    assert torch.equal(state["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None])
    assert torch.equal(state["model.diffusion_model.out.2.bias"], torch.zeros(4))
    weight = state["model.diffusion_model.out.2.weight"].float()
    assert 0.5 < weight.std() * math.sqrt(320 * 9) < 1.5  # N(0, 1/fan_in)
    assert not (tmp_path / "x.partial").exists()
