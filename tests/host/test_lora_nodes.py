"""MMIG LoRA Merge inside a real ComfyUI server, on the tiny SDXL: tiny LoRAs in the three layouts, and one file
per format the host's Load LoRA reads, each merged by both nodes and compared weight by weight."""
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from devtools.paths import REPO_ROOT
from devtools.tiny_lora import (LORA_TARGETS, expected_merge, format_state_dict, kohya_name, random_lora, unet_tensors,
                                unet_weights, write_lora)
from devtools.tiny_models import TINY_IDEFICS2, TINY_SDXL
from devtools.tiny_mumu_bundle import build_bundle

pytestmark = pytest.mark.host
CHECKPOINT = TINY_SDXL.split("/")[-1]
LAYOUTS = ("kohya", "diffusers", "peft")
STRENGTH = 0.7
KEYS = ",".join(f"diffusion_model.{m}.weight" for m in LORA_TARGETS)


@pytest.fixture(scope="module")
def loras(host, tiny_models):
    """The base weights, the LoRA and its file names in the host's loras folder."""
    weights = unet_weights(tiny_models / TINY_SDXL)
    lora = random_lora(weights, seed=11)
    folder = host.scratch_models / "loras"
    names = {layout: write_lora(lora, layout, folder / f"mmig-test-lora-{layout}.safetensors").name
             for layout in LAYOUTS}
    return weights, lora, names


def merge(model, lora_name, strength=STRENGTH, **optional):
    return {"class_type": "MMIG_LoRAMerge", "inputs": {"model": model, "lora_name": lora_name,
                                                       "strength": strength, **optional}}


def weight_values(model):
    return {"class_type": "MMIGTest_WeightValues", "inputs": {"model": model, "keys": KEYS}}


def reported(result, node):
    values = result.outputs[node]["weights"][0]
    return {key[len("diffusion_model."):-len(".weight")]: torch.tensor(v["values"], dtype=torch.float64)
            .reshape(v["shape"]) for key, v in values.items()}


def test_merge_in_three_layouts_matches_w_plus_sba_and_leaves_the_input_untouched(host, loras):
    weights, lora, names = loras
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
             "base": weight_values(["1", 0]),
             "zero": merge(["1", 0], names["kohya"], strength=0.0), "zero_w": weight_values(["zero", 0])}
    for layout in LAYOUTS:
        graph[layout] = merge(["1", 0], names[layout])
        graph[layout + "_w"] = weight_values([layout, 0])
    graph["save"] = {"class_type": "CheckpointSave", "inputs": {
        "model": ["kohya", 0], "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": "checkpoints/mmig-lora-merged"}}
    result = host.run_graph(graph).check()

    expected = expected_merge(weights, lora, STRENGTH)
    for layout in LAYOUTS:
        merged = reported(result, layout + "_w")
        for module in LORA_TARGETS:
            assert (merged[module] - expected[module]).abs().max().item() <= 1e-6, (layout, module)
        assert f"matched: {len(LORA_TARGETS)}/{len(LORA_TARGETS)} (100.0 %)" in result.outputs[layout]["text"][0]
    kohya = reported(result, "kohya_w")
    for layout in ("diffusers", "peft"):
        for module in LORA_TARGETS:
            assert torch.allclose(reported(result, layout + "_w")[module], kohya[module], atol=1e-6, rtol=0)
    # The input MODEL has no patches and its original weights; strength 0 changes nothing, bit for bit.
    assert result.outputs["base"]["patched_keys"] == [0]
    for module in LORA_TARGETS:
        assert torch.equal(reported(result, "base")[module], weights[module].double())
        assert torch.equal(reported(result, "zero_w")[module], weights[module].double())

    # Save Checkpoint baked the merge: the saved file loads back with the merged weights.
    saved, = (host.output_dir / "checkpoints").glob("mmig-lora-merged*.safetensors")
    with safe_open(str(saved), "pt") as f:
        for module in LORA_TARGETS:
            baked = f.get_tensor(f"model.diffusion_model.{module}.weight").double()
            assert (baked - expected[module]).abs().max().item() <= 1e-6, module


def test_the_host_lora_loader_reads_an_exported_kohya_file_with_the_same_weights(host, loras):
    _weights, _lora, names = loras
    folder = host.scratch_models / "loras"
    exported = folder / "mmig-test-lora-exported-kohya.safetensors"
    done = subprocess.run([sys.executable, "-m", "training.export_lora_kohya", str(folder / names["peft"]),
                           str(exported)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
             "host": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                             "lora_name": exported.name,
                                                             "strength_model": STRENGTH, "strength_clip": 0.0}},
             "host_w": weight_values(["host", 0]),
             "pack": merge(["1", 0], names["peft"]), "pack_w": weight_values(["pack", 0])}
    result = host.run_graph(graph).check()
    by_host, by_pack = reported(result, "host_w"), reported(result, "pack_w")
    for module in LORA_TARGETS:
        assert (by_host[module] - by_pack[module]).abs().max().item() <= 1e-6, module


def test_a_lora_for_another_architecture_fails_with_the_report_and_the_host_keeps_serving(host, loras):
    folder = host.scratch_models / "loras"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    from mmig_core.lora import save_lora_file
    save_lora_file({f"{name}.lora_down.weight": torch.zeros(4, 768), f"{name}.lora_up.weight": torch.zeros(320, 4)},
                   folder / "mmig-test-lora-sd15.safetensors")
    (folder / "mmig-test-lora-corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    load = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}}

    failed = host.run_graph({**load, "2": merge(["1", 0], "mmig-test-lora-sd15.safetensors")})
    assert failed.error and "0.0 %" in failed.error and name in failed.error and "min_matched_fraction" in failed.error
    corrupt = host.run_graph({**load, "2": merge(["1", 0], "mmig-test-lora-corrupt.safetensors")})
    assert corrupt.error and "not a valid safetensors" in corrupt.error

    # A lower threshold lets a partly matching LoRA through; the server still serves after the failures.
    _weights, _lora, names = loras
    ok = host.run_graph({**load, "2": merge(["1", 0], names["kohya"], min_matched_fraction=0.5)}).check()
    assert "100.0 %" in ok.outputs["2"]["text"][0]


def test_mumu_bundle_merges_both_loras_and_warns_about_another_vlm_base(host, tiny_models, loras):
    weights, lora, _names = loras
    vlm_name = TINY_IDEFICS2.split("/")[-1]
    build_bundle(host.scratch_models / "mmig" / "mmig-test-bundle", tiny_models, seed=11)
    build_bundle(host.scratch_models / "mmig" / "mmig-test-bundle-other-base", tiny_models, "idefics2-8b", seed=11)

    def encode(vlm):
        return {"class_type": "MMIG_MUMUEncode", "inputs": {"vlm": vlm, "adapter": ["b1", 2], "mm_prompt": ["p", 0],
                                                            "width": 1024, "height": 1024}}

    def bundle(name, vlm_strength):
        return {"class_type": "MMIG_MUMULoader", "inputs": {
            "bundle_name": name, "model": ["1", 0], "vlm": ["v", 0], "unet_strength": STRENGTH,
            "vlm_strength": vlm_strength, "dtype": "auto"}}

    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
             "v": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": vlm_name, "dtype": "auto",
                                                              "drop_perceiver": True, "image_resolution": 448}},
             "i": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": 0x3366CC}},
             "p": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "a <image1> dog", "image1": ["i", 0]}},
             "b1": bundle("mmig-test-bundle", 1.0), "b0": bundle("mmig-test-bundle", 0.0),
             "other": bundle("mmig-test-bundle-other-base", 1.0),
             "e_plain": encode(["v", 0]), "e1": encode(["b1", 1]), "e0": encode(["b0", 1]),
             "c_plain": {"class_type": "MMIGTest_ConditioningInfo", "inputs": {"conditioning": ["e_plain", 0]}},
             "c1": {"class_type": "MMIGTest_ConditioningInfo", "inputs": {"conditioning": ["e1", 0]}},
             "c0": {"class_type": "MMIGTest_ConditioningInfo", "inputs": {"conditioning": ["e0", 0]}},
             "w": weight_values(["b1", 0])}
    result = host.run_graph(graph).check()
    expected = expected_merge(weights, lora, STRENGTH)
    merged = reported(result, "w")
    for module in LORA_TARGETS:
        assert (merged[module] - expected[module]).abs().max().item() <= 1e-6, module
    means = {node: result.outputs[node]["conditioning"][0]["means"] for node in ("c_plain", "c1", "c0")}
    assert means["c0"] == means["c_plain"] and means["c1"] != means["c_plain"]  # the input VLM stays as it was
    report = result.outputs["b1"]["text"][0]
    assert "VLM LoRA:" in report and "matched: 4/4 (100.0 %)" in report and "Warning" not in report
    other = result.outputs["other"]["text"][0]
    assert "idefics2-8b" in other and vlm_name in other and "Warning" in other


def test_the_loaders_list_the_tiny_lora_and_bundle(host):
    info = host.object_info()
    assert "mmig-tiny-lora.safetensors" in info["MMIG_LoRAMerge"]["input"]["required"]["lora_name"][0]
    assert "mmig-tiny-mumu-bundle" in info["MMIG_MUMULoader"]["input"]["required"]["bundle_name"][0]
    missing = host.run_graph({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": merge(["1", 0], "no-such-lora.safetensors")})
    assert missing.error and "ComfyUI/models/loras/" in missing.error


# Formats whose file both nodes read; DoRA (the pinned host's loader skips dora_scale) and LoKr's Tucker convs (the
# host's own computation fails) are the two that differ, tested below.
SAME_AS_LOAD_LORA = ("locon", "tucker_locon", "loha", "loha_tucker", "lokr", "diff")


def test_every_format_gives_exactly_the_weights_of_the_hosts_load_lora(host, tiny_models):
    tensors = unet_tensors(tiny_models / TINY_SDXL)
    folder = host.scratch_models / "loras"
    keys = [f"diffusion_model.{m}.weight" for m in LORA_TARGETS] + [
        f"diffusion_model.{m}.bias" for m in LORA_TARGETS if f"{m}.bias" in tensors]
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}}
    for fmt in SAME_AS_LOAD_LORA + ("dora",):
        from mmig_core.lora import save_lora_file
        name = f"mmig-test-format-{fmt}.safetensors"
        save_lora_file(format_state_dict(tensors, fmt, seed=7), folder / name)
        graph[f"{fmt}_host"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["1", 0], "lora_name": name, "strength_model": STRENGTH}}
        graph[f"{fmt}_pack"] = merge(["1", 0], name)
        for side in ("host", "pack"):
            graph[f"{fmt}_{side}_w"] = {"class_type": "MMIGTest_WeightValues",
                                        "inputs": {"model": [f"{fmt}_{side}", 0], "keys": ",".join(keys)}}
    result = host.run_graph(graph).check()

    def values(node):
        return {k: torch.tensor(v["values"], dtype=torch.float64) for k, v in result.outputs[node]["weights"][0].items()}

    for fmt in SAME_AS_LOAD_LORA:
        by_host, by_pack = values(f"{fmt}_host_w"), values(f"{fmt}_pack_w")
        changed = [k for k in keys if not torch.equal(by_host[k], torch.tensor(
            tensors[k[len("diffusion_model."):]].flatten().tolist(), dtype=torch.float64))]
        assert len(changed) >= len(LORA_TARGETS), (fmt, len(changed))  # the host's loader did merge them
        for key in keys:
            assert torch.equal(by_pack[key], by_host[key]), (fmt, key)
        assert "(100.0 %)" in result.outputs[f"{fmt}_pack"]["text"][0]
    # DoRA: the pinned host's Load LoRA merges it as a plain LoRA (it skips dora_scale); the pack does not.
    # A host that reads dora_scale applies it itself, and both nodes agree again.
    report = result.outputs["dora_pack"]["text"][0]
    by_host, by_pack = values("dora_host_w"), values("dora_pack_w")
    if "DoRA computed by the pack" in report:
        assert all(not torch.equal(by_pack[k], by_host[k]) for k in keys if k.endswith(".weight"))
    else:
        assert all(torch.equal(by_pack[k], by_host[k]) for k in keys)


def test_what_the_host_cannot_apply_is_an_error_naming_it_and_the_host_keeps_serving(host, tiny_models):
    tensors = unet_tensors(tiny_models / TINY_SDXL)
    folder = host.scratch_models / "loras"
    from mmig_core.lora import save_lora_file
    save_lora_file(format_state_dict(tensors, "lokr_tucker", seed=7), folder / "mmig-test-lokr-tucker.safetensors")
    save_lora_file({"emb_params": torch.zeros(2, 768)}, folder / "mmig-test-embedding.safetensors")
    load = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}}

    failed = host.run_graph({**load, "2": merge(["1", 0], "mmig-test-lokr-tucker.safetensors")})
    tucker_convs = [kohya_name(m) for m in LORA_TARGETS if tensors[m + ".weight"].ndim == 4
                    and tensors[m + ".weight"].shape[-1] == 3]
    assert failed.error and "min_matched_fraction" in failed.error
    assert all(name in failed.error for name in tucker_convs)
    embedding = host.run_graph({**load, "2": merge(["1", 0], "mmig-test-embedding.safetensors")})
    assert embedding.error and "textual-inversion embedding" in embedding.error

    # Lowered on purpose: the rest merges and the report names what was dropped.
    ok = host.run_graph({**load, "2": merge(["1", 0], "mmig-test-lokr-tucker.safetensors",
                                            min_matched_fraction=0.5)}).check()
    report = ok.outputs["2"]["text"][0]
    assert "DROPPED, not merged (3)" in report and all(name in report for name in tucker_convs)
