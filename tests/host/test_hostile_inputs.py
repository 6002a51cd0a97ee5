"""Hostile inputs against the real server: each case is a graph a careless or hostile user could send, and the
words its error must contain (the node and the input to fix, not only that something failed). After each case a
small valid graph must still run in the same server.

To add a case: one `Case(id, graph builder, words)` in CASES (builders get the `host` fixture, for scratch model
folders). `words` are matched case-insensitively against the whole error the host reported.
"""
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import pytest

from devtools.tiny_models import TINY_BLIP2, TINY_DIFFRIR, TINY_IDEFICS2, TINY_LORA, TINY_MMSM, TINY_MUMU_ADAPTER, \
    TINY_MUMU_BUNDLE, TINY_SDXL

pytestmark = pytest.mark.host
NAN, INF = math.nan, math.inf
CKPT = TINY_SDXL.split("/")[-1]
SEEDS = itertools.count(1000)  # a new seed per check: the host would serve a repeated graph from its cache


def name_of(tiny: str) -> str:
    return tiny.split("/")[-1]


# -- graph pieces ---------------------------------------------------------------------------------------------------
def base(prompt="a photo of a cat and a dog") -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x3366CC}},
    }


def sampled(graph: dict, model=("ckpt", 0), positive=("pos", 0), seed=0, steps=2) -> dict:
    """Adds a KSampler and a SaveLatent (the graph's only output)."""
    graph["sample"] = {"class_type": "KSampler", "inputs": {
        "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": list(model), "positive": list(positive), "negative": ["neg", 0], "latent_image": ["latent", 0]}}
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "hostile/ok"}}
    return graph


def non_finite(graph: dict, value="nan") -> list:
    """A test node whose outputs are the image with a `value` pixel (0), a mask (1), the number (2), a latent (3)."""
    graph["bad"] = {"class_type": "MMIGTest_NonFinite", "inputs": {"image": ["img", 0], "value": value}}
    return ["bad", 0]


def valid_graph() -> dict:
    return sampled(base("a red house"), seed=next(SEEDS), steps=1)


# -- hostile graphs, one per node ----------------------------------------------------------------------------------
def mmsm_apply(strength=1.0, **_):
    graph = base()
    graph.update({
        "prompt": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "<image1> make it red", "image1": ["img", 0]}},
        "vlm": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": name_of(TINY_IDEFICS2), "dtype": "auto",
                                                           "drop_perceiver": True, "image_resolution": 448}},
        "adapter": {"class_type": "MMIG_AdapterLoader", "inputs": {"adapter_name": name_of(TINY_MUMU_ADAPTER),
                                                                   "dtype": "auto"}},
        "mumu": {"class_type": "MMIG_MUMUEncode", "inputs": {"vlm": ["vlm", 0], "adapter": ["adapter", 0],
                                                             "mm_prompt": ["prompt", 0], "width": 64, "height": 64}},
        "mmsm": {"class_type": "MMIG_MMSMLoader", "inputs": {"mmsm_name": name_of(TINY_MMSM)}},
        "apply": {"class_type": "MMIG_MMSMApply", "inputs": {"model": ["ckpt", 0], "mmsm": ["mmsm", 0],
                                                             "llm_embeds": ["mumu", 1], "strength": strength}},
    })
    return sampled(graph, model=("apply", 0))


def lora_merge(strength=1.0, linked_strength=None, **optional):
    graph = base()
    graph["merge"] = {"class_type": "MMIG_LoRAMerge", "inputs": {
        "model": ["ckpt", 0], "lora_name": name_of(TINY_LORA), "strength": strength, **optional}}
    if linked_strength is not None:
        non_finite(graph, linked_strength)
        graph["merge"]["inputs"]["strength"] = ["bad", 2]
    return graph  # LoRA Merge is an output node


def mumu_loader(unet_strength=1.0, vlm_strength=1.0, **optional):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "vlm": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": name_of(TINY_IDEFICS2), "dtype": "auto",
                                                           "drop_perceiver": True, "image_resolution": 448}},
        "bundle": {"class_type": "MMIG_MUMULoader", "inputs": {
            "bundle_name": name_of(TINY_MUMU_BUNDLE), "model": ["ckpt", 0], "vlm": ["vlm", 0],
            "unet_strength": unet_strength, "vlm_strength": vlm_strength, "dtype": "auto", **optional}},
    }  # the MUMU Loader is an output node


def layered(alpha=0.7, mask_value=1.0, bad_latent=None, **_):
    graph = base()
    graph["mask"] = {"class_type": "SolidMask", "inputs": {"value": mask_value, "width": 64, "height": 64}}
    graph["layered"] = {"class_type": "MMIG_LayeredEmbeddings", "inputs": {
        "model": ["ckpt", 0], "latent": ["latent", 0], "mask": ["mask", 0], "foreground": ["pos", 0],
        "background": ["neg", 0], "steps": 1, "learning_rate": 0.01, "alpha": alpha, "seed": 0}}
    if bad_latent is not None:
        non_finite(graph, bad_latent)
        graph["layered"]["inputs"]["latent"] = ["bad", 3]
    return sampled(graph, positive=("layered", 0))


def astar(**widgets):
    graph = base()
    graph["astar"] = {"class_type": "MMIG_AStarGuidance", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "prompt": "a photo of a cat and a dog", "concepts": "cat, dog",
        "guided_steps": 1, "scale_factor": 20.0, "threshold": 0.5, **widgets}}
    return sampled(graph, model=("astar", 0))


def diffrir(image="ok", reference="ok", mask="ok"):
    graph = base()
    graph["diffrir"] = {"class_type": "MMIG_DiffRIRLoader", "inputs": {"model_name": name_of(TINY_DIFFRIR),
                                                                       "dtype": "auto"}}
    graph["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    inputs = {"image": ["img", 0], "reference": ["img", 0], "mask": ["mask", 0]}
    for name, value in (("image", image), ("reference", reference), ("mask", mask)):
        if value != "ok":
            non_finite(graph, value)
            inputs[name] = ["bad", 1 if name == "mask" else 0]
    graph["restore"] = {"class_type": "MMIG_DiffRIRRestore", "inputs": {
        "diffrir": ["diffrir", 0], **inputs, "paste_back": True, "tile_size": 0, "tile_overlap": 0, "seed": 0}}
    graph["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["restore", 0]}}
    return graph


def blip2_caption(value="nan"):
    graph = base()
    non_finite(graph, value)
    graph["blip2"] = {"class_type": "MMIG_BLIP2Loader", "inputs": {"model_name": name_of(TINY_BLIP2), "dtype": "auto"}}
    graph["caption"] = {"class_type": "MMIG_BLIP2Caption", "inputs": {
        "blip2": ["blip2", 0], "images": ["bad", 0], "max_new_tokens": 4, "num_beams": 1, "sampling": False, "seed": 0}}
    return graph


def multimodal_prompt_image(value="nan"):
    graph = mmsm_apply()
    non_finite(graph, value)
    graph["prompt"]["inputs"]["image1"] = ["bad", 0]
    return graph


def vlm_lora_strength(value):
    graph = mmsm_apply()
    graph["vlm"]["inputs"]["lora_strength"] = value
    return graph


@dataclass
class Case:
    id: str
    graph: Callable  # host -> API-format graph
    words: tuple  # each must appear in the error (case-insensitive)


# The FLOAT widgets the issue names: refused by VALIDATE_INPUTS before anything runs.
FLOAT_WIDGETS = [
    Case("mmsm-strength-nan", lambda host: mmsm_apply(strength=NAN), ("MMIG MMSM Apply", "strength", "NaN")),
    Case("lora-strength-nan", lambda host: lora_merge(strength=NAN), ("MMIG LoRA Merge", "strength", "NaN")),
    Case("lora-min-matched-nan", lambda host: lora_merge(min_matched_fraction=NAN),
         ("MMIG LoRA Merge", "min_matched_fraction", "NaN")),
    Case("mumu-unet-strength-nan", lambda host: mumu_loader(unet_strength=NAN),
         ("MMIG MUMU Loader", "unet_strength", "NaN")),
    Case("mumu-vlm-strength-nan", lambda host: mumu_loader(vlm_strength=NAN),
         ("MMIG MUMU Loader", "vlm_strength", "NaN")),
    Case("mumu-min-matched-nan", lambda host: mumu_loader(min_matched_fraction=NAN),
         ("MMIG MUMU Loader", "min_matched_fraction", "NaN")),
    Case("vlm-lora-strength-nan", lambda host: vlm_lora_strength(NAN), ("MMIG VLM Loader", "lora_strength", "NaN")),
    Case("layered-alpha-nan", lambda host: layered(alpha=NAN), ("MMIG Layered Embeddings", "alpha", "NaN")),
    Case("astar-scale-factor-nan", lambda host: astar(scale_factor=NAN), ("MMIG A-STAR Guidance", "scale_factor", "NaN")),
    Case("astar-threshold-nan", lambda host: astar(threshold=NAN), ("MMIG A-STAR Guidance", "threshold", "NaN")),
    Case("astar-smoothing-sigma-nan", lambda host: astar(smoothing_sigma=NAN),
         ("MMIG A-STAR Guidance", "smoothing_sigma", "NaN")),
    # Infinities: the pinned host's own max check may answer first for a required input; both name the input.
    Case("astar-scale-factor-inf", lambda host: astar(scale_factor=INF), ("scale_factor", "inf")),
    Case("astar-smoothing-sigma-inf", lambda host: astar(smoothing_sigma=INF),
         ("MMIG A-STAR Guidance", "smoothing_sigma", "inf")),
    Case("lora-strength-minus-inf", lambda host: lora_merge(strength=-INF), ("strength", "-inf")),
    Case("lora-min-matched-above-max", lambda host: lora_merge(min_matched_fraction=2.0),
         ("min_matched_fraction", "2.0")),
]
# Values that exist only once the graph runs: a FLOAT from another node, and tensors.
RUNTIME_VALUES = [
    Case("lora-linked-strength-nan", lambda host: lora_merge(linked_strength="nan"),
         ("MMIG LoRA Merge", "strength is NaN", "the node connected to strength")),
    Case("layered-mask-nan-from-solid-mask", lambda host: layered(mask_value=NAN),
         ("MMIG Layered Embeddings", "mask", "NaN", "the node connected to mask")),
    Case("layered-latent-inf", lambda host: layered(bad_latent="inf"),
         ("MMIG Layered Embeddings", "latent", "Inf", "the node connected to latent")),
    Case("diffrir-image-nan", lambda host: diffrir(image="nan"),
         ("MMIG DiffRIR Restore", "image", "NaN", "the node connected to image")),
    Case("diffrir-reference-inf", lambda host: diffrir(reference="-inf"),
         ("MMIG DiffRIR Restore", "reference", "Inf", "the node connected to reference")),
    Case("diffrir-mask-nan", lambda host: diffrir(mask="nan"),
         ("MMIG DiffRIR Restore", "mask", "NaN", "the node connected to mask")),
    Case("blip2-images-nan", lambda host: blip2_caption("nan"),
         ("MMIG BLIP-2 Caption", "images", "NaN", "the node connected to images")),
    Case("multimodal-prompt-image-nan", lambda host: multimodal_prompt_image("nan"),
         ("MMIG Multimodal Prompt", "image1", "NaN", "the node connected to image1")),
]


# -- hostile weight files and configs (written into the scratch model folders) ----------------------------------
def nan_lora_file(host) -> dict:
    """MMIG LoRA Merge on the tiny LoRA with one NaN in its first tensor."""
    from safetensors.torch import load_file, save_file

    from devtools.tiny_models import ensure_tiny_models
    state = load_file(str(ensure_tiny_models() / TINY_LORA))
    first = next(iter(state))
    state[first] = state[first].clone()
    state[first].view(-1)[0] = NAN
    (host.scratch_models / "loras").mkdir(exist_ok=True)
    save_file(state, str(host.scratch_models / "loras" / "hostile-nan-lora.safetensors"))
    return lora_merge(lora_name="hostile-nan-lora.safetensors")


def zero_heads_mmsm(host) -> dict:
    """An MMSM whose metadata config asks for 0 heads (its weights never read)."""
    import json

    import torch
    from safetensors.torch import save_file
    config = {"text_dim": 64, "feature_channels": 64, "width": 32, "num_heads": 0, "mlp_hidden": 64}
    (host.scratch_models / "mmig").mkdir(exist_ok=True)
    save_file({"mlp.0.weight": torch.zeros(1)}, str(host.scratch_models / "mmig" / "hostile-zero-heads.safetensors"),
              metadata={"format": "mmig-mmsm", "format_version": "1", "config": json.dumps(config)})
    graph = mmsm_apply()
    graph["mmsm"]["inputs"]["mmsm_name"] = "hostile-zero-heads.safetensors"
    return graph


def mmsm_past_the_blocks(host) -> dict:
    """A working MMSM whose insertion point lies past the tiny UNet's output blocks."""
    from devtools.tiny_mmsm import build_tiny_mmsm
    build_tiny_mmsm(host.scratch_models / "mmig" / "hostile-past-blocks.safetensors", insertion_index=99)
    graph = mmsm_apply()
    graph["mmsm"]["inputs"]["mmsm_name"] = "hostile-past-blocks.safetensors"
    return graph


def adapter_for_768_d(host) -> dict:
    """MUMU Encode with an adapter built for a 768-d (SD1.5-width) context, on the SDXL graph."""
    from devtools.tiny_idefics2 import TEXT_HIDDEN
    from mmig_core.mumu_adapter import MUMUAdapter, MUMUAdapterConfig, init_adapter, save_adapter
    config = MUMUAdapterConfig(input_dim=TEXT_HIDDEN, width=32, num_layers=1, num_heads=2, context_dim=768)
    (host.scratch_models / "mmig").mkdir(exist_ok=True)
    save_adapter(init_adapter(MUMUAdapter(config)), host.scratch_models / "mmig" / "hostile-768-adapter.safetensors")
    graph = mmsm_apply()
    graph["adapter"]["inputs"]["adapter_name"] = "hostile-768-adapter.safetensors"
    return graph


HOSTILE_FILES = [
    Case("mumu-adapter-for-768-d-context", adapter_for_768_d,
         ("hostile-768-adapter.safetensors", "outputs 768-d context tokens", "SDXL's UNet takes 2048-d context")),
    Case("lora-file-with-nan", nan_lora_file, ("hostile-nan-lora.safetensors", "holds 1 NaN", "corrupt")),
    Case("mmsm-zero-heads", zero_heads_mmsm,
         ("hostile-zero-heads.safetensors", "num_heads must be a positive integer, got 0")),
    Case("mmsm-insertion-past-the-blocks", mmsm_past_the_blocks,
         ("hostile-past-blocks.safetensors", "is inserted at ('output', 99)", "output blocks",
          "insertion points are ('output', 0) to")),
]
CASES = FLOAT_WIDGETS + RUNTIME_VALUES + HOSTILE_FILES


def assert_still_serving(host):
    result = host.run_graph(valid_graph())
    assert result.ok, f"a valid graph failed after a hostile one: {result.error}"
    assert result.outputs.get("save"), "the valid graph ran but saved nothing"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_hostile_input_is_an_error_naming_what_to_fix_and_the_host_keeps_serving(host, case):
    result = host.run_graph(case.graph(host))
    assert not result.ok, f"{case.id}: the graph ran without an error"
    missing = [w for w in case.words if w.lower() not in result.error.lower()]
    assert not missing, f"{case.id}: the error lacks {missing}:\n{result.error}"
    assert_still_serving(host)


def test_the_valid_twins_of_the_hostile_graphs_run(host):
    # So that each case fails because of its one bad value, not a broken graph.
    for graph in (lora_merge(), layered(), astar(), diffrir()):
        assert host.run_graph(graph).ok, graph
