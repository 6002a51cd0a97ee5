"""The tiny VLM family builders (Gemma3, PaliGemma, Mllama, InternVL -hf, Mistral3), read back with plain
transformers only (no pack code): each folder loads as the real checkpoint does, and the facts the pack's loader
relies on (placeholders, image-token counts, BOS, per-token inputs, native sizes) hold."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import hashlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmig_core.hf_compat import prompt_images  # noqa: E402  (nested from 4.49, flat before)
from devtools.tiny_vlm_families import FAMILY_MODULES, family_module, folder_name, too_old_for  # noqa: E402

FAMILIES = ["gemma3", "paligemma", "mllama", "internvl", "mistral3"]
PROMPT = "describe the image."


def _image(height=48, width=40, seed=0):
    from PIL import Image
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    return Image.fromarray(pixels, "RGB")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(module, folder, model, processor) of one family, built once for the module."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    module = family_module(request.param)
    needed = too_old_for(module)
    if needed:
        with pytest.raises(RuntimeError, match=f">= {needed}"):  # the builder names the version it needs
            module.build(tmp_path_factory.mktemp(request.param) / "too-old")
        pytest.skip(f"{module.MODEL_TYPE} exists in transformers >= {needed}")
    folder = module.build(tmp_path_factory.mktemp(request.param) / folder_name(module.FAMILY), seed=0)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return module, folder, model, processor


def _one_image_text(module, processor) -> str:
    """What a user turn with one image and an instruction becomes: the chat template's rendering, or (PaliGemma,
    which has none) the processor's own prompt format."""
    if module.FACTS["chat_template_source"] is None:
        return module.FACTS["prompt_format"].format(prompt=PROMPT)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def _inputs(module, processor, image=None, **kwargs):
    inputs = processor(text=[_one_image_text(module, processor)], images=prompt_images([image or _image()]),
                       return_tensors="pt",
                       **kwargs)
    inputs.pop("labels", None)  # PaliGemma's processor adds training labels
    return inputs


def _version() -> tuple[int, int]:
    import transformers
    return tuple(int(x) for x in transformers.__version__.split(".")[:2])


def transformers_major() -> int:
    return _version()[0]


def _image_token_id(module, processor):
    return processor.tokenizer.convert_tokens_to_ids(module.FACTS["image_token"])


def test_registered():
    assert set(FAMILIES) <= set(FAMILY_MODULES)
    for name in FAMILIES:
        module = family_module(name)
        assert module.FAMILY == name and module.FACTS["hub_id"].count("/") == 1


def test_folder_is_a_real_layout(family):
    module, folder, model, processor = family
    config = model.config
    assert config.model_type == module.MODEL_TYPE
    assert type(processor).__name__ == module.FACTS["processor_class"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".py")) for n in names)  # safetensors only, no remote code
    assert sum(p.stat().st_size for p in folder.iterdir()) < 4_000_000
    assert getattr(config, "auto_map", None) is None


def test_tokenizer_matches_embeddings(family):
    module, _, model, processor = family
    n = len(processor.tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    head = model.get_output_embeddings().weight.shape[0]
    if module.MODEL_TYPE == "mllama":
        # as the real one: text vocab_size stops before <|image|>, the embedding table is 8 rows longer
        assert model.config.text_config.vocab_size == n - 1 == head and rows == head + 8
    else:
        assert rows == head == n
    config_id = getattr(model.config, "image_token_id", None)
    config_id = getattr(model.config, "image_token_index", None) if config_id is None else config_id
    assert _image_token_id(module, processor) == config_id
    assert _image_token_id(module, processor) != processor.tokenizer.unk_token_id


def test_chat_template_renders_one_image(family):
    module, _, _, processor = family
    facts = module.FACTS
    text = _one_image_text(module, processor)
    if facts["chat_template_source"] is None:
        assert not getattr(processor, "chat_template", None)  # PaliGemma: none, as the real checkpoint
        assert text == facts["placeholder"] + PROMPT
        return
    assert text.count(facts["placeholder"]) == 1 and PROMPT in text
    bos = processor.tokenizer.bos_token
    assert text.startswith(bos) if facts["bos_in_template"] else (bos is None or not text.startswith(bos))


def test_image_tokens_and_per_token_inputs(family):
    module, _, _, processor = family
    facts = module.FACTS
    inputs = _inputs(module, processor)
    ids = inputs["input_ids"][0].tolist()
    count = ids.count(_image_token_id(module, processor))
    if module.MODEL_TYPE == "internvl":  # tiling by default: tiles x tokens per tile
        assert inputs["pixel_values"].shape[0] > 1
        assert count == inputs["pixel_values"].shape[0] * facts["tokens_per_tile"]
        one_tile = _inputs(module, processor, **facts["resolution_kwargs"])
        assert one_tile["pixel_values"].shape[0] == 1
        assert one_tile["input_ids"][0].tolist().count(_image_token_id(module, processor)) == facts["tokens_per_tile"]
    elif module.MODEL_TYPE == "mistral3":  # dynamic: one [IMG] per merged patch, rows closed by break/end
        tok = processor.tokenizer
        rows = ids.count(tok.convert_tokens_to_ids("[IMG_BREAK]")) + 1
        assert ids.count(tok.convert_tokens_to_ids("[IMG_END]")) == 1
        assert max(inputs["image_sizes"][0].tolist()) <= module.LONGEST_EDGE
        assert count % rows == 0 and 0 < count <= facts["max_tokens_per_image"]
        # (how a non-multiple side rounds differs across versions); a square at the longest edge fills the budget
        square = _inputs(module, processor, image=_image(module.LONGEST_EDGE, module.LONGEST_EDGE))
        side = module.LONGEST_EDGE // (module.PATCH * module.MERGE)
        assert square["input_ids"][0].tolist().count(_image_token_id(module, processor)) == side * side
    else:
        assert count == facts["tokens_per_image"]
    for key in facts["per_token_inputs"]:
        if key not in inputs and "per_token_inputs_need_suffix_before" in facts:
            assert transformers_major() < int(facts["per_token_inputs_need_suffix_before"].split(".")[0])
            continue
        assert inputs[key].shape[:2] == inputs["input_ids"].shape
    if module.MODEL_TYPE in ("gemma3", "paligemma"):  # a fixed-size tower: resized to exactly its image_size
        assert inputs["pixel_values"].shape[-2:] == (facts["native_size"],) * 2
        assert facts["native_size"] == family[2].config.vision_config.image_size
    if module.MODEL_TYPE == "mllama":
        assert inputs["cross_attention_mask"].shape[2:] == (1, module.MAX_TILES)
        assert inputs["pixel_values"].shape[-2:] == (module.TILE, module.TILE)


def test_double_bos_where_the_real_one_has_it(family):
    """The template writes BOS text and the tokenizer adds one more (Gemma3, Mllama, Mistral3), as the real
    checkpoints do; PaliGemma's processor writes exactly one; InternVL has none."""
    module, _, _, processor = family
    ids = _inputs(module, processor)["input_ids"][0].tolist()
    bos = processor.tokenizer.bos_token_id
    if module.MODEL_TYPE in ("gemma3", "mllama", "mistral3"):
        assert ids[:2] == [bos, bos]
    elif module.MODEL_TYPE == "paligemma":
        assert ids.count(bos) == 1 and ids.index(bos) == module.TOKENS_PER_IMAGE
    else:
        assert bos is None or bos not in ids


def test_generate_and_hidden_states(family):
    module, _, model, processor = family
    inputs = _inputs(module, processor)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    text_config = model.config.get_text_config()
    assert len(out.hidden_states) == text_config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == (1, length, text_config.hidden_size)
    assert torch.isfinite(out.hidden_states[-1]).all()
    assert out.logits.shape[:2] == (1, length)
    assert generated.shape[0] == 1 and length < generated.shape[1] <= length + 4
    assert torch.equal(generated[0, :length], inputs["input_ids"][0])
    text = processor.tokenizer.decode(generated[0, length:], skip_special_tokens=True)
    assert "\ufffd" not in text  # the random head never emits partial bytes


def test_two_images_interleaved(family):
    module, _, model, processor = family
    if module.FACTS["chat_template_source"] is None:
        text = module.FACTS["placeholder"] * 2 + PROMPT  # PaliGemma: images only as a prefix
    else:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a cat"},
                                                 {"type": "image"}, {"type": "text", "text": PROMPT}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    kwargs = module.FACTS["resolution_kwargs"] if module.MODEL_TYPE == "internvl" else {}
    inputs = processor(text=[text], images=prompt_images([_image(seed=1), _image(32, 32, seed=2)]), return_tensors="pt",
                       **kwargs)
    inputs.pop("labels", None)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert out.hidden_states[-1].shape[1] == inputs["input_ids"].shape[1]
    if module.MODEL_TYPE == "mllama":
        assert inputs["input_ids"][0].tolist().count(_image_token_id(module, processor)) == 2
        assert inputs["cross_attention_mask"].shape[2] == 2


def test_build_is_deterministic_in_seed(tmp_path, family):
    module, folder, _, _ = family

    def digest(path):
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    again = module.build(tmp_path / "again", seed=0)
    other = module.build(tmp_path / "other", seed=1)
    assert digest(again) == digest(folder) != digest(other)
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
