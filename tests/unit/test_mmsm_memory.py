"""MMIG MMSM Apply hands the MMSM to the host's memory manager: loading the patched MODEL for sampling
(comfy.model_management.load_models_gpu, as KSampler does) puts the MMSM's weights on the device and in the
dtype the UNet runs with. Runs the pack's node class in-process, with the host's own loader and ModelPatcher."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.pack import import_pack_module as pack_module  # noqa: E402
from devtools.tiny_mmsm import tiny_mmsm_config  # noqa: E402

def import_pack():
    return pack_module("nodes.mmsm"), pack_module("mmig_core.mmsm"), pack_module("mmig_core.vlm")


@pytest.fixture(scope="module")
def unet(load_tiny_sdxl_in_host):
    return load_tiny_sdxl_in_host()[0]


def test_loading_the_patched_model_moves_the_mmsm_to_the_unets_device_and_dtype(unet):
    import comfy.model_management

    nodes, core, vlm = import_pack()
    # float64 is a dtype no UNet runs in: only the host's model management can have changed it.
    mmsm = core.init_mmsm(core.MMSM(tiny_mmsm_config()), seed=1, decoder_std=0.05).to(torch.float64)
    text = torch.randn(1, 5, mmsm.config.text_dim, generator=torch.Generator().manual_seed(0))
    host_helpers = pack_module("nodes._host")
    loaded = nodes.LoadedMMSM(mmsm, "in-memory", host_helpers.managed(mmsm))
    embeds = vlm.LLMEmbeds(hidden_states=text, attention_mask=torch.ones(1, 5, dtype=torch.bool))
    options_before = repr(unet.model_options)

    (patched,) = nodes.MMIG_MMSMApply().apply(unet, loaded, embeds, 1.0)
    assert repr(unet.model_options) == options_before  # the input MODEL is not patched
    assert {p.dtype for p in mmsm.parameters()} == {torch.float64}  # nothing moved until the host loads it
    if hasattr(patched, "get_additional_models"):  # newer hosts also load the MMSM's ModelPatcher when sampling
        assert patched.get_additional_models() == [loaded.patcher]
        assert not unet.get_additional_models()

    comfy.model_management.load_models_gpu([patched])
    unet_param = next(patched.model.diffusion_model.parameters())
    assert unet_param.dtype == patched.model_dtype()
    assert {(p.device, p.dtype) for p in mmsm.parameters()} == {(unet_param.device, unet_param.dtype)}

    # Offloading the UNet takes the MMSM to the UNet's offload device as well.
    comfy.model_management.unload_all_models()
    assert {p.device for p in mmsm.parameters()} == {torch.device(patched.offload_device)}
