"""MMIG LoRA Merge against the hosts' own LoRA loaders, in-process on the tiny SDXL (real SDXL kohya names):
- the newest ComfyUI's weights per format (fixture tests/conformance/lora/formats.json), DoRA included, which
  the pinned host's loader cannot compute;
- the real SDXL UNet's LoRA key map of the host (fixture sdxl_unet_lora_keys.json) against the pack's own
  mapping, which training and the kohya export use without the host;
- what the pack refuses, and says, instead of merging part of a file silently.
Regenerate the fixtures: python -m devtools.conformance lora --reference <checkout of pollockjj/ComfyUI>."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from devtools.pack import import_pack_module as pack_module
from devtools.tiny_lora import FORMATS, format_state_dict, kohya_name, unet_tensors
from devtools.tiny_models import TINY_SDXL
from mmig_core import lora as core

FIXTURES = Path(__file__).parent / "lora"


def import_nodes():
    return pack_module("nodes.lora")


def lora_error():
    """The pack's LoRAError as the pack imported in-process raises it."""
    return pack_module("mmig_core.lora").LoRAError


@pytest.fixture(scope="module")
def host_model(load_tiny_sdxl_in_host, tiny_models):
    return load_tiny_sdxl_in_host()[0], unet_tensors(tiny_models / TINY_SDXL)


def patched_weight(model, key):
    """The weight as the host computes it when it loads `model` (its patches on the unpatched weight)."""
    import comfy.lora
    base = model.model_state_dict()[key].float().clone()
    if hasattr(comfy.lora, "calculate_weight"):
        return comfy.lora.calculate_weight(model.patches.get(key, []), base, key)
    return model.calculate_weight(model.patches.get(key, []), base, key)


def host_loader(model, state, strength):
    """The host's Load LoRA (LoraLoaderModelOnly) on the same tensors."""
    import comfy.sd
    return comfy.sd.load_lora_for_models(model, None, dict(state), strength, 0.0)[0]


# --- The newest host's weights, per format --------------------------------------------------------------------

FORMAT_FIXTURE = json.loads((FIXTURES / "formats.json").read_text())


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_merges_to_the_weights_the_newest_hosts_loader_gives(host_model, fmt):
    model, tensors = host_model
    lora = import_nodes()
    fixture = FORMAT_FIXTURE["formats"][fmt]
    state = format_state_dict(tensors, fmt, seed=fixture["seed"])
    worst = 0.0
    for strength in FORMAT_FIXTURE["strengths"]:
        # LoKr's Tucker 3x3 convs fail inside both hosts (torch.kron on a non-contiguous einsum): the newest host
        # leaves them unchanged with a log line, the pack refuses them unless told to merge the rest.
        fraction = 0.0 if fmt == "lokr_tucker" else 1.0
        merged, report = lora.merge_lora(model, state, strength, fraction, f"{fmt}:")
        for key, entry in fixture["targets"].items():
            base = tensors[key[len("diffusion_model."):]].double().flatten()
            assert base[entry["base"]["positions"]].tolist() == pytest.approx(entry["base"]["values"], abs=1e-7), \
                f"the tiny SDXL changed since the fixture was made: regenerate it ({key})"
            expected = entry[str(strength)]
            ours = patched_weight(merged, key).double().flatten()
            difference = (ours[expected["positions"]] - torch.tensor(expected["values"], dtype=torch.float64))
            worst = max(worst, difference.abs().max().item())
            assert ours.sum().item() == pytest.approx(expected["sum"], rel=1e-5, abs=1e-4), (key, strength)
    print(f"{fmt}: largest difference from the newest host's weights {worst:.3g}")  # shown with pytest -s
    assert worst <= 2e-6, f"{fmt}: largest difference from the newest host {worst:.3g}"
    if fmt == "lokr_tucker":
        assert "DROPPED, not merged (3)" in report and "view size is not compatible" in report
    else:
        assert "100.0 %" in report and "DROPPED" not in report


def test_dora_is_not_merged_as_a_plain_lora_on_a_host_without_dora(host_model):
    model, tensors = host_model
    lora = import_nodes()
    state = format_state_dict(tensors, "dora", seed=FORMAT_FIXTURE["formats"]["dora"]["seed"])
    merged, report = lora.merge_lora(model, state, 0.7, 1.0, "dora:")
    by_host = host_loader(model, state, 0.7)
    key = next(iter(FORMAT_FIXTURE["formats"]["dora"]["targets"]))
    reads_dora = torch.equal(patched_weight(merged, key), patched_weight(by_host, key))
    if "DoRA computed by the pack" in report:  # the pinned host: its loader skips dora_scale
        assert not reads_dora
    else:  # a host that reads dora_scale: the pack leaves DoRA to it
        assert reads_dora


# --- The real SDXL key map ----------------------------------------------------------------------------------

KEYS = json.loads((FIXTURES / "sdxl_unet_lora_keys.json").read_text())


def test_the_fixture_is_the_real_sdxl_unet():
    assert KEYS["model_class"] == "SDXL" and KEYS["parameters"] == 2_567_463_684
    assert "input_blocks.4.1.proj_in" in KEYS["ldm_modules"]
    assert KEYS["ldm_modules"]["input_blocks.4.1.transformer_blocks.0.attn2.to_k"] == [640, 2048]


def test_the_packs_own_mapping_covers_every_kohya_name_the_host_maps_on_real_sdxl():
    shapes = {f"diffusion_model.{m}.weight": tuple(s) for m, s in KEYS["ldm_modules"].items()}
    table = core.build_key_table(shapes)
    for module in KEYS["ldm_modules"]:
        assert table["flat:" + module.replace(".", "_")] == f"diffusion_model.{module}.weight", module
    for diffusers, ldm in KEYS["diffusers_modules"].items():
        assert core.diffusers_to_ldm_module(diffusers) == ldm, diffusers
        assert table["flat:" + diffusers.replace(".", "_")] == f"diffusion_model.{ldm}.weight", diffusers
    # The kohya export writes only names the host maps, with the host's shapes.
    rank = 2
    attention = [d for d in KEYS["diffusers_modules"] if ".attn" in d and len(KEYS["ldm_modules"][
        KEYS["diffusers_modules"][d]]) == 2]
    peft = {}
    for module in attention:
        out, inner = KEYS["ldm_modules"][KEYS["diffusers_modules"][module]]
        peft[f"base_model.model.{module}.lora_A.weight"] = torch.empty(rank, inner, device="meta")
        peft[f"base_model.model.{module}.lora_B.weight"] = torch.empty(out, rank, device="meta")
    kohya = core.to_kohya_state_dict(peft)
    written = {core.split_lora_key(k)[0] for k in kohya}
    host_names = {"lora_unet_" + m.replace(".", "_") for m in KEYS["ldm_modules"]}
    assert len(written) == len(attention) == 70 * 8 and written <= host_names  # 70 transformer blocks, 8 linears


# --- No silent partial merge ------------------------------------------------------------------------------------

def test_a_tucker_locon_on_every_layer_merges_all_of_it_as_the_hosts_loader_does(host_model):
    model, tensors = host_model
    state = format_state_dict(tensors, "tucker_locon", seed=2)
    merged, report = import_nodes().merge_lora(model, state, 1.0, 1.0, "tucker:")
    assert "203/203 (100.0 %)" in report and "40 Tucker LoCon" in report
    by_host = host_loader(model, state, 1.0)
    convs = [k for k, v in tensors.items() if v.ndim == 4 and v.shape[-1] == 3]
    assert len(convs) == 40
    for module in convs:
        key = "diffusion_model." + module
        assert torch.equal(patched_weight(merged, key), patched_weight(by_host, key)), key


def test_modules_that_cannot_be_applied_are_an_error_naming_them_unless_the_threshold_is_lowered(host_model):
    model, tensors = host_model
    lora = import_nodes()
    state = format_state_dict(tensors, "locon", seed=3)
    sd15 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SD1.5: 768-d context
    state[sd15 + ".lora_down.weight"], state[sd15 + ".lora_up.weight"] = torch.zeros(4, 768), torch.zeros(320, 4)
    oft = kohya_name("input_blocks.4.1.proj_out")
    del state[oft + ".lora_down.weight"], state[oft + ".lora_up.weight"]
    state[oft + ".oft_blocks"] = torch.zeros(4, 16, 16)  # OFT: the pinned host's loader has no OFT
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 768)
    wrong = kohya_name("input_blocks.4.1.transformer_blocks.0.attn2.to_k")  # SDXL's context is 2048-d, not 768
    state[wrong + ".lora_down.weight"] = torch.zeros(4, 768)
    with pytest.raises(lora_error()) as failed:
        lora.merge_lora(model, state, 1.0, 1.0, "partial:")
    message = str(failed.value)
    assert sd15 in message and "min_matched_fraction" in message and "Nothing was merged" in message
    assert wrong in message and "cannot compute" in message
    merged, report = lora.merge_lora(model, state, 1.0, 0.9, "partial:")
    dropped = report.split("DROPPED, not merged (")[1].split("\nMatched:")[0]
    assert sd15 in dropped and wrong in dropped and "Text-encoder modules ignored (only the UNet is merged): 1." in report
    import comfy.lora
    if not hasattr(comfy.lora, "calculate_weight"):  # the pinned host: no OFT
        assert oft in dropped and "OFT/BOFT" in dropped
    assert f"diffusion_model.{'input_blocks.4.1.proj_in'}.weight" in merged.patches


@pytest.mark.parametrize("keys, kind", [
    ({"emb_params": torch.zeros(2, 768)}, "textual-inversion embedding"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, "full checkpoint"),
    ({"foo.bar": torch.zeros(2)}, "unknown tensors (first keys: foo.bar)"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}, "only text-encoder modules"),
])
def test_a_file_of_another_kind_is_refused_naming_the_kind(host_model, keys, kind):
    model, _tensors = host_model
    with pytest.raises(lora_error(), match="Nothing was merged") as failed:
        import_nodes().merge_lora(model, keys, 1.0, 1.0, "other:")
    assert kind in str(failed.value)
