"""A real kohya SDXL LoRA's key set (data/kohya_sdxl_lora/manifest.json, written from sd-scripts' rules: 722 UNet and
264 text-encoder modules) against the real SDXL UNet and CLIP-L/G as the host builds them on the meta device: the
host's key maps (comfy.lora.model_lora_keys_unet / model_lora_keys_clip), the pack's LoRA merge through the host's
loader (nodes/_host_lora.py, MMIG LoRA Merge) and the pack's own mapping (mmig_core/lora.py, used by training and the
kohya export) must each cover every module, with shapes that fit the real weights. Tensors are random at rank 4
(the manifest's rank is 32: the mapping does not depend on it, the memory does)."""
from __future__ import annotations

import pytest
import torch
from realshape_helpers import META, load_json

from devtools.pack import import_pack_module
from mmig_core import lora as core

MANIFEST = load_json("kohya_sdxl_lora/manifest.json")
TEST_RANK = 4
UNET_MODULES, TEXT_MODULES = 722, 264  # 11 transformers x (proj_in, proj_out) + 70 blocks x 10; CLIP-L 12x6 + G 32x6


def modules_of(prefix: str) -> dict[str, tuple[int, int]]:
    """{kohya module name: (out, in)} of the manifest's modules under `prefix`, from their up/down shapes."""
    found = {}
    for key, shape in MANIFEST["keys"].items():
        name, _, tensor = key.partition(".")
        if name.startswith(prefix) and tensor == "lora_down.weight":
            up = MANIFEST["keys"][f"{name}.lora_up.weight"]
            found[name] = (up[0], shape[1])
    return found


def state_dict(prefixes=("lora_unet", "lora_te1", "lora_te2"), seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in MANIFEST["keys"].items():
        if not key.startswith(prefixes):
            continue
        if key.endswith(".alpha"):
            state[key] = torch.tensor(MANIFEST["alpha"] * TEST_RANK / MANIFEST["rank"])
        else:
            shape = [TEST_RANK if s == MANIFEST["rank"] else s for s in shape]
            state[key] = torch.randn(shape, generator=generator) * 0.01
    return state


@pytest.fixture(scope="module")
def sdxl_clip(host_modules):
    import comfy.sdxl_clip
    with torch.no_grad():  # the host's CLIP copies an identity into its projection while building
        return comfy.sdxl_clip.SDXLClipModel(device=META)


def test_the_manifest_is_a_kohya_sdxl_lora():
    keys = MANIFEST["keys"]
    assert len(keys) == 3 * (UNET_MODULES + TEXT_MODULES) == 2958
    assert len(modules_of("lora_unet")) == UNET_MODULES
    assert len(modules_of("lora_te1")) == 72 and len(modules_of("lora_te2")) == 192
    # The key other tools recognise an SDXL kohya LoRA by (SwarmUI's model-class check), at its real shape.
    assert keys["lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_2.lora_up.weight"] == [640, 32]
    assert keys["lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k.lora_down.weight"] == [32, 2048]


def test_the_hosts_unet_key_map_covers_every_unet_module_at_its_real_shape(real_unet):
    import comfy.lora
    unet = real_unet("SDXL")
    key_map = comfy.lora.model_lora_keys_unet(unet.base, {})
    weights = unet.base.state_dict()
    wanted = modules_of("lora_unet")
    missing = sorted(set(wanted) - set(key_map))
    assert not missing, f"{len(missing)} kohya modules the host does not map, e.g. {missing[:3]}"
    for name, (out, fan_in) in wanted.items():
        assert tuple(weights[key_map[name]].shape) == (out, fan_in), name


def test_the_hosts_clip_key_map_covers_every_text_encoder_module_at_its_real_shape(sdxl_clip):
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_clip(sdxl_clip, {})
    weights = sdxl_clip.state_dict()
    wanted = {**modules_of("lora_te1"), **modules_of("lora_te2")}
    assert len(wanted) == TEXT_MODULES
    missing = sorted(set(wanted) - set(key_map))
    assert not missing, f"{len(missing)} text-encoder modules the host does not map, e.g. {missing[:3]}"
    for name, (out, fan_in) in wanted.items():
        target = key_map[name]
        assert target.startswith("clip_l." if name.startswith("lora_te1") else "clip_g."), (name, target)
        assert tuple(weights[target].shape) == (out, fan_in), name


def test_lora_merge_applies_every_unet_module_of_the_real_key_set(real_unet):
    unet = real_unet("SDXL")
    lora = import_pack_module("nodes.lora")
    state = state_dict()
    merged, report = lora.merge_lora(unet.patcher, state, 1.0, 1.0, "kohya-sdxl:")
    assert f"{UNET_MODULES}/{UNET_MODULES} (100.0 %)" in report and "DROPPED" not in report, report[:2000]
    assert f"Text-encoder modules ignored (only the UNet is merged): {TEXT_MODULES}." in report
    weights = unet.base.state_dict()
    assert len(merged.patches) == UNET_MODULES
    for key in merged.patches:
        assert key.startswith("diffusion_model.") and key in weights, key
    assert unet.patcher.patches == {}  # the given MODEL is untouched


def test_the_packs_own_mapping_covers_every_unet_module_at_its_real_shape(real_unet):
    unet = real_unet("SDXL")
    shapes = {k: tuple(v.shape) for k, v in unet.base.state_dict().items() if k.startswith("diffusion_model.")}
    match = core.match_lora(state_dict(("lora_unet", "lora_te1", "lora_te2")), shapes)
    assert match.unmatched == [], match.report()[:2000]
    assert len(match.matched) == UNET_MODULES and len(match.ignored) == TEXT_MODULES
    import comfy.lora
    host = comfy.lora.model_lora_keys_unet(unet.base, {})
    assert all(host[name] == key for name, key in match.matched)  # the same weight the host's map names
