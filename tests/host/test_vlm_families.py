"""Every tiny VLM family (devtools.tiny_vlm_families, plus the tiny Idefics2) through the pack's nodes on a real
ComfyUI server: load, describe (one image + instruction; a two-turn history; an IMAGE batch), encode (an
interleaved two-image prompt batched with a text-only one), image sizing and BOS as measured, and the clear errors
for remote-code families and too many images; odd image sizes are sized for the tower.

With MMIG_FAMILY_TABLE=path, the last test writes the measured family table (markdown) there."""
import json
import os
import shutil

import pytest

from devtools import tiny_vlm_families as families
from devtools.tiny_models import TINY_IDEFICS2

pytestmark = pytest.mark.host
FOLDERS = {"idefics2": TINY_IDEFICS2.split("/")[-1],
           **{families.family_module(m).FAMILY: families.folder_name(families.family_module(m).FAMILY)
              for m in families.FAMILY_MODULES}}
FACTS = {families.family_module(m).FAMILY: families.family_module(m).FACTS for m in families.FAMILY_MODULES}
MEASURED: dict[str, dict] = {}


def image(width, height, color, batch=1):
    return {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": batch,
                                                   "color": color}}


def loader(family, resolution=448):
    return {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": FOLDERS[family], "dtype": "fp32",
                                                       "drop_perceiver": False, "image_resolution": resolution}}


def describe(prompt, history="", **extra):
    return {"class_type": "MMIG_MLLMDescribe", "inputs": {
        "vlm": ["L", 0], "mm_prompt": [prompt, 0], "mode": "describe", "when_tags_missing": "use whole response",
        "max_new_tokens": 6, "history": history, **extra}}


@pytest.fixture(autouse=True)
def built(request, tiny_models):
    """A family the installed transformers lacks has no tiny folder (devtools.tiny_vlm_families.build_all)."""
    family = request.node.callspec.params.get("family") if hasattr(request.node, "callspec") else None
    module = next((families.family_module(m) for m in families.FAMILY_MODULES
                   if families.family_module(m).FAMILY == family), None)
    needed = families.too_old_for(module) if module is not None else None
    if needed:  # the release that added the family's model_type (FAMILY_MIN_TRANSFORMERS), and nothing else
        pytest.skip(f"{family} needs transformers >= {needed}")
    if family in FOLDERS:
        assert (tiny_models / "vlm" / FOLDERS[family] / "config.json").exists(), f"no tiny {family} was built"


def hidden_size(tiny_models, family) -> int:
    config = json.loads((tiny_models / "vlm" / FOLDERS[family] / "config.json").read_text())
    return int(config.get("text_config", config).get("hidden_size"))


@pytest.fixture(scope="module")
def adapters(host, tiny_models):
    """A MUMU adapter for each hidden size the tiny families have (random: only shapes are checked)."""
    from mmig_core.mumu_adapter import MUMUAdapter, MUMUAdapterConfig, init_adapter, save_adapter
    names = {}
    for family in FOLDERS:
        if not (tiny_models / "vlm" / FOLDERS[family] / "config.json").exists():
            continue
        width = hidden_size(tiny_models, family)
        name = f"family-adapter-{width}.safetensors"
        if not (host.scratch_models / "mmig" / name).exists():
            save_adapter(init_adapter(MUMUAdapter(MUMUAdapterConfig(input_dim=width, width=16, num_layers=1,
                                                                    num_heads=2))),
                         host.scratch_models / "mmig" / name)
        names[family] = name
    return names


@pytest.mark.parametrize("family", list(FOLDERS))
def test_family_loads_describes_with_history_and_batches(host, family):
    graph = {
        "1": image(40, 32, 0x778899), "2": {"class_type": "MMIG_MultimodalPrompt", "inputs": {
            "text": "<image1> describe this picture", "image1": ["1", 0]}},
        "L": loader(family),
        "4": describe("2"),
        "5": describe("2", history="User: hi\nAssistant: hello, send me an image"),
        "6": {"class_type": "MMIGTest_VLMInfo", "inputs": {"vlm": ["L", 0], "mm_prompt": ["2", 0]}},
        "7": {"class_type": "MMIGTest_EmbedsInfo", "inputs": {"llm_embeds": ["4", 2]}},
        # an IMAGE batch of three: one prompt, so one description, per image
        "8": image(24, 24, 0x224466, batch=3), "9": {"class_type": "MMIG_MultimodalPrompt", "inputs": {
            "text": "what is in <image1>?", "image1": ["8", 0]}},
        "10": describe("9", do_sample=True, seed=7, temperature=0.8, top_p=0.9, repetition_penalty=1.1),
    }
    result = host.run_graph(graph).check()
    [one], [with_history] = result.outputs["4"]["text"], result.outputs["5"]["text"]
    assert one.strip() and with_history.strip()
    [info] = result.outputs["6"]["vlm_info"]
    [embeds] = result.outputs["7"]["embeds"]
    assert embeds["finite"] and embeds["shape"][0] == 1 and embeds["shape"][2] == info["hidden_size"]
    assert 1 <= embeds["lengths"][0] <= 6  # one state per response token
    assert len(result.outputs["10"]["text"]) == 3
    # the chat turn holds the image's tokens, and a BOS exactly once where the family has one
    assert info["image_tokens"] and info["image_tokens"] >= 1
    if info["bos_id"] is not None and FACTS.get(family, {}).get("bos", "<s>"):
        assert info["bos_total"] >= 1 and not info["doubled_bos"], f"{family}: a second BOS"
        if info["leading_bos"]:  # PaliGemma's BOS follows its image tokens
            assert info["leading_bos"] == 1
    if family in FACTS and FACTS[family].get("placeholder"):
        assert info["placeholder"] == FACTS[family]["placeholder"]
    MEASURED.setdefault(family, {}).update(load="yes", describe="yes", tokens_per_image=info["tokens_per_image"],
                                           mode=info["mode"], placeholder=info["placeholder"],
                                           leading_bos=(f"{info['leading_bos']} (doubled: {info['doubled_bos']})"
                                                        if info["bos_id"] is not None else "none (no BOS)"))


@pytest.mark.parametrize("family", list(FOLDERS))
def test_family_encodes_an_interleaved_prompt_batched_with_a_text_only_one(host, family, adapters):
    graph = {
        "1": image(48, 40, 0x3366CC), "2": image(24, 64, 0xCC6633),
        "3": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "a <image1> man and his <image2> dog",
                                                                "image1": ["1", 0], "image2": ["2", 0]}},
        "13": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "a lighthouse at night",
                                                                 "previous": ["3", 0]}},
        "L": loader(family),
        "5": {"class_type": "MMIG_AdapterLoader", "inputs": {"adapter_name": adapters[family], "dtype": "fp32"}},
        "6": {"class_type": "MMIG_MUMUEncode", "inputs": {"vlm": ["L", 0], "adapter": ["5", 0],
                                                          "mm_prompt": ["13", 0], "width": 1024, "height": 1024}},
        "7": {"class_type": "MMIGTest_ConditioningInfo", "inputs": {"conditioning": ["6", 0]}},
        "8": {"class_type": "MMIGTest_EmbedsInfo", "inputs": {"llm_embeds": ["6", 1]}},
    }
    result = host.run_graph(graph).check()
    [cond] = result.outputs["7"]["conditioning"]
    [embeds] = result.outputs["8"]["embeds"]
    assert cond["shape"][0] == 2 and cond["shape"][2] == 2048 and embeds["finite"]
    with_images, text_only = embeds["lengths"]
    assert with_images > text_only > 0  # the images' tokens are in the first prompt's states
    MEASURED.setdefault(family, {})["encode"] = f"yes ({with_images} / {text_only} tokens)"


@pytest.mark.parametrize("family", list(FOLDERS))
def test_family_image_resolution_is_honoured_or_reported_native(host, family):
    seen = {}
    for resolution in (24, 64):
        graph = {"1": image(40, 40, 0x556677), "2": {"class_type": "MMIG_MultimodalPrompt", "inputs": {
                     "text": "<image1>", "image1": ["1", 0]}},
                 f"L{resolution}": loader(family, resolution),
                 "6": {"class_type": "MMIGTest_VLMInfo", "inputs": {"vlm": [f"L{resolution}", 0],
                                                                   "mm_prompt": ["2", 0]}}}
        [info] = host.run_graph(graph).check().outputs["6"]["vlm_info"]
        seen[resolution] = info
    low, high = seen[24], seen[64]
    honoured = low["resolution"] != high["resolution"]
    if low["mode"] == "native":
        assert not honoured and low["tokens_per_image"] == high["tokens_per_image"]
    else:
        assert honoured and low["resolution"] < high["resolution"]
        assert low["image_tokens"] <= high["image_tokens"]
    MEASURED.setdefault(family, {})["resolution"] = (
        f"{low['mode']}: 24 -> {low['resolution'] or 'processor'} px ({low['image_tokens']} tok), "
        f"64 -> {high['resolution'] or 'processor'} px ({high['image_tokens']} tok)" if honoured
        else f"native only ({low['resolution']} px, {low['image_tokens']} tok)")


def write_config(folder, config):
    import torch
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({"weight": torch.zeros(1)}, str(folder / "model.safetensors"))


@pytest.mark.parametrize("name, config, family", [
    ("florence-2-large", {"model_type": "florence2", "architectures": ["Florence2ForConditionalGeneration"],
                          "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"}}, "Florence-2"),
    ("moondream2", {"model_type": "moondream1", "architectures": ["Moondream"],
                    "auto_map": {"AutoConfig": "configuration_moondream.MoondreamConfig"}}, "moondream2"),
])
def test_remote_code_families_are_refused_by_name_and_the_host_keeps_serving(host, name, config, family):
    write_config(host.scratch_models / "LLM" / name, config)  # models/LLM/ is listed too
    assert name in host.object_info()["MMIG_VLMLoader"]["input"]["required"]["model_name"][0]
    graph = {"1": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": name, "dtype": "fp32",
                                                              "drop_perceiver": False, "image_resolution": 0}},
             "2": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "hello"}},
             "3": {"class_type": "MMIGTest_VLMInfo", "inputs": {"vlm": ["1", 0], "mm_prompt": ["2", 0]}}}
    result = host.run_graph(graph)
    assert not result.ok and family in result.error and "remote code" in result.error
    assert "Traceback" not in result.error
    ok = {**graph, "1": loader("qwen2_vl")}
    ok["3"]["inputs"]["vlm"] = ["1", 0]
    assert host.run_graph(ok).ok


def test_vlm_in_models_llm_loads(host, tiny_models):
    target = host.scratch_models / "LLM" / "llava-in-llm-folder"
    if not target.exists():
        shutil.copytree(tiny_models / "vlm" / FOLDERS["llava"], target)
    graph = {"1": image(32, 32, 0x101010), "2": {"class_type": "MMIG_MultimodalPrompt", "inputs": {
                 "text": "<image1> what is it", "image1": ["1", 0]}},
             "L": {**loader("llava"), "inputs": {**loader("llava")["inputs"], "model_name": "llava-in-llm-folder"}},
             "4": describe("2")}
    assert host.run_graph(graph).check().outputs["4"]["text"][0].strip()


def test_more_images_than_the_model_takes_is_a_clear_error(host, tiny_models):
    short = host.scratch_models / "vlm" / "llava-short-context"
    if not short.exists():
        shutil.copytree(tiny_models / "vlm" / FOLDERS["llava"], short)
        config = json.loads((short / "config.json").read_text())
        config["text_config"]["max_position_embeddings"] = 40  # two 16-token images and the text do not fit
        (short / "config.json").write_text(json.dumps(config))
    graph = {"1": image(32, 32, 0x202020), "2": image(32, 32, 0x303030),
             "3": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "<image1> and <image2> side by side",
                                                                     "image1": ["1", 0], "image2": ["2", 0]}},
             "L": {**loader("llava"), "inputs": {**loader("llava")["inputs"], "model_name": "llava-short-context"}},
             "4": describe("3")}
    result = host.run_graph(graph)
    assert not result.ok and "fewer images" in result.error and "40 positions" in result.error
    assert host.run_graph({**graph, "3": {"class_type": "MMIG_MultimodalPrompt", "inputs": {
        "text": "<image1> alone", "image1": ["1", 0]}}}).ok


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "idefics3"])
def test_tiny_and_extreme_images_are_sized_for_the_tower(host, family):
    """A 4 px image, under one merged patch, and a 2000x8 strip: squared and sized to what the tower takes (at
    image_resolution 0 Qwen2-VL sizes them itself; the fixed LLaVA tower gets its native size)."""
    graph = {"1": image(4, 4, 0x404040), "2": image(2000, 8, 0x505050),
             "3": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "<image1> and <image2>",
                                                                     "image1": ["1", 0], "image2": ["2", 0]}},
             "L0": loader(family, 0), "4": {**describe("3"), "inputs": {**describe("3")["inputs"], "vlm": ["L0", 0]}}}
    assert host.run_graph(graph).check().outputs["4"]["text"][0].strip()


def test_zz_measured_family_table():
    """The measured table, for the issue's note (written only when MMIG_FAMILY_TABLE names a file)."""
    target = os.environ.get("MMIG_FAMILY_TABLE")
    if not target:
        pytest.skip("set MMIG_FAMILY_TABLE=path to write the table")
    import transformers
    lines = [f"Measured by tests/host/test_vlm_families.py (transformers {transformers.__version__}, tiny models, "
             f"CPU). Tokens per image: one 448 px square as the processor turns it into image tokens.", "",
             "| transformers | family | load | describe | encode (tokens: 2-image / text-only prompt) | "
             "resolution honoured | tokens per image | placeholder | leading BOS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family in FOLDERS:
        m = MEASURED.get(family, {})
        if not m and any(families.family_module(n).FAMILY == family and families.too_old_for(families.family_module(n))
                         for n in families.FAMILY_MODULES):
            m = {key: "needs newer" for key in ("load", "describe", "encode", "resolution")}
        lines.append(f"| {transformers.__version__} | {family} | {m.get('load', 'FAIL')} | {m.get('describe', 'FAIL')} | {m.get('encode', 'FAIL')} "
                     f"| {m.get('resolution', 'FAIL')} | {m.get('tokens_per_image', '?')} | "
                     f"`{json.dumps(m.get('placeholder', '?'))[1:-1]}` | {m.get('leading_bos', '?')} |")
    with open(target, "w") as f:
        f.write("\n".join(lines) + "\n")
