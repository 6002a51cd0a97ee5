"""The pack's models under the host's memory modes (issue 18 item 4): --lowvram, --novram and --cpu.

Two parts:
- In this process, with the host's own LoadedModel/ModelPatcher: the low-VRAM load path (taken on a GPU when a
  model does not fit, and always under --novram) puts every weight and buffer of each pack model on the load
  device. The load device is `meta` here, the one device besides the CPU that a CPU-only machine has, so
  "moved" and "left behind" can be told apart. A plain host ModelPatcher leaves BLIP-2's query tokens behind:
  that is the bug the pack's patcher fixes (nodes/_memory.py).
- A real server per flag (the session's --cpu server; --lowvram and --novram where a GPU is at hand: the host
  refuses them with --cpu and cannot start without it on a CPU-only machine): one graph runs every pack model
  (VLM + MUMU adapter, MMSM in sampling, BLIP-2, DiffRIR); the host lists them as loaded, all of each on its
  load device; after POST /free {"unload_models": true, "free_memory": true} none of them is listed any more
  and each is on its offload device. On a CPU machine load and offload devices are both the CPU, so the checks
  read the host's bookkeeping; on a GPU machine the same test checks real moves.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import torch

from devtools.host import HostServer
from devtools.tiny_models import (TINY_BLIP2, TINY_DIFFRIR, TINY_IDEFICS2, TINY_MMSM, TINY_MUMU_ADAPTER,
                                  TINY_SDXL)

pytestmark = pytest.mark.host
PACK_MODELS = ("adapter", "blip2", "diffrir", "mmsm", "vlm")
TEST_NODES = Path(__file__).parent / "mmig_test_nodes"
_nonce = itertools.count(1)


# -- in this process: the host's low-VRAM load path -------------------------------------------------------
def _pack():
    from devtools import tiny_sdxl
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from devtools.pack import import_pack_module
    return import_pack_module


def _load_pack_module(kind, tiny_models):
    pack = _pack()
    if kind == "blip2":
        return pack("mmig_core.blip2").load_blip2(tiny_models / TINY_BLIP2).model
    if kind == "vlm":
        return pack("mmig_core.vlm").load_vlm(tiny_models / TINY_IDEFICS2).model
    if kind == "adapter":
        return pack("mmig_core.mumu_adapter").load_adapter(tiny_models / TINY_MUMU_ADAPTER)
    if kind == "mmsm":
        return pack("mmig_core.mmsm").load_mmsm(tiny_models / TINY_MMSM)
    return pack("mmig_core.diffrir").load_diffrir(tiny_models / TINY_DIFFRIR)


def _low_vram_load(patcher):
    """What the host's load_models_gpu does for a model under --lowvram that does not fit, and under --novram:
    LoadedModel.model_load with a weight budget far below the model's size (1 byte)."""
    import comfy.model_management
    patcher.load_device = torch.device("meta")
    comfy.model_management.LoadedModel(patcher).model_load(lowvram_model_memory=1)
    tensors = list(patcher.model.parameters()) + list(patcher.model.buffers())
    return {str(t.device) for t in tensors}


@pytest.mark.parametrize("kind", PACK_MODELS)
def test_the_low_vram_load_path_moves_every_weight_and_buffer(tiny_models, kind):
    host_helpers = _pack()("nodes._host")
    patcher = host_helpers.managed(_load_pack_module(kind, tiny_models))
    assert _low_vram_load(patcher) == {"meta"}
    assert type(patcher.clone()) is type(patcher)  # a clone (e.g. the VLM LoRA's) loads whole as well


def test_a_plain_host_patcher_leaves_part_of_blip2_behind(tiny_models):
    # The control: the host's own patcher on the same model, same budget. If this ever moves everything, the
    # host learned to load plain torch modules in low-VRAM mode and the pack's patcher may go.
    import comfy.model_patcher
    host_helpers = _pack()("nodes._host")
    holder = host_helpers._holder(_load_pack_module("blip2", tiny_models))
    plain = comfy.model_patcher.ModelPatcher(holder, load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    assert "cpu" in _low_vram_load(plain)


def test_a_full_device_is_an_error_that_says_what_to_do(tiny_models, monkeypatch):
    import comfy.model_management
    host_helpers = _pack()("nodes._host")
    patcher = host_helpers.managed(_load_pack_module("diffrir", tiny_models))

    def out_of_memory(models, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    monkeypatch.setattr(comfy.model_management, "load_models_gpu", out_of_memory)
    with pytest.raises(RuntimeError) as error:
        host_helpers.load_to_device(patcher)
    message = str(error.value)
    assert "DiffRIR" in message and "MB of weights" in message and "--cpu" in message and "fp16" in message


# -- real servers, one per memory flag ------------------------------------------------------------------
@pytest.fixture(scope="module", params=["--cpu", "--lowvram", "--novram"])
def mode_host(request, tiny_models, host):
    if request.param == "--cpu":
        yield host  # the session's server: HostServer passes --cpu unless given a VRAM flag
        return
    if not torch.cuda.is_available():
        # The host refuses --lowvram/--novram together with --cpu, and needs a GPU without it; here the
        # in-process tests above run the load path these flags take.
        pytest.skip(f"{request.param} needs a GPU (the host takes it only without --cpu)")
    server = HostServer([tiny_models], with_tiny_support=True, extra_custom_nodes=[TEST_NODES],
                        extra_args=[request.param])
    with server:
        failure = server.pack_import_failure()
        if failure:
            pytest.fail(f"the host failed to import the pack under {request.param}:\n{failure}")
        yield server


def every_pack_model_graph():
    """Tiny SDXL sampled with MMSM fed by MUMU Encode (VLM + adapter), decoded, captioned by BLIP-2 and restored
    by DiffRIR; then the memory report, ordered after all of them."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x3366CC}},
        "mask": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "prompt": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "a <image1> dog", "image1": ["img", 0]}},
        "vlm": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": TINY_IDEFICS2.split("/")[-1], "dtype": "auto",
                                                           "drop_perceiver": True, "image_resolution": 448}},
        "adapter": {"class_type": "MMIG_AdapterLoader",
                    "inputs": {"adapter_name": TINY_MUMU_ADAPTER.split("/")[-1], "dtype": "auto"}},
        "mumu": {"class_type": "MMIG_MUMUEncode", "inputs": {"vlm": ["vlm", 0], "adapter": ["adapter", 0],
                                                             "mm_prompt": ["prompt", 0], "width": 64, "height": 64}},
        "mmsm": {"class_type": "MMIG_MMSMLoader", "inputs": {"mmsm_name": TINY_MMSM.split("/")[-1]}},
        "apply": {"class_type": "MMIG_MMSMApply", "inputs": {"model": ["ckpt", 0], "mmsm": ["mmsm", 0],
                                                             "llm_embeds": ["mumu", 1], "strength": 1.0}},
        "sample": {"class_type": "KSampler", "inputs": {
            "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["apply", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "blip2": {"class_type": "MMIG_BLIP2Loader", "inputs": {"model_name": TINY_BLIP2.split("/")[-1], "dtype": "auto"}},
        "caption": {"class_type": "MMIG_BLIP2Caption", "inputs": {
            "blip2": ["blip2", 0], "images": ["decode", 0], "max_new_tokens": 4, "num_beams": 1, "sampling": False,
            "seed": 0}},
        "diffrir": {"class_type": "MMIG_DiffRIRLoader",
                    "inputs": {"model_name": TINY_DIFFRIR.split("/")[-1], "dtype": "auto"}},
        "restore": {"class_type": "MMIG_DiffRIRRestore", "inputs": {
            "diffrir": ["diffrir", 0], "image": ["decode", 0], "reference": ["img", 0], "mask": ["mask", 0],
            "paste_back": True, "tile_size": 0, "tile_overlap": 0, "seed": 0}},
        "report": {"class_type": "MMIGTest_PackModelMemory", "inputs": {
            "nonce": next(_nonce), "vlm": ["vlm", 0], "adapter": ["adapter", 0], "blip2": ["blip2", 0],
            "diffrir": ["diffrir", 0], "mmsm": ["mmsm", 0], "after_image": ["restore", 0],
            "after_latent": ["sample", 0], "after_string": ["caption", 0], "after_conditioning": ["mumu", 0]}},
    }


def report_graph():
    return {"report": {"class_type": "MMIGTest_PackModelMemory", "inputs": {"nonce": next(_nonce)}}}


def free(server):
    """POST /free as the frontend's "Unload models" / "Free model and node cache" buttons do (no JSON back)."""
    import json
    import urllib.request
    request = urllib.request.Request(server.url + "/free", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"unload_models": True, "free_memory": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def memory_report(result):
    return {entry["name"]: entry for entry in result.outputs["report"]["memory"]}


def test_every_pack_model_runs_loads_and_is_offloaded_by_free(mode_host):
    before = memory_report(mode_host.run_graph(every_pack_model_graph()).check())
    assert sorted(before) == sorted(PACK_MODELS)
    for name, entry in before.items():
        assert entry["patcher_class"] == "PackModelPatcher", name
        assert entry["devices"] == [entry["load_device"]], name  # all of it on the device while in use
        if name != "mmsm":  # the MMSM rides on the UNet's patcher (and, on newer hosts, is loaded with it)
            assert entry["in_loaded_models"], f"{name} ran but the host does not list it as loaded"

    free(mode_host)
    # The host handles /free between prompts; a prompt queued in the same instant may run first.
    for _attempt in range(5):
        time.sleep(0.5)
        after = memory_report(mode_host.run_graph(report_graph()).check())
        if not any(entry["in_loaded_models"] for entry in after.values()):
            break
    for name, entry in after.items():
        assert not entry["in_loaded_models"], f"{name} is still loaded after /free"
        if entry["alive"]:
            assert entry["devices"] == [entry["offload_device"]], f"{name} left on {entry['devices']} after /free"
    assert mode_host.run_graph(every_pack_model_graph()).ok  # and everything loads again afterwards
