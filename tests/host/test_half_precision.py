"""Every pack node in bf16 (issue 18 item 5), on the CPU: NaN-free and close to the same graph in fp32.

The bf16 server starts with the host's own precision flags (--bf16-unet, --bf16-vae, and --bf16-text-enc where
the host has it: the pinned 2024-03 host has only --fp16-text-enc); the pack's loaders get dtype bf16. On a CPU
the host stores the UNet in bf16 but computes in fp32 (it picks bf16 arithmetic only on GPUs), so the graphs put
the test-only MMIGTest_StorageDtypeCompute after the checkpoint: the UNet then computes in bf16 as on a GPU,
and the pack's attention patches, MMSM and guidance losses meet bf16 activations. The fp32 reference is the
same graph on the session's server with fp32 everywhere.

Tolerances are relative L2 errors ||bf16 - fp32|| / ||fp32|| of each output: bf16 keeps 8 significant bits
(relative rounding 2^-9, about 0.2 %), and a few layers of tiny random weights grow that to a few percent. They
are stated next to each output below; a dtype mismatch, an fp16/bf16 overflow or a loss computed in bf16 would
show as an error or NaN, or as errors far above them.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from devtools.host import HostServer
from devtools.tiny_mmsm import build_tiny_mmsm
from devtools.tiny_models import TINY_BLIP2, TINY_DIFFRIR, TINY_IDEFICS2, TINY_MUMU_ADAPTER, TINY_SD15, TINY_SDXL

pytestmark = pytest.mark.host
TEST_NODES = Path(__file__).parent / "mmig_test_nodes"
LIVE_MMSM = "mmig-test-half-mmsm.safetensors"  # an MMSM whose decoder is not zero, so it changes the UNet
# Relative L2 error allowed per output (see the module docstring).
TOLERANCE = {
    "mumu.tokens": 0.05, "mumu.pooled": 0.05, "mumu.llm_embeds": 0.05,   # VLM + adapter, a few layers
    "mmsm.latent": 0.05, "astar.latent": 0.05,                          # 2 sampling steps of the tiny UNet
    "layered.tokens": 0.05,                                             # 2 optimiser steps through the UNet
    "diffrir.image": 0.05,                                              # restoration network, 4 diffusion steps
}
# Measured on the pinned host (2 cores, torch CPU): 0.028 / 0.020 / 0.019 (MUMU), 0.022 (MMSM), 0.023 (A-STAR),
# 0.007 (layered), 0.002 (DiffRIR). Direct Inversion + Prompt-to-Prompt is NaN-free in bf16 but its latent moves
# by ~0.7 relative to fp32 (DDIM inversion amplifies rounding step by step; PnPInversion itself runs in fp32):
# it is checked for NaN only, and is an open item of issue 18.


def _text_encoder_flag(host_dir):
    cli_args = (host_dir / "comfy" / "cli_args.py").read_text(errors="replace")
    return "--bf16-text-enc" if '"--bf16-text-enc"' in cli_args else "--fp16-text-enc"


@pytest.fixture(scope="module")
def live_mmsm(host):
    build_tiny_mmsm(host.scratch_models / "mmig" / LIVE_MMSM, seed=5, decoder_std=0.05)
    return LIVE_MMSM


@pytest.fixture(scope="module")
def bf16_host(tiny_models, host, live_mmsm):
    flags = ["--bf16-unet", "--bf16-vae", _text_encoder_flag(host.host)]
    server = HostServer([tiny_models, host.scratch_models], with_tiny_support=True,
                        extra_custom_nodes=[TEST_NODES], extra_args=flags)
    with server:
        failure = server.pack_import_failure()
        if failure:
            pytest.fail(f"the host failed to import the pack with {flags}:\n{failure}")
        yield server


def _sampler(model, positive, negative, latent, steps=2, sampler="euler"):
    return {"class_type": "KSampler", "inputs": {
        "seed": 3, "steps": steps, "cfg": 5.0, "sampler_name": sampler, "scheduler": "normal", "denoise": 1.0,
        "model": model, "positive": positive, "negative": negative, "latent_image": latent}}


def half_graph(dtype, bf16_compute, mmsm_name):
    """Every pack node with a numeric output, digested; `dtype` for the pack's loaders."""
    unet = ["compute", 0] if bf16_compute else ["ckpt", 0]
    sd15 = ["compute15", 0] if bf16_compute else ["ckpt15", 0]
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat and a dog", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x3366CC}},
        "ref": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xCC8844}},
        "mask": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "half_mask": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
        "hole": {"class_type": "MaskComposite", "inputs": {"destination": ["half_mask", 0], "source": ["mask", 0],
                                                           "x": 16, "y": 16, "operation": "add"}},
        # MUMU: VLM + adapter -> conditioning and e_llm
        "prompt": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "a <image1> dog", "image1": ["img", 0]}},
        "vlm": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": TINY_IDEFICS2.split("/")[-1], "dtype": dtype,
                                                           "drop_perceiver": True, "image_resolution": 448}},
        "adapter": {"class_type": "MMIG_AdapterLoader",
                    "inputs": {"adapter_name": TINY_MUMU_ADAPTER.split("/")[-1], "dtype": dtype}},
        "mumu": {"class_type": "MMIG_MUMUEncode", "inputs": {"vlm": ["vlm", 0], "adapter": ["adapter", 0],
                                                             "mm_prompt": ["prompt", 0], "width": 64, "height": 64}},
        "mumu_d": {"class_type": "MMIGTest_TensorDigest", "inputs": {"conditioning": ["mumu", 0],
                                                                     "llm_embeds": ["mumu", 1]}},
        # MLLM Describe: generation through the VLM (its perceiver kept)
        "vlm_chat": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": TINY_IDEFICS2.split("/")[-1],
                                                                "dtype": dtype, "drop_perceiver": False,
                                                                "image_resolution": 448}},
        "describe": {"class_type": "MMIG_MLLMDescribe", "inputs": {
            "vlm": ["vlm_chat", 0], "mm_prompt": ["prompt", 0], "mode": "describe",
            "when_tags_missing": "use whole response", "max_new_tokens": 3}},
        "describe_d": {"class_type": "MMIGTest_TensorDigest", "inputs": {"llm_embeds": ["describe", 2]}},
        # MMSM in the UNet, sampled
        "mmsm": {"class_type": "MMIG_MMSMLoader", "inputs": {"mmsm_name": mmsm_name}},
        "apply": {"class_type": "MMIG_MMSMApply", "inputs": {"model": unet, "mmsm": ["mmsm", 0],
                                                             "llm_embeds": ["mumu", 1], "strength": 1.0}},
        "mmsm_s": _sampler(["apply", 0], ["pos", 0], ["neg", 0], ["latent", 0]),
        "mmsm_d": {"class_type": "MMIGTest_TensorDigest", "inputs": {"latent": ["mmsm_s", 0]}},
        # A-STAR guidance, sampled
        "astar": {"class_type": "MMIG_AStarGuidance", "inputs": {
            "model": unet, "clip": ["ckpt", 1], "prompt": "a photo of a cat and a dog", "concepts": "cat, dog",
            "guided_steps": 2, "scale_factor": 20.0, "threshold": 0.5}},
        "astar_s": _sampler(["astar", 0], ["pos", 0], ["neg", 0], ["latent", 0]),
        "astar_d": {"class_type": "MMIGTest_TensorDigest", "inputs": {"latent": ["astar_s", 0]}},
        # Layered embeddings fitted through the UNet
        "layered": {"class_type": "MMIG_LayeredEmbeddings", "inputs": {
            "model": unet, "latent": ["latent", 0], "mask": ["hole", 0], "foreground": ["pos", 0],
            "background": ["neg", 0], "steps": 1, "learning_rate": 0.01, "alpha": 0.7, "seed": 0}},
        "layered_d": {"class_type": "MMIGTest_TensorDigest", "inputs": {"conditioning": ["layered", 0]}},
        # Direct inversion + prompt-to-prompt on the tiny SD1.x
        "ckpt15": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SD15.split("/")[-1]}},
        "src15": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["ckpt15", 1]}},
        "tgt15": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a dog", "clip": ["ckpt15", 1]}},
        "neg15": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt15", 1]}},
        "enc15": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["ckpt15", 2]}},
        "invert": {"class_type": "MMIG_DirectInversion", "inputs": {"model": sd15, "latent": ["enc15", 0],
                                                                    "source": ["src15", 0], "steps": 2}},
        "p2p": {"class_type": "MMIG_PromptToPrompt", "inputs": {
            "model": sd15, "inversion": ["invert", 0], "source": ["src15", 0], "target": ["tgt15", 0],
            "clip": ["ckpt15", 1], "source_prompt": "a photo of a cat", "target_prompt": "a photo of a dog",
            "negative": ["neg15", 0], "cfg": 7.5, "mode": "replace", "cross_replace_steps": 0.4,
            "self_replace_steps": 0.6}},
        "edit_d": {"class_type": "MMIGTest_TensorDigest", "inputs": {"latent": ["p2p", 0]}},
        # DiffRIR restoration and BLIP-2 captions of fixed images (not of a VAE decode: the VAE differs too)
        "small": {"class_type": "ImageScale", "inputs": {"image": ["img", 0], "upscale_method": "nearest-exact",
                                                         "width": 32, "height": 32, "crop": "disabled"}},
        "small_ref": {"class_type": "ImageScale", "inputs": {"image": ["ref", 0], "upscale_method": "nearest-exact",
                                                             "width": 32, "height": 32, "crop": "disabled"}},
        "small_hole": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}},
        "diffrir": {"class_type": "MMIG_DiffRIRLoader",
                    "inputs": {"model_name": TINY_DIFFRIR.split("/")[-1], "dtype": dtype}},
        "restore": {"class_type": "MMIG_DiffRIRRestore", "inputs": {
            "diffrir": ["diffrir", 0], "image": ["small", 0], "reference": ["small_ref", 0], "mask": ["small_hole", 0],
            "paste_back": False, "tile_size": 0, "tile_overlap": 0, "seed": 0}},
        "diffrir_d": {"class_type": "MMIGTest_TensorDigest", "inputs": {"image": ["restore", 0]}},
        "blip2": {"class_type": "MMIG_BLIP2Loader", "inputs": {"model_name": TINY_BLIP2.split("/")[-1], "dtype": dtype}},
        "caption": {"class_type": "MMIG_BLIP2Caption", "inputs": {
            "blip2": ["blip2", 0], "images": ["img", 0], "max_new_tokens": 4, "num_beams": 2, "sampling": False,
            "seed": 0}},
        "report": {"class_type": "MMIGTest_PackModelMemory", "inputs": {
            "nonce": 0, "vlm": ["vlm", 0], "adapter": ["adapter", 0], "blip2": ["blip2", 0], "diffrir": ["diffrir", 0],
            "after_string": ["caption", 0], "after_image": ["restore", 0], "after_conditioning": ["mumu", 0]}},
    }
    if bf16_compute:
        g["compute"] = {"class_type": "MMIGTest_StorageDtypeCompute", "inputs": {"model": ["ckpt", 0]}}
        g["compute15"] = {"class_type": "MMIGTest_StorageDtypeCompute", "inputs": {"model": ["ckpt15", 0]}}
    return g


def digests(result):
    out = {}
    for node, prefix in (("mumu_d", "mumu"), ("describe_d", "describe"), ("mmsm_d", "mmsm"), ("astar_d", "astar"),
                         ("layered_d", "layered"), ("edit_d", "edit"), ("diffrir_d", "diffrir")):
        for key, digest in result.outputs[node]["digest"][0].items():
            out[f"{prefix}.{key}"] = digest
    return out


def relative_error(values, reference):
    diff = math.sqrt(sum((a - b) ** 2 for a, b in zip(values, reference)))
    norm = math.sqrt(sum(b * b for b in reference))
    return diff / max(norm, 1e-12)


@pytest.fixture(scope="module")
def both_runs(host, bf16_host, live_mmsm):
    reference = host.run_graph(half_graph("fp32", False, live_mmsm))
    assert reference.ok, reference.error + "\n" + host.log_tail()
    half = bf16_host.run_graph(half_graph("bf16", True, live_mmsm))
    assert half.ok, half.error + "\n" + bf16_host.log_tail()
    return reference, half


def test_every_node_runs_in_bf16_nan_free_and_close_to_fp32(both_runs):
    reference, half = both_runs
    ref, got = digests(reference), digests(half)
    assert sorted(ref) == sorted(got)
    # The pack's models really were in bf16 (their outputs are cast to fp32 for the host), the reference in fp32.
    for run, dtype in ((half, "torch.bfloat16"), (reference, "torch.float32")):
        models = {entry["name"]: entry for entry in run.outputs["report"]["memory"]}
        for name in ("vlm", "adapter", "blip2", "diffrir"):
            # (bf16 models may keep a few fp32 tensors: rotary frequencies, BLIP-2's Q-Former layer norms)
            assert dtype in models[name]["dtypes"], (name, models[name]["dtypes"])
            assert run is half or models[name]["dtypes"] == [dtype], (name, models[name]["dtypes"])
    errors = {}
    for key, digest in got.items():
        assert digest["finite"], f"{key}: NaN or Inf in bf16"
        assert ref[key]["finite"], f"{key}: NaN or Inf in fp32"
        if key in TOLERANCE:  # (MLLM Describe's e_llm covers the generated tokens, which bf16 may change)
            assert digest["shape"] == ref[key]["shape"], key
            errors[key] = relative_error(digest["values"], ref[key]["values"])
    assert set(errors) == set(TOLERANCE)
    too_far = {k: f"{e:.4f} > {TOLERANCE[k]}" for k, e in errors.items() if e > TOLERANCE[k]}
    assert not too_far, f"bf16 outputs too far from fp32 (relative L2): {too_far}; all: {errors}"


def test_captions_and_descriptions_come_out_in_bf16(both_runs):
    _reference, half = both_runs
    captions = half.outputs["caption"]["text"]
    assert len(captions) == 1 and captions[0].strip()
    assert half.outputs["describe"]["text"][0].strip()


def test_guidance_maps_and_losses_are_fp32_from_bf16_activations():
    # What the A-STAR / A&E capture and the Layered Embeddings fit compute from a bf16 UNet's activations:
    # maps and losses in float32 (bf16's 8 bits would flatten softmax maps and round small losses to 0).
    import torch

    from devtools.pack import import_pack_module
    from devtools import tiny_sdxl
    tiny_sdxl.import_host()
    astar = import_pack_module("mmig_core.astar")
    layered = import_pack_module("mmig_core.layered_embeddings")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 32, generator=gen).bfloat16()
    k = torch.randn(1, 77, 32, generator=gen).bfloat16()
    probs = astar.attention_probabilities(q, k, heads=2)
    maps = astar.concept_maps([astar.text_token_maps(probs, [1, 2, 3])], (8, 8), [[0], [2]])
    ae_maps = astar.attend_excite_maps([probs.sum(dim=1)], 2, (8, 8), [1, 3])
    losses = {"segregation": astar.segregation_loss(astar.normalise(maps)),
              "retention": astar.retention_loss(maps, astar.binarise(maps)),
              "attend_excite": astar.attend_excite_loss(ae_maps),
              "layered": layered.masked_noise_loss(torch.randn(1, 4, 8, 8, generator=gen).bfloat16(),
                                                   torch.randn(1, 4, 8, 8, generator=gen).bfloat16(),
                                                   torch.ones(1, 1, 8, 8))}
    assert probs.dtype == maps.dtype == ae_maps.dtype == torch.float32
    for name, loss in losses.items():
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all(), name
    # ...and close to the same computation from fp32 activations (the bf16 rounding of q and k only).
    reference = astar.concept_maps([astar.text_token_maps(astar.attention_probabilities(q.float(), k.float(), 2),
                                                          [1, 2, 3])], (8, 8), [[0], [2]])
    assert torch.allclose(maps, reference, atol=1e-6)
