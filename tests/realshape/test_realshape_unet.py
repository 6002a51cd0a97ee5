"""The real SD1.5 and SDXL UNets, as the host builds them from its own configs, on the meta device: A-STAR's and
Attend-and-Excite's layer pick, the attention patches landing on every picked layer through the host's own lookup,
and MMSM's patch point and widths (MMSM Apply, then A-STAR on its output, as mmig_full wires them)."""
from __future__ import annotations

import pytest
import torch

from devtools.pack import import_pack_module
from mmig_core import astar
from mmig_core.lora import ldm_to_diffusers_module

from realshape_helpers import META, load_json

AE_FACTS = load_json("attend_and_excite_layers.json")
IDEFICS2 = load_json("idefics2-8b/config.json")
PUBLISHED_PARAMETERS = {"SD15": 859_520_964, "SDXL": 2_567_463_684}  # the UNets of the published checkpoints
BLOCK_PATHS = {"input": "input_blocks.{}.1", "middle": "middle_block.1", "output": "output_blocks.{}.1"}


def diffusers_name(block: tuple[str, int]) -> str:
    return ldm_to_diffusers_module(BLOCK_PATHS[block[0]].format(block[1]))


def cross_attention_layers(diffusion_model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in diffusion_model.named_modules() if getattr(m, "attn2", None) is not None}


def depth_of(diffusion_model, block) -> int:
    """Transformer blocks (each with one attn2) inside one UNet block."""
    name, index = block
    module = diffusion_model.middle_block if name == "middle" else getattr(diffusion_model, f"{name}_blocks")[index]
    return sum(getattr(m, "attn2", None) is not None for m in module.modules())


class Recorder:
    """Wraps an attn2 replacement: which (block, transformer index) it was called at, with how many queries and
    context tokens."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, q, k, v, extra_options):
        self.calls.append((tuple(extra_options["block"]), extra_options["block_index"], q.shape[1], k.shape[1]))
        return self.inner(q, k, v, extra_options)


def recorded_options(patched):
    """The patched MODEL's transformer_options, its attn2 replacements wrapped by one Recorder each."""
    options = dict(patched.model_options["transformer_options"])
    replace = {kind: dict(p) for kind, p in options.get("patches_replace", {}).items()}
    recorders = {key: Recorder(fn) for key, fn in replace.get("attn2", {}).items()}
    replace["attn2"] = dict(recorders)
    options["patches_replace"] = replace
    return options, recorders


# --- the UNets themselves -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["SD15", "SDXL"])
def test_the_host_builds_the_published_unet_on_the_meta_device(real_unet, name):
    unet = real_unet(name)
    dm = unet.diffusion_model
    assert type(unet.model_config).__name__ == name
    assert sum(p.numel() for p in dm.parameters()) == PUBLISHED_PARAMETERS[name]
    assert {p.device for p in dm.parameters()} == {META}
    layers = cross_attention_layers(dm)
    assert len(layers) == AE_FACTS[name]["cross_attention_layers_total"]
    assert {m.attn2.to_k.in_features for m in layers.values()} == {unet.context_dim}


# --- A-STAR's and Attend-and-Excite's layer pick --------------------------------------------------------------

@pytest.mark.parametrize("name", ["SD15", "SDXL"])
def test_capture_blocks_are_the_layers_attend_and_excite_reads(real_unet, name):
    facts = AE_FACTS[name]
    dm = real_unet(name).diffusion_model
    blocks = astar.capture_blocks(dm)
    assert sorted(diffusers_name(b) for b in blocks) == sorted(facts["attention_modules"])
    assert sum(depth_of(dm, b) for b in blocks) == len(facts["attn2_layers"])
    # The level A-STAR picks is a quarter of the latent's side: 16x16 at 512 px (SD1.5), 32x32 at 1024 px (SDXL).
    levels = {lvl for n, i, lvl in astar.cross_attention_blocks(dm) if (n, i) in blocks}
    assert levels == {2} and facts["attn_res"] == [facts["image_px"] // 8 // 4] * 2


def _run_capture(unet, patched, guidance):
    """One guided forward (the capture pass of a guided step) on the meta device, through the host's lookup."""
    options, recorders = recorded_options(patched)
    x, context, y = unet.inputs(batch=2)
    c = {"c_crossattn": context, "transformer_options": {**options, "cond_or_uncond": [0, 1]}}
    if y is not None:
        c["y"] = y
    others = []
    with torch.no_grad():
        out, maps = guidance._forward_capturing(unet.apply_model(others), x, torch.ones(2), c, torch.tensor([0]))
    return out, maps, recorders, others


def _guided(unet, model, mode):
    guidance_nodes = import_pack_module("nodes._guidance")
    settings = guidance_nodes.AStarSettings([[2], [5]], list(range(1, 8)), mode=mode)
    return guidance_nodes.guided_model(model, settings)


@pytest.fixture(scope="module")
def sd15_pass(real_unet):
    unet = real_unet("SD15")
    before = repr(unet.patcher.model_options)
    patched, guidance = _guided(unet, unet.patcher, "attend_and_excite")
    out, maps, recorders, others = _run_capture(unet, patched, guidance)
    return dict(unet=unet, patched=patched, guidance=guidance, out=out, maps=maps, recorders=recorders,
                others=others, options_before=before)


@pytest.fixture(scope="module")
def sdxl_pass(real_unet):
    """MMSM Apply (e_llm at Idefics2-8b's width) and then A-STAR guidance on its output, as mmig_full wires them;
    one capture pass at 1024 px with a recorder on every output block."""
    unet = real_unet("SDXL")
    mmsm_nodes = import_pack_module("nodes.mmsm")
    core = import_pack_module("mmig_core.mmsm")
    vlm = import_pack_module("mmig_core.vlm")
    channels = mmsm_nodes.mid_block_channels(unet.patcher)
    text_dim = IDEFICS2["text_config"]["hidden_size"]
    with torch.device(META):
        mmsm = core.MMSM(core.MMSMConfig(text_dim=text_dim, feature_channels=channels))
    embeds = vlm.LLMEmbeds(torch.empty(1, 300, text_dim, device=META), torch.ones(1, 300, dtype=torch.bool))
    before = repr(unet.patcher.model_options)
    (with_mmsm,) = mmsm_nodes.MMIG_MMSMApply().apply(unet.patcher, mmsm_nodes.LoadedMMSM(mmsm, "real-shape", None),
                                                    embeds, 1.0)
    [mmsm_patch] = with_mmsm.model_options["transformer_options"]["patches"]["output_block_patch"]
    fired, outputs = [], []
    mmsm_patch.on_fire = fired.append

    def record_output_block(h, hsp, transformer_options):
        outputs.append((tuple(transformer_options["block"]), tuple(h.shape), tuple(hsp.shape)))
        return h, hsp
    with_mmsm.set_model_output_block_patch(record_output_block)
    patched, guidance = _guided(unet, with_mmsm, "a_star")
    out, maps, recorders, others = _run_capture(unet, patched, guidance)
    return dict(unet=unet, patched=patched, guidance=guidance, out=out, maps=maps, recorders=recorders,
                others=others, fired=fired,
                outputs=outputs, mmsm=mmsm, channels=channels, options_before=before)


@pytest.mark.parametrize("which", ["sd15_pass", "sdxl_pass"])
def test_the_attention_patches_land_on_every_picked_layer(request, which):
    run = request.getfixturevalue(which)
    unet, guidance, recorders = run["unet"], run["guidance"], run["recorders"]
    facts = AE_FACTS[unet.name]
    dm = unet.diffusion_model
    blocks = astar.capture_blocks(dm)
    # Registered at exactly the picked blocks, under the host's (name, index) keys...
    assert set(recorders) == set(blocks)
    # ...and the host's lookup called each at every transformer index of the block, with the layer's real width.
    for block, recorder in recorders.items():
        depth = depth_of(dm, block)
        assert [i for _, i, _, _ in recorder.calls] == list(range(depth)), block
        assert {(b, q, kd) for b, _, q, kd in recorder.calls} == {(block, facts["queries"], 77)}
    called = sorted(f"{diffusers_name(b)}.transformer_blocks.{i}.attn2"
                    for r in recorders.values() for b, i, _, _ in r.calls)
    assert called == sorted(facts["attn2_layers"])
    assert guidance.capture_calls == {b: depth_of(dm, b) for b in blocks}
    # The maps are read at Attend-and-Excite's resolution, one per concept (A-STAR) or token (A&E).
    assert tuple(run["maps"].shape) == (1, 2, *facts["attn_res"])
    assert tuple(run["out"].shape) == (2, 4, facts["image_px"] // 8, facts["image_px"] // 8)
    assert repr(unet.patcher.model_options) == run["options_before"]  # the given MODEL is untouched


@pytest.mark.parametrize("which", ["sd15_pass", "sdxl_pass"])
def test_every_layer_left_out_has_another_size(request, which):
    """The pick is the whole set at that size: a layer of that size left out would be one A&E reads and the pack
    does not. Checked on the query counts of every cross-attention layer in the host's forward."""
    run = request.getfixturevalue(which)
    facts = AE_FACTS[run["unet"].name]
    picked = [(b, q) for r in run["recorders"].values() for b, _, q, _ in r.calls]
    others = [(b, q) for b, _, q in run["others"]]
    assert len(picked) + len(others) == facts["cross_attention_layers_total"]
    assert len(picked) == len(facts["attn2_layers"])
    assert all(q != facts["queries"] for _, q in others), sorted(set(others))
    sizes = sorted({q for _, q in picked + others})
    assert sizes == ([64, 256, 1024, 4096] if run["unet"].name == "SD15" else [1024, 4096])  # SDXL: none at 128x128


# --- MMSM -----------------------------------------------------------------------------------------------------

def test_mmsm_fires_once_at_the_mid_block_output_with_the_real_widths(sdxl_pass):
    run = sdxl_pass
    assert run["channels"] == 1280  # SDXL's mid block: 320 x channel_mult[-1] 4
    assert run["fired"] == [("output", 0)]
    assert run["mmsm"].mlp[0].in_features == IDEFICS2["text_config"]["hidden_size"] == 4096
    outputs = dict((block, (h, hsp)) for block, h, hsp in run["outputs"])
    assert len(run["outputs"]) == 9 == len(run["unet"].diffusion_model.output_blocks)
    assert outputs[("output", 0)] == ((2, 1280, 32, 32), (2, 1280, 32, 32))  # 1024 px: the mid block is 32x32
    assert outputs[("output", 8)][0] == (2, 320, 128, 128)


def test_mmsm_apply_refuses_an_mmsm_of_another_width_on_the_real_sdxl(real_unet):
    mmsm_nodes = import_pack_module("nodes.mmsm")
    core = import_pack_module("mmig_core.mmsm")
    vlm = import_pack_module("mmig_core.vlm")
    with torch.device(META):
        mmsm = core.MMSM(core.MMSMConfig(text_dim=4096, feature_channels=640))
    embeds = vlm.LLMEmbeds(torch.empty(1, 4, 4096, device=META), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="640 mid-block channels, but this model has 1280"):
        mmsm_nodes.MMIG_MMSMApply().apply(real_unet("SDXL").patcher, mmsm_nodes.LoadedMMSM(mmsm, "x", None),
                                          embeds, 1.0)


def test_mumu_adapter_widths_are_the_real_sdxl_context_and_pooled_input(real_unet):
    from mmig_core import mumu_adapter
    unet = real_unet("SDXL")
    # MUMU's widths on Idefics2-8b's 4096-wide states; one layer of the 16 (the widths are what is checked)
    config = mumu_adapter.MUMUAdapterConfig(input_dim=IDEFICS2["text_config"]["hidden_size"], num_layers=1)
    adapter = mumu_adapter.init_adapter(mumu_adapter.MUMUAdapter(config))
    with torch.no_grad():
        context, pooled = adapter(torch.randn(1, 100, config.input_dim), torch.ones(1, 100, dtype=torch.bool))
    layers = cross_attention_layers(unet.diffusion_model)
    assert {m.attn2.to_k.in_features for m in layers.values()} == {context.shape[-1]} == {2048}
    assert context.shape[1] == 154  # padded to whole 77-token windows
    assert (mumu_adapter.SDXL_CONTEXT_DIM, mumu_adapter.SDXL_POOLED_DIM) == (2048, tuple(pooled.shape)[-1])
    # The host's SDXL y: the pooled vector and six 256-d size embeddings, into label_emb's 2816 inputs.
    adm = unet.base.encode_adm(pooled_output=torch.zeros(1, pooled.shape[-1]), width=1024, height=1024,
                               crop_w=0, crop_h=0, target_width=1024, target_height=1024)
    assert tuple(adm.shape) == (1, unet.diffusion_model.label_emb[0][0].in_features) == (1, 2816)
