"""LoRA key mapping and ΔW on the tiny SDXL UNet, with LoRA files written in the three layouts."""
import subprocess
import sys

import pytest
import torch

from devtools.paths import REPO_ROOT
from devtools.tiny_lora import LORA_TARGETS, expected_merge, lora_state_dict, random_lora, unet_weights, write_lora
from devtools.tiny_models import TINY_SDXL
from mmig_core import lora as core
from mmig_core.model_files import ModelFilesError

LAYOUTS = ("kohya", "diffusers", "peft")


@pytest.fixture(scope="module")
def weights(tiny_models):
    return unet_weights(tiny_models / TINY_SDXL)


def ldm_shapes(weights):
    return {f"diffusion_model.{module}.weight": tuple(w.shape) for module, w in weights.items()}


def diffusers_shapes(weights):
    return {f"{core.ldm_to_diffusers_module(module)}.weight": tuple(w.shape) for module, w in weights.items()}


def test_every_tiny_sdxl_unet_weight_maps_to_diffusers_and_back(weights):
    assert len(weights) > 250
    for module in weights:
        diffusers = core.ldm_to_diffusers_module(module)
        assert diffusers is not None and core.diffusers_to_ldm_module(diffusers) == module
    assert core.ldm_to_diffusers_module("input_blocks.4.1.transformer_blocks.0.attn1.to_q") == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert core.ldm_to_diffusers_module("output_blocks.2.2.conv") == "up_blocks.0.upsamplers.0.conv"
    assert core.ldm_to_diffusers_module("middle_block.2.in_layers.2") == "mid_block.resnets.1.conv1"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_layout", ["ldm", "diffusers"])
def test_each_layout_matches_every_module_and_gives_w_plus_scaled_ba(weights, layout, model_layout, tmp_path):
    lora = random_lora(weights)
    state, _ = core.load_lora_file(write_lora(lora, layout, tmp_path / f"{layout}.safetensors"))
    shapes = ldm_shapes(weights) if model_layout == "ldm" else diffusers_shapes(weights)
    match = core.match_lora(state, shapes)
    assert (len(match.matched), match.unmatched, match.matched_fraction) == (len(LORA_TARGETS), [], 1.0)
    assert match.layouts == {layout: len(LORA_TARGETS)}
    expected = expected_merge(weights, lora, strength=0.7)
    deltas = match.deltas()
    for module in LORA_TARGETS:
        key = f"diffusion_model.{module}.weight" if model_layout == "ldm" else \
            f"{core.ldm_to_diffusers_module(module)}.weight"
        merged = weights[module].double() + 0.7 * deltas[key].double()
        assert (merged - expected[module]).abs().max().item() <= 1e-6, module
    assert any(len(weights[m].shape) == 4 and weights[m].shape[-1] == 3 for m in LORA_TARGETS)  # 3x3 conv
    assert any(len(weights[m].shape) == 4 and weights[m].shape[-1] == 1 for m in LORA_TARGETS)  # 1x1 conv


def test_the_three_layouts_give_identical_patches(weights):
    lora = random_lora(weights, seed=3)
    patches = [core.match_lora(lora_state_dict(lora, layout), ldm_shapes(weights)).deltas() for layout in LAYOUTS]
    for other in patches[1:]:
        assert other.keys() == patches[0].keys()
        for key in other:
            assert torch.allclose(other[key], patches[0][key], atol=1e-7, rtol=0)


def test_a_missing_alpha_means_scale_one_and_is_reported(weights):
    lora = random_lora(weights, alpha=4.0)  # alpha == rank: the file without alpha must merge the same
    state = {k: v for k, v in lora_state_dict(lora, "kohya").items() if not k.endswith(".alpha")}
    match = core.match_lora(state, ldm_shapes(weights))
    with_alpha = core.match_lora(lora_state_dict(lora, "kohya"), ldm_shapes(weights))
    assert len(match.alpha_missing) == len(LORA_TARGETS) and not with_alpha.alpha_missing
    assert "alpha = rank" in match.report()
    with_alpha_deltas = with_alpha.deltas()
    for key, delta in match.deltas().items():
        assert torch.equal(delta, with_alpha_deltas[key])


def test_an_sd15_lora_matches_nothing_and_the_report_names_the_keys(weights):
    # SD1.5 has attentions in down_blocks.0 and 320-wide blocks where SDXL has none.
    sd15 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)}
    match = core.match_lora(sd15, ldm_shapes(weights))
    assert match.matched_fraction == 0.0 and match.deltas() == {}
    report = match.report()
    assert "0/1 (0.0 %)" in report and "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in report
    assert "Text-encoder modules ignored" in report


def test_shape_and_rank_mismatches_name_the_key_and_both_shapes(weights):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    wrong_width = {f"{name}.lora_down.weight": torch.zeros(4, 768), f"{name}.lora_up.weight": torch.zeros(64, 4)}
    match = core.match_lora(wrong_width, ldm_shapes(weights))
    (module, reason), = match.unmatched
    assert module == name and "(64, 768)" in reason and "(64, 2048)" in reason and "attn2.to_k.weight" in reason
    wrong_rank = {f"{name}.lora_down.weight": torch.zeros(4, 2048), f"{name}.lora_up.weight": torch.zeros(64, 8)}
    (module, reason), = core.match_lora(wrong_rank, ldm_shapes(weights)).unmatched
    assert "rank mismatch" in reason and "(64, 8)" in reason and "(4, 2048)" in reason


def test_a_corrupt_or_pickled_file_is_a_clear_error(tmp_path):
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelFilesError, match="not a valid safetensors"):
        core.load_lora_file(corrupt)
    with pytest.raises(ModelFilesError, match="safetensors only"):
        core.load_lora_file(tmp_path / "lora.ckpt")


@pytest.mark.parametrize("layout", ["diffusers", "peft"])
def test_export_to_kohya_keeps_the_merge(weights, layout, tmp_path):
    lora = random_lora(weights, seed=5)
    source = write_lora(lora, layout, tmp_path / "in.safetensors")
    target = tmp_path / "out.safetensors"
    done = subprocess.run([sys.executable, "-m", "training.export_lora_kohya", str(source), str(target)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    exported, _ = core.load_lora_file(target)
    assert all(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_middle_block_")
               or k.startswith("lora_unet_output_blocks_") for k in exported)
    expected = core.match_lora(lora_state_dict(lora, layout), ldm_shapes(weights)).deltas()
    got = core.match_lora(exported, ldm_shapes(weights))
    got_deltas = got.deltas()
    assert got.matched_fraction == 1.0 and got_deltas.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(got_deltas[key], expected[key], atol=1e-7, rtol=0)


def test_a_bundle_manifest_names_its_vlm_base_and_files_inside_the_folder(tiny_models, tmp_path):
    from devtools.tiny_models import TINY_MUMU_BUNDLE
    from mmig_core import mumu_bundle

    bundle = mumu_bundle.read_bundle(tiny_models / TINY_MUMU_BUNDLE)
    assert bundle.vlm_base == "mmig-tiny-idefics2" and bundle.unet_lora.name == "unet_lora.safetensors"
    (tmp_path / "unet_lora.safetensors").write_bytes(b"")
    (tmp_path / "adapter.safetensors").write_bytes(b"")
    mumu_bundle.write_manifest(tmp_path, "", vlm_lora=None)
    with pytest.raises(ModelFilesError, match="vlm_base"):
        mumu_bundle.read_bundle(tmp_path)
    mumu_bundle.write_manifest(tmp_path, "idefics2-8b", adapter="../elsewhere.safetensors", vlm_lora=None)
    with pytest.raises(ModelFilesError, match="'adapter' must name a .safetensors file inside"):
        mumu_bundle.read_bundle(tmp_path)
    mumu_bundle.write_manifest(tmp_path, "idefics2-8b", vlm_lora=None)
    assert mumu_bundle.read_bundle(tmp_path).vlm_lora is None


def test_export_takes_a_bundle_folder(tiny_models, weights, tmp_path):
    from devtools.tiny_models import TINY_MUMU_BUNDLE

    bundle = tiny_models / TINY_MUMU_BUNDLE
    assert core.export_kohya(bundle, tmp_path / "kohya.safetensors") == len(LORA_TARGETS)
    exported, _ = core.load_lora_file(tmp_path / "kohya.safetensors")
    original, _ = core.load_lora_file(bundle / "unet_lora.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


# --- Around the host's loader: key families, spellings, DoRA -------------------------------------------------

@pytest.mark.parametrize("key, module, suffix", [
    ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "lora_unet_input_blocks_4_1_proj_in", ".lora_down.weight"),
    ("lora_unet_x.lora_mid.weight", "lora_unet_x", ".lora_mid.weight"),
    ("lora_unet_x.hada_t1", "lora_unet_x", ".hada_t1"), ("lora_unet_x.lokr_w2_b", "lora_unet_x", ".lokr_w2_b"),
    ("unet.a.attn1.processor.to_q_lora.up.weight", "unet.a.attn1.processor.to_q", "_lora.up.weight"),
    ("base_model.model.a.b.lora_A.weight", "base_model.model.a.b", ".lora_A.weight"),
    ("lora_unet_x.dora_scale", "lora_unet_x", ".dora_scale"), ("lora_unet_x.diff_b", "lora_unet_x", ".diff_b"),
    ("something.else", "something", ".else"),
])
def test_a_key_splits_into_its_module_and_tensor(key, module, suffix):
    assert core.split_lora_key(key) == (module, suffix)


def test_module_kinds_and_file_kinds_are_named():
    assert core.module_kind([".lora_up.weight", ".lora_down.weight", ".alpha"]) == "LoRA"
    assert core.module_kind([".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"]) == "Tucker LoCon"
    assert core.module_kind([".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"]) \
        == "LoHa (Tucker)"
    assert core.module_kind([".lora_up.weight", ".lora_down.weight", ".dora_scale"]) == "LoRA + DoRA"
    assert core.module_kind([".diff_b"]) == "bias diff" and core.module_kind([".diff", ".diff_b"]) == "full diff"
    assert "textual-inversion" in core.file_kind({"emb_params": None})
    assert "full checkpoint" in core.file_kind({"model.diffusion_model.out.2.weight": None})
    assert "OFT/BOFT" in core.file_kind({"lora_unet_x.oft_blocks": None})
    assert core.file_kind({"a.b": None}).startswith("unknown tensors")


def test_other_layouts_are_respelled_in_the_kohya_names_the_host_maps():
    assert core.kohya_module_name("base_model.model.down_blocks.1.attentions.0.proj_in") == \
        "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert core.kohya_module_name("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out") == \
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    assert core.kohya_module_name("diffusion_model.input_blocks.4.1.proj_in") == "lora_unet_input_blocks_4_1_proj_in"
    assert core.kohya_module_name("lora_unet_input_blocks_4_1_proj_in") is None
    assert core.kohya_tensor_suffix(".lora_A.weight") == ".lora_down.weight"
    assert core.kohya_tensor_suffix(".lora.up.weight") == ".lora_up.weight"
    assert core.kohya_tensor_suffix(".hada_w1_a") == ".hada_w1_a"


@pytest.mark.parametrize("axis", ["output", "input"])
def test_dora_change_rescales_each_channel_to_its_magnitude(axis):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, 3, 3, generator=generator)
    delta = 0.1 * torch.randn(6, 5, 3, 3, generator=generator)
    merged = (weight + delta).double()
    if axis == "output":  # per output channel; the norm is of W, as the newest host takes it
        scale = torch.rand(6, 1, 1, 1, generator=generator) + 0.5
        norm = weight.double().flatten(1).norm(dim=1).reshape(6, 1, 1, 1)
    else:
        scale = torch.rand(1, 5, 1, 1, generator=generator) + 0.5
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, 5, 1, 1)
    expected = merged * scale.double() / norm - weight.double()
    change = core.dora_weight_change(weight, delta, scale)
    assert change.dtype == torch.float32
    assert (change.double() - expected).abs().max().item() <= 1e-5
    if axis == "input":  # W + change has exactly the magnitude dora_scale per input channel
        result = (weight + change).double().transpose(0, 1).flatten(1).norm(dim=1)
        assert torch.allclose(result, scale.double().flatten(), atol=1e-5)


def test_the_encoder_lora_and_mmsm_nodes_import_no_other_node_file():
    """The loaded-model types live in nodes/_loaded.py, so no node file imports another (no import circle)."""
    import ast
    shared = {"_host", "_loaded", "_host_lora"}
    for name in ("encoder", "lora", "mmsm"):
        tree = ast.parse((REPO_ROOT / "nodes" / f"{name}.py").read_text())
        siblings = {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        siblings |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and node.level == 1 and not node.module for alias in node.names}
        top_level = {node.module.split(".")[0] for node in tree.body
                     if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        assert top_level <= shared, (name, top_level)
        assert siblings - shared <= ({"lora"} if name == "encoder" else set()), (name, siblings)
