"""Issue 15, "also measure": after a graph with each pack node that takes a MODEL, a plain KSampler on the same
loaded checkpoint (the host's cached loader output, shared with the node) gives a bit-identical latent to the one
before. Each node's graph samples with its own MODEL output (or conditioning), so its patches are really loaded
into, and taken back out of, the shared weights."""
import itertools

import pytest
from safetensors.torch import load_file

from devtools.tiny_mmsm import build_tiny_mmsm
from devtools.tiny_models import TINY_IDEFICS2, TINY_LORA, TINY_MUMU_BUNDLE, TINY_SDXL

pytestmark = pytest.mark.host
PROMPT = "a photo of a cat and a dog"
TRAINED_MMSM = "mmsm-trained-for-identity.safetensors"
IDS = itertools.count()  # a new node id per sampler: the host would serve a known node's output from its cache


def base():
    """The shared part: every graph holds these ids with these inputs, so the host keeps one loaded checkpoint."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def sample(graph, model, positive=("pos", 0)):
    """Add a KSampler on `model` and a SaveLatent; returns the SaveLatent's id."""
    n = next(IDS)
    graph[f"k{n}"] = {"class_type": "KSampler", "inputs": {
        "seed": 5, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": model, "positive": list(positive), "negative": ["neg", 0], "latent_image": ["latent", 0]}}
    graph[f"s{n}"] = {"class_type": "SaveLatent", "inputs": {"samples": [f"k{n}", 0],
                                                              "filename_prefix": f"identity/{n}"}}
    return f"s{n}"


def vlm_loader(drop_perceiver=False):
    return {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": TINY_IDEFICS2.split("/")[-1], "dtype": "auto",
                                                       "drop_perceiver": drop_perceiver, "image_resolution": 448}}


def astar(mode):
    return {"a": {"class_type": "MMIG_AStarGuidance", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "prompt": PROMPT, "concepts": "cat, dog", "guided_steps": 2,
        "scale_factor": 20.0, "threshold": 0.5, "refine_at_steps": "0", "max_refine_iters": 2, "mode": mode,
        **({"refine_thresholds": "0.8"} if mode == "attend_and_excite" else {})}}}, \
        ("a", 0), None


def layered():
    return {"m": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
            "l": {"class_type": "MMIG_LayeredEmbeddings", "inputs": {
                "model": ["ckpt", 0], "latent": ["latent", 0], "mask": ["m", 0], "foreground": ["pos", 0],
                "background": ["neg", 0], "steps": 2, "learning_rate": 0.01, "alpha": 0.7, "seed": 0}}}, \
        ("ckpt", 0), ("l", 0)


def mmsm():
    return {"img": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1,
                                                           "color": 0x3366CC}},
            "mp": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "<image1> make it red",
                                                                     "image1": ["img", 0]}},
            "vlm": vlm_loader(),
            "describe": {"class_type": "MMIG_MLLMDescribe", "inputs": {
                "vlm": ["vlm", 0], "mm_prompt": ["mp", 0], "mode": "describe",
                "when_tags_missing": "use whole response", "max_new_tokens": 4}},
            "mmsm": {"class_type": "MMIG_MMSMLoader", "inputs": {"mmsm_name": TRAINED_MMSM}},
            "apply": {"class_type": "MMIG_MMSMApply", "inputs": {
                "model": ["ckpt", 0], "mmsm": ["mmsm", 0], "llm_embeds": ["describe", 2], "strength": 1.0}}}, \
        ("apply", 0), None


def lora_merge():
    return {"merge": {"class_type": "MMIG_LoRAMerge", "inputs": {
        "model": ["ckpt", 0], "lora_name": TINY_LORA.split("/")[-1], "strength": 0.7}}}, ("merge", 0), None


def mumu_loader():
    return {"vlm": vlm_loader(drop_perceiver=True),
            "bundle": {"class_type": "MMIG_MUMULoader", "inputs": {
                "bundle_name": TINY_MUMU_BUNDLE.split("/")[-1], "model": ["ckpt", 0], "vlm": ["vlm", 0],
                "unet_strength": 0.7, "vlm_strength": 1.0, "dtype": "auto"}}}, ("bundle", 0), None


def editing():
    """Direct Inversion + prompt-to-prompt on the shared checkpoint; the edited latent is what it samples."""
    target = "a photo of a cat and a fox"
    return {"tgt": {"class_type": "CLIPTextEncode", "inputs": {"text": target, "clip": ["ckpt", 1]}},
            "inv": {"class_type": "MMIG_DirectInversion", "inputs": {
                "model": ["ckpt", 0], "latent": ["latent", 0], "source": ["pos", 0], "steps": 3}},
            "p2p": {"class_type": "MMIG_PromptToPrompt", "inputs": {
                "model": ["ckpt", 0], "inversion": ["inv", 0], "source": ["pos", 0], "target": ["tgt", 0],
                "clip": ["ckpt", 1], "source_prompt": PROMPT, "target_prompt": target,
                "negative": ["neg", 0], "cfg": 7.5, "mode": "replace", "cross_replace_steps": 0.4,
                "self_replace_steps": 0.6}},
            "sv": {"class_type": "SaveLatent", "inputs": {"samples": ["p2p", 0],
                                                          "filename_prefix": "identity/edit"}}}, None, None


# The editing nodes take a MODEL but return a LATENT: they are run as they are, then the plain KSampler.
NODES = {"MMIG_DirectInversion MMIG_PromptToPrompt": editing,
         "MMIG_AStarGuidance a_star": lambda: astar("a_star"),
         "MMIG_AStarGuidance attend_and_excite": lambda: astar("attend_and_excite"),
         "MMIG_LayeredEmbeddings": layered, "MMIG_MMSMApply": mmsm, "MMIG_LoRAMerge": lora_merge,
         "MMIG_MUMULoader": mumu_loader}


def saved_latent_bytes(host, result, node):
    [item] = result.outputs[node]["latents"]
    tensor = load_file(str(host.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]
    return tensor.numpy().tobytes()


def plain_latent(host):
    graph = base()
    node = sample(graph, ["ckpt", 0])
    return saved_latent_bytes(host, host.run_graph(graph).check(), node)


def test_every_model_taking_node_is_listed(host):
    """NODES covers every pack node with a MODEL input, as the server lists them (a new one cannot skip the test)."""
    taking_model = sorted(name for name, info in host.object_info().items() if name.startswith("MMIG_")
                          and any(spec[0] == "MODEL" for group in info["input"].values() for spec in group.values()))
    assert taking_model == sorted({part for name in NODES for part in name.split() if part.startswith("MMIG_")})


def test_a_plain_ksampler_after_each_model_node_is_bit_identical(host):
    build_tiny_mmsm(host.scratch_models / "mmig" / TRAINED_MMSM, seed=5, decoder_std=0.2)  # one that changes the UNet
    before = plain_latent(host)
    assert plain_latent(host) == before  # the host's KSampler repeats exactly on the cached checkpoint
    for name, build in NODES.items():
        nodes, model, positive = build()
        graph = {**base(), **nodes}
        if model is None:  # a node that samples itself (the editing nodes)
            host.run_graph(graph).check()
        else:
            patched = sample(graph, list(model), positive or ("pos", 0))
            result = host.run_graph(graph).check()
            assert saved_latent_bytes(host, result, patched) != before, f"{name} did not change the sampled latent"
        assert plain_latent(host) == before, f"a plain KSampler after {name} gives another latent"
