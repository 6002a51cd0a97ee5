"""training.convert_llmga on a tiny LLMGA MLLM in the original LLaVA layout (devtools/tiny_llmga_original.py).

The converted folder loads through transformers' Auto classes with no remote code, and its forward equals a forward
written here from the original layout's definition (LLaVA's CLIPVisionTower / mlp2x_gelu projector / splice at the
image position, read in dvlab-research/LLMGA llmga/llava/model/) on the original weights. The chat template renders
exactly the text LLMGA's own conversation code renders (tests/conformance/llmga_llava/rendered.json).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from devtools import tiny_llmga_original as tiny
from mmig_core import llava_layout
from mmig_core.llava_layout import LayoutError
from training import convert_llmga

FIXTURES = Path(__file__).parents[1] / "conformance"
RENDERED = json.loads((FIXTURES / "llmga_llava" / "rendered.json").read_text())
PROMPT_FACTS = json.loads((FIXTURES / "llmga_prompts" / "facts.json").read_text())
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("llmga-original")
    tiny.build(root)
    src, clip = root / tiny.ORIGINAL_NAME, root / tiny.CLIP_NAME
    out = convert_llmga.convert(src, root / "converted", clip, **QUIET)
    return {"root": root, "src": src, "clip": clip, "out": out}


@pytest.fixture(scope="module")
def converted(built):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model, info = AutoModelForImageTextToText.from_pretrained(str(built["out"]), local_files_only=True,
                                                              output_loading_info=True)
    processor = AutoProcessor.from_pretrained(str(built["out"]), local_files_only=True)
    return model.eval(), processor, info


def _expand2square(image, background):
    """LLaVA's `image_aspect_ratio: pad`: paste centred on a square of the mean colour (llmga/llava/mm_utils.py)."""
    from PIL import Image
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _image(width, height, seed=0):
    from PIL import Image
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _reference_pixels(clip_folder, image):
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor.from_pretrained(str(clip_folder), local_files_only=True)
    background = tuple(int(x * 255) for x in processor.image_mean)
    return processor(_expand2square(image, background), return_tensors="pt")["pixel_values"]


def _reference_ids(tokenizer, prompt):
    """LLaVA's tokenizer_image_token: each chunk between <image> tokenized alone, BOS kept once, -200 between."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [-200] + (chunk[1:] if chunk and chunk[0] == tokenizer.bos_token_id else chunk)
    return ids


def _reference_logits(src, clip_folder, pixel_values, ids):
    """The original layout's forward, from its definition, on the original weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

    config = json.loads((src / "config.json").read_text())
    weights = load_file(str(src / "model.safetensors"))
    fields = {k: v for k, v in config.items()
              if (k not in llava_layout.LLAVA_ONLY_FIELDS or k == "vocab_size") and v is not None}
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **fields)).eval()
    lm.load_state_dict({k: v for k, v in weights.items() if "mm_projector" not in k}, strict=True)
    tower = CLIPVisionModel.from_pretrained(str(clip_folder), local_files_only=True).eval()
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[config["mm_vision_select_layer"]]
        features = hidden[:, 1:]  # mm_vision_select_feature "patch": drop CLS
        x = torch.nn.functional.linear(features, weights["model.mm_projector.0.weight"],
                                       weights["model.mm_projector.0.bias"])
        x = torch.nn.functional.linear(torch.nn.functional.gelu(x), weights["model.mm_projector.2.weight"],
                                       weights["model.mm_projector.2.bias"])[0]
        at = ids.index(-200)
        embed = lm.get_input_embeddings()
        before, after = torch.tensor(ids[:at]), torch.tensor(ids[at + 1:])
        embeds = torch.cat([embed(before), x, embed(after)])[None]
        return lm(inputs_embeds=embeds).logits[0]


def test_converted_folder_loads_with_auto_classes(built, converted):
    model, processor, info = converted
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = json.loads((built["src"] / "config.json").read_text())
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == original["vocab_size"] == model.config.image_token_index
    assert processor.image_token == "<image>" and len(processor.tokenizer) == original["vocab_size"] + 1
    from safetensors.torch import load_file
    weights = load_file(str(built["src"] / "model.safetensors"))
    for name, module in (("model.embed_tokens.weight", model.get_input_embeddings()),
                         ("lm_head.weight", model.get_output_embeddings())):
        grown = module.weight.detach()
        assert grown.shape[0] == original["vocab_size"] + 1
        assert torch.equal(grown[:-1], weights[name])
        torch.testing.assert_close(grown[-1], weights[name].mean(dim=0))  # mean-initialised (module docstring)
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    converted_from = json.loads((built["out"] / "CONVERTED_FROM.json").read_text())
    assert converted_from["conversation"] == "llava_llama_2" and converted_from["rows_added"] == 1
    assert not list(built["out"].glob("*.bin")) and not built["out"].with_name("converted.partial").exists()


def test_forward_equals_the_original_layouts_definition(built, converted):
    model, processor, _ = converted
    case = RENDERED["rendered"]["llava_llama_2"][0]
    prompt = processor.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
    assert prompt == case["reference_prompt"]
    image = _image(56, 42)  # pads to 56x56, the tower's size: no resampling, so the pixels match exactly
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    reference_pixels = _reference_pixels(built["clip"], image)
    pixel_diff = (inputs["pixel_values"] - reference_pixels).abs().max().item()
    from transformers import AutoTokenizer
    ids = _reference_ids(AutoTokenizer.from_pretrained(str(built["src"]), local_files_only=True), prompt)
    image_at = ids.index(-200)
    patches = (56 // 14) ** 2
    expanded = ids[:image_at] + [model.config.image_token_index] * patches + ids[image_at + 1:]
    assert inputs["input_ids"][0].tolist() == expanded  # the same tokens, the image spread over its patches
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    reference = _reference_logits(built["src"], built["clip"], reference_pixels, ids)
    # The converted head has one more row (<image>); the original vocabulary's logits must agree.
    assert logits.shape[1] == reference.shape[1] + 1
    diff = (logits[:, :-1] - reference).abs().max().item()
    print(f"\nconverted vs original-layout forward: max |logit diff| {diff:.3e} over {tuple(logits.shape)}; "
          f"max |pixel diff| {pixel_diff:.3e}")
    assert logits.shape[0] == reference.shape[0] and reference.abs().max() > 0.1
    assert pixel_diff < 1e-5
    assert diff < 1e-4


def test_resized_images_stay_close_to_llmga_preprocessing(built, converted):
    _, processor, _ = converted
    image = _image(100, 70, seed=1)  # padded to 100x100, then resized to 56: torch vs PIL bicubic may differ
    ours = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    reference = _reference_pixels(built["clip"], image)
    diff = (ours - reference).abs()
    print(f"\nresized image: pixel diff max {diff.max().item():.3e}, mean {diff.mean().item():.3e} (normalised units)")
    assert ours.shape == reference.shape == (1, 3, 56, 56)
    assert diff.mean() < 0.05


@pytest.mark.parametrize("mode", sorted(RENDERED["rendered"]))
def test_chat_template_renders_what_llmga_renders(converted, mode):
    _, processor, _ = converted
    for case in RENDERED["rendered"][mode]:
        text = processor.tokenizer.apply_chat_template(case["messages"], chat_template=llava_layout.chat_template(mode),
                                                       add_generation_prompt=case["add_generation_prompt"],
                                                       tokenize=False)
        assert text == case["reference_prompt"], (mode, case["name"])


def test_a_newline_after_the_image_is_not_doubled(converted):
    # The pack writes a task sentence after the images as "\n" + text (mmig_core.vlm._after_images); the template
    # adds the newline only where the text does not bring one, so both spellings give LLMGA's text.
    _, processor, _ = converted
    case = RENDERED["rendered"]["llava_llama_2"][0]
    text = {"type": "text", "text": "\nGenerate a similar image."}
    messages = [{"role": "user", "content": [{"type": "image"}, text]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        case["reference_prompt"]


def test_conversation_facts_are_the_reference_ones():
    for mode, conv in llava_layout.CONVERSATIONS.items():
        reference = PROMPT_FACTS["conversations"][mode]
        assert {k: reference[k] for k in conv} == conv, mode
    assert RENDERED["image_token"] == llava_layout.IMAGE_TOKEN == PROMPT_FACTS["image_token"]
    assert set(llava_layout.CONVERTIBLE) | set(llava_layout.OTHER_ORIGINAL_TYPES) >= set(
        PROMPT_FACTS["llava_model_types"].values())


def test_the_loader_message_names_the_folder_family_and_command(built, tmp_path):
    src = built["src"]
    message = llava_layout.original_layout_message(src)
    assert llava_layout.is_original_layout(src)
    assert str(src) in message and "LLaMA" in message and "original LLaVA repository layout" in message
    assert f'python -m training.convert_llmga "{src}" "{src}-llava-hf" --vision-tower' in message
    assert "openai/clip-vit-large-patch14-336" in message
    assert llava_layout.original_layout_message(built["out"]) is None  # the converted folder loads as it is
    assert not llava_layout.is_original_layout(built["out"])
    for config in ({"model_type": "llava_next"}, {"model_type": "llava_onevision"}, {"model_type": "idefics2"}):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert llava_layout.original_layout_message(tmp_path) is None, config
    (tmp_path / "config.json").write_text("{not json")
    assert llava_layout.original_layout_message(tmp_path) is None  # the loader's own config error takes over
    assert llava_layout.original_layout_message(tmp_path / "missing") is None
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_qwen2", "mm_vision_tower": "x"}))
    message = llava_layout.original_layout_message(tmp_path)
    assert "Qwen2" in message and str(tmp_path) in message and "llava_llama" in message


def test_the_mistral_release_converts_with_its_conversation(built, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    src = tiny.build_original(tmp_path / tiny.MISTRAL_NAME, model_type="llava_mistral")
    assert "Mistral" in llava_layout.original_layout_message(src)
    out = convert_llmga.convert(src, tmp_path / "mistral-hf", built["clip"], **QUIET)
    model = AutoModelForImageTextToText.from_pretrained(str(out), local_files_only=True)
    processor = AutoProcessor.from_pretrained(str(out), local_files_only=True)
    assert model.config.text_config.model_type == "mistral"
    case = RENDERED["rendered"]["mistral_instruct"][1]
    assert processor.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False) == \
        case["reference_prompt"]
    inputs = processor(text=case["reference_prompt"], images=_image(56, 56), return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def _converted_weights(folder):
    from safetensors.torch import load_file
    weights = {}
    for shard in sorted(Path(folder).glob("model-*.safetensors")):
        weights.update(load_file(str(shard)))
    return weights


def test_a_full_clip_model_folder_gives_the_same_tower(built, tmp_path):
    # The hub's openai/clip-vit-large-patch14-336 is a CLIPModel (text side too): only its vision side is taken.
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel
    vision = CLIPVisionModel.from_pretrained(str(built["clip"]), local_files_only=True)
    text = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.config.to_dict(), projection_dim=16))
    tower = getattr(vision, "vision_model", vision)  # 5.x flattens CLIPVisionModel
    full.vision_model.load_state_dict(tower.state_dict())
    folder = tmp_path / "clip-full"
    full.save_pretrained(folder)
    CLIPImageProcessor.from_pretrained(str(built["clip"])).save_pretrained(folder)
    out = convert_llmga.convert(built["src"], tmp_path / "with-full-clip", folder, **QUIET)
    ours, reference = _converted_weights(out), _converted_weights(built["out"])
    assert sorted(ours) == sorted(reference) and all(torch.equal(ours[k], reference[k]) for k in reference)
    assert not any("text_model" in k or "projection" in k.split(".")[-2] for k in ours)


def test_a_tower_trained_into_the_checkpoint_wins_over_the_clip_folder(built, tmp_path):
    from safetensors.torch import load_file, save_file
    src = tmp_path / "llmga-llama-2-7b-chat-own-tower"
    shutil.copytree(built["src"], src)
    weights = load_file(str(src / "model.safetensors"))
    tower = {k: v for k, v in load_file(str(built["clip"] / "model.safetensors")).items()}
    own = {"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v * 0.5
           for k, v in tower.items()}
    save_file({**weights, **own}, str(src / "model.safetensors"))
    out = _converted_weights(convert_llmga.convert(src, tmp_path / "own-tower", built["clip"], **QUIET))
    name = "vision_tower.vision_model.embeddings.patch_embedding.weight"
    source = next(v for k, v in own.items() if k.endswith("embeddings.patch_embedding.weight"))
    assert torch.equal(out[name], source)


def test_bin_weights_load_only_through_weights_only(built, tmp_path):
    from safetensors.torch import load_file
    src = tmp_path / "llmga-llama-2-7b-chat-bin"
    shutil.copytree(built["src"], src)
    (src / "model.safetensors").unlink()
    torch.save({k: v.to(torch.bfloat16) for k, v in load_file(str(built["src"] / "model.safetensors")).items()},
               src / "pytorch_model.bin")  # LLMGA's releases are bf16 .bin shards
    out = convert_llmga.convert(src, tmp_path / "from-bin", built["clip"], **QUIET)
    language = load_file(str(out / "model-00001-of-00002.safetensors"))
    tower = load_file(str(out / "model-00002-of-00002.safetensors"))
    assert language["multi_modal_projector.linear_1.bias"].dtype == torch.bfloat16
    assert {t.dtype for t in tower.values()} == {torch.bfloat16}  # the fp32 CLIP tower in the model's dtype

    torch.save({"model.norm.weight": torch.ones(2), "payload": Path("x")}, src / "pytorch_model.bin")
    with pytest.raises(LayoutError, match=r"weights_only=True\) refuses"):
        convert_llmga.convert(src, tmp_path / "refused", built["clip"], **QUIET)
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.partial").exists()


def test_clear_errors_for_bad_input(built, tmp_path, capsys):
    src, clip = built["src"], built["clip"]
    with pytest.raises(LayoutError, match="not in the original LLaVA layout"):
        convert_llmga.convert(built["out"], tmp_path / "a", clip, **QUIET)
    with pytest.raises(LayoutError, match="no readable config.json"):
        convert_llmga.convert(tmp_path, tmp_path / "b", clip, **QUIET)
    with pytest.raises(LayoutError, match=r"--vision-tower .* is not a folder.*openai/clip-vit-large-patch14-336"):
        convert_llmga.convert(src, tmp_path / "c", tmp_path / "no-clip", **QUIET)
    wide = tiny.build_clip(tmp_path / "clip-48", vision=dict(tiny.CLIP_VISION, hidden_size=48))
    with pytest.raises(LayoutError, match="CLIP of width 48.*mm_hidden_size=32"):
        convert_llmga.convert(src, tmp_path / "d", wide, **QUIET)
    (tmp_path / "exists").mkdir()
    with pytest.raises(LayoutError, match="already exists"):
        convert_llmga.convert(src, tmp_path / "exists", clip, **QUIET)
    linear = tmp_path / "llmga-linear"
    shutil.copytree(src, linear)
    config = json.loads((linear / "config.json").read_text())
    (linear / "config.json").write_text(json.dumps(dict(config, mm_projector_type="linear")))
    with pytest.raises(LayoutError, match="mm_projector_type='linear'"):
        convert_llmga.convert(linear, tmp_path / "e", clip, **QUIET)
    no_tokenizer = tmp_path / "llmga-no-tokenizer"
    shutil.copytree(src, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(LayoutError, match="(?s)could not read the tokenizer in .*tokenizer files it was released with"):
        convert_llmga.convert(no_tokenizer, tmp_path / "g", clip, **QUIET)
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    assert convert_llmga.main([str(src), str(tmp_path / "f"), "--vision-tower", str(tmp_path / "no-clip")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_vlm_loader_refuses_the_original_layout_with_the_command_and_loads_the_converted_folder(built):
    from mmig_core.model_files import ModelFilesError
    from mmig_core.vlm import load_vlm
    with pytest.raises(ModelFilesError, match="python -m training.convert_llmga") as refused:
        load_vlm(built["src"])
    assert str(built["src"]) in str(refused.value)
    vlm = load_vlm(built["out"], image_resolution=0)
    assert vlm.model_type == "llava" and vlm.tokens_per_image > 0
