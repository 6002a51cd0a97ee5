"""MMIG MMSM Loader / Apply inside a real ComfyUI server, on the tiny SDXL, Idefics2 and MMSM."""
import pytest
import torch
from safetensors.torch import load_file

from devtools.tiny_mmsm import build_tiny_mmsm
from devtools.tiny_models import TINY_IDEFICS2, TINY_MMSM, TINY_MUMU_ADAPTER, TINY_SDXL

pytestmark = pytest.mark.host
MMSM_NAME = TINY_MMSM.split("/")[-1]


def ksampler(model, prefix):
    return {
        "sample": {"class_type": "KSampler", "inputs": {
            "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": None, "filename_prefix": prefix}},
    }


def mmsm_graph(mmsm_name=MMSM_NAME, strength=1.0, *, embeds_from_mumu=False):
    """Tiny SDXL sampled twice, plain and with MMSM fed by MLLM Describe's e_llm; both latents saved.

    With `embeds_from_mumu`, e_llm comes from MUMU Encode instead and only the MMSM branch is sampled: the
    graph then has no output node that does not depend on MMSM, so a refused MMSM input refuses the graph."""
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0x3366CC}},
        "prompt": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "<image1> make it red",
                                                                     "image1": ["img", 0]}},
        "vlm": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": TINY_IDEFICS2.split("/")[-1], "dtype": "auto",
                                                           "drop_perceiver": False, "image_resolution": 448}},
        "describe": {"class_type": "MMIG_MLLMDescribe", "inputs": {
            "vlm": ["vlm", 0], "mm_prompt": ["prompt", 0], "mode": "describe",
            "when_tags_missing": "use whole response", "max_new_tokens": 4}},
        "mmsm": {"class_type": "MMIG_MMSMLoader", "inputs": {"mmsm_name": mmsm_name}},
        "apply": {"class_type": "MMIG_MMSMApply", "inputs": {
            "model": ["ckpt", 0], "mmsm": ["mmsm", 0], "llm_embeds": ["describe", 2], "strength": strength}},
    }
    branches = [("plain", ["ckpt", 0]), ("mmsm", ["apply", 0])]
    if embeds_from_mumu:
        del graph["describe"]
        graph["vlm"]["inputs"]["drop_perceiver"] = True
        graph["adapter"] = {"class_type": "MMIG_AdapterLoader",
                            "inputs": {"adapter_name": TINY_MUMU_ADAPTER.split("/")[-1], "dtype": "auto"}}
        graph["mumu"] = {"class_type": "MMIG_MUMUEncode", "inputs": {
            "vlm": ["vlm", 0], "adapter": ["adapter", 0], "mm_prompt": ["prompt", 0], "width": 64, "height": 64}}
        graph["apply"]["inputs"]["llm_embeds"] = ["mumu", 1]
        branches = branches[1:]
    for tag, model in branches:
        nodes = ksampler(model, f"mmsm_test/{tag}")
        nodes["save"]["inputs"]["samples"] = [f"sample_{tag}", 0]
        graph[f"sample_{tag}"], graph[f"save_{tag}"] = nodes["sample"], nodes["save"]
    return graph


def saved_latents_of(host, result, *nodes):
    latents = []
    for node in nodes:
        [item] = result.outputs[node]["latents"]
        latents.append(load_file(str(host.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"])
    return latents


def saved_latents(host, result):
    return saved_latents_of(host, result, "save_plain", "save_mmsm")


def test_the_loader_lists_only_mmsm_files(host):
    info = host.object_info()
    names = info["MMIG_MMSMLoader"]["input"]["required"]["mmsm_name"][0]
    assert MMSM_NAME in names and not any("adapter" in n for n in names)  # MMSM files only
    assert info["MMIG_MMSMApply"]["output"] == ["MODEL"]


def test_an_untrained_mmsm_leaves_the_ksampler_output_unchanged(host):
    plain, with_mmsm = saved_latents(host, host.run_graph(mmsm_graph()).check())
    assert plain.shape == with_mmsm.shape == (1, 4, 8, 8)
    assert (with_mmsm - plain).abs().max().item() <= 1e-6


def test_a_trained_mmsm_changes_the_output_and_the_input_model_is_untouched(host):
    build_tiny_mmsm(host.scratch_models / "mmig" / "mmsm-trained.safetensors", seed=5, decoder_std=0.2)
    plain, with_mmsm = saved_latents(host, host.run_graph(mmsm_graph("mmsm-trained.safetensors")).check())
    assert (with_mmsm - plain).abs().max().item() > 1e-4
    # The plain KSampler shares the loader's MODEL with Apply; it must still match the untrained run's plain latent.
    reference, _ = saved_latents(host, host.run_graph(mmsm_graph()).check())
    assert torch.equal(plain, reference)


def test_width_mismatches_are_clear_errors_and_the_host_keeps_serving(host):
    folder = host.scratch_models / "mmig"
    build_tiny_mmsm(folder / "mmsm-other-unet.safetensors", feature_channels=128)
    build_tiny_mmsm(folder / "mmsm-other-llm.safetensors", text_dim=48)
    result = host.run_graph(mmsm_graph("mmsm-other-unet.safetensors"))
    assert not result.ok and "built for a UNet with 128 mid-block channels, but this model has 64" in result.error
    result = host.run_graph(mmsm_graph("mmsm-other-llm.safetensors"))
    assert not result.ok and "width 64, but this MMSM takes 48" in result.error
    result = host.run_graph(mmsm_graph("no-such-mmsm.safetensors", embeds_from_mumu=True))
    assert not result.ok and "MMSM 'no-such-mmsm.safetensors' not found" in result.error
    # Still serving, and e_llm from MUMU Encode works too.
    [with_mmsm] = saved_latents_of(host, host.run_graph(mmsm_graph(embeds_from_mumu=True)).check(), "save_mmsm")
    assert torch.isfinite(with_mmsm).all()


def test_the_full_mmig_workflow_writes_an_image_and_its_caption_beside_it(host):
    import json

    from PIL import Image

    from devtools.run import run_workflow
    from devtools.workflows import WORKFLOWS_DIR

    api = json.loads((WORKFLOWS_DIR / "mmig_full.api.json").read_text())
    assert {"MMIG_MLLMDescribe", "MMIG_MMSMApply", "MMIG_LayeredEmbeddings", "MMIG_AStarGuidance",
            "MMIG_BLIP2Caption"} <= {node["class_type"] for node in api.values()}
    messages = []
    code, files = run_workflow(host, api, tiny=True, log=messages.append)
    assert code == 0, "\n".join(messages) + "\n" + host.log_tail()
    [image] = [f for f in files if f.suffix == ".png"]
    [caption] = [f for f in files if f.suffix == ".txt"]
    # Beside the image: the same folder, the caption's name is the image's prefix + "_caption", same counter.
    assert caption.parent == image.parent
    assert caption.name == image.name.replace("full_", "full_caption_").replace(".png", ".txt")
    assert caption.read_text(encoding="utf-8").strip()
    with Image.open(image) as png:
        assert png.size == (128, 128)  # the tiny run's input image size: an edit keeps the input's size
