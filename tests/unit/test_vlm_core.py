"""mmig_core.vlm on the tiny Idefics2 (saved with save_pretrained, offline tokenizer): perceiver removal,
interleaved hidden states, description, and the errors a user can act on."""
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools import tiny_idefics2  # noqa: E402
from devtools.tiny_models import TINY_IDEFICS2  # noqa: E402
from mmig_core.mm_prompt import build_prompt  # noqa: E402
from mmig_core.model_files import ModelFilesError  # noqa: E402
from mmig_core.vlm import describe, encode_prompts, load_vlm, parse_history, prompt_inputs, square_image  # noqa: E402


@pytest.fixture(scope="module")
def folder(tiny_models):
    return tiny_models / TINY_IDEFICS2


@pytest.fixture(scope="module")
def vlms(folder):
    return {drop: load_vlm(folder, drop_perceiver=drop, image_resolution=448) for drop in (False, True)}


def two_images():
    g = torch.Generator().manual_seed(0)
    return {1: torch.rand(1, 40, 30, 3, generator=g), 2: torch.rand(1, 20, 60, 3, generator=g)}


def test_tokenizer_is_complete(vlms):
    tok = vlms[False].processor.tokenizer
    assert len(tok) == tiny_idefics2.build_tokenizer().__len__() == vlms[False].model.config.text_config.vocab_size
    assert tok.convert_tokens_to_ids("<image>") == vlms[False].model.config.image_token_id


def test_tokens_per_image_with_and_without_perceiver(vlms):
    side = tiny_idefics2.IMAGE_SIZE // tiny_idefics2.PATCH_SIZE  # 448 px is capped at the tower's 32 px
    assert vlms[False].tokens_per_image == tiny_idefics2.PERCEIVER_LATENTS
    assert vlms[True].tokens_per_image == side * side
    prompt = build_prompt("a <image1> man and his <image2> dog", two_images())
    text = encode_prompts(vlms[True], [build_prompt("a  man and his  dog", {})]).hidden_states.shape[1]
    for drop, vlm in vlms.items():
        length = encode_prompts(vlm, [prompt]).hidden_states.shape[1]
        # each image adds its tokens plus two <fake_token_around_image> markers
        assert length - text >= 2 * vlm.tokens_per_image
    with_p = encode_prompts(vlms[False], [prompt]).hidden_states.shape[1]
    without_p = encode_prompts(vlms[True], [prompt]).hidden_states.shape[1]
    assert without_p - with_p == 2 * (vlms[True].tokens_per_image - vlms[False].tokens_per_image)


def test_encoding_is_deterministic_and_batches_keep_order(vlms):
    vlm = vlms[True]
    a = build_prompt("a <image1> man and his <image2> dog", two_images())
    b = build_prompt("a lighthouse", {})
    batch = encode_prompts(vlm, [a, b])
    alone_a, alone_b = encode_prompts(vlm, [a]), encode_prompts(vlm, [b])
    assert batch.hidden_states.shape[0] == 2 and batch.hidden_size == vlm.hidden_size
    n_b = int(alone_b.attention_mask.sum())
    torch.testing.assert_close(batch.hidden_states[0], alone_a.hidden_states[0])
    torch.testing.assert_close(batch.hidden_states[1, :n_b], alone_b.hidden_states[0])
    assert batch.attention_mask[1].sum() == n_b and not batch.attention_mask[1, n_b:].any()
    assert torch.equal(encode_prompts(vlm, [a]).hidden_states, alone_a.hidden_states)


def test_images_of_any_size_are_squared_with_black(vlms):
    import numpy as np
    square = square_image(torch.ones(60, 10, 3))
    pixels = torch.from_numpy(np.asarray(square).copy())
    assert square.size == (60, 60) and pixels[:, :25].max() == 0 and pixels[:, 25:35].min() == 255
    inputs = prompt_inputs(vlms[True], build_prompt("<image1> and <image2>", {1: torch.rand(1, 300, 20, 3),
                                                                             2: torch.rand(1, 9, 400, 3)}))
    assert inputs["pixel_values"].shape[-2:] == (vlms[True].image_resolution,) * 2  # one size for every image


def test_describe_is_deterministic_with_history(vlms):
    prompt = build_prompt("<image1> what is this?", {1: two_images()[1]})
    response, embeds = describe(vlms[False], prompt, history="User: hi\nAssistant: hello", max_new_tokens=6)
    again, _ = describe(vlms[False], prompt, history="User: hi\nAssistant: hello", max_new_tokens=6)
    assert response == again and embeds.hidden_states.shape[-1] == vlms[False].hidden_size
    assert parse_history("User: a\nmore\nAssistant: b") == [("user", "a\nmore"), ("assistant", "b")]
    # text before the first role is the user's turn (issue 15), not an error
    assert parse_history("hello\nAssistant: b") == [("user", "hello"), ("assistant", "b")]


def test_llmga_system_prompt_and_task_templates_reach_the_model(vlms):
    from mmig_core import llmga_tags
    from mmig_core.vlm import chat_inputs, describe_edit
    vlm = vlms[False]
    prompt = build_prompt("<image1>", {1: two_images()[1]})
    inputs = chat_inputs(vlm, prompt, system=llmga_tags.SYSTEM_PROMPT, template=llmga_tags.TASK_TEMPLATES["inpaint"])
    text = vlm.processor.tokenizer.decode(inputs["input_ids"][0])
    assert text.index("LLMGA") < text.index("<image>") < text.index("Inpaint this image.")
    assert "between <gen_image> and </gen_image>" not in text  # no pack request in the released format
    plain = vlm.processor.tokenizer.decode(chat_inputs(vlm, prompt)["input_ids"][0])
    assert "LLMGA" not in plain and "Inpaint" not in plain

    edit = build_prompt("<image1> make it winter", {1: two_images()[1]})
    first, second, embeds = describe_edit(vlm, edit, llmga_tags.EDIT_FIRST_TURN, system=llmga_tags.SYSTEM_PROMPT,
                                          max_new_tokens=4)
    assert (first, second) == describe_edit(vlm, edit, llmga_tags.EDIT_FIRST_TURN, system=llmga_tags.SYSTEM_PROMPT,
                                            max_new_tokens=4)[:2]
    assert embeds.hidden_states.shape[-1] == vlm.hidden_size
    with pytest.raises(ValueError, match="edit instruction"):
        describe_edit(vlm, prompt, llmga_tags.EDIT_FIRST_TURN)


def test_folder_errors_name_the_fix(folder, tmp_path):
    with pytest.raises(ModelFilesError, match="no vision tower"):
        from transformers import MistralConfig, MistralForCausalLM
        MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "t")
        load_vlm(tmp_path / "t")
    with pytest.raises(ModelFilesError, match="safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        load_vlm(tmp_path / "empty")


def family_module_of(family):
    from devtools.tiny_vlm_families import FAMILY_MODULES, family_module
    return next(m for m in map(family_module, FAMILY_MODULES) if m.FAMILY == family)


def family_folder(tiny_models, family):
    """The tiny folder of a family, on every transformers the pack supports (make test-transformers runs these at
    the floor and 4.57): skipped only where the family's model_type is newer than the installed transformers
    (FAMILY_MIN_TRANSFORMERS; test_a_family_newer_than_this_transformers_is_a_clear_error covers those)."""
    from devtools.tiny_vlm_families import folder_name, too_old_for
    from mmig_core.hf_compat import transformers_version
    needed = too_old_for(family_module_of(family))
    if needed:
        pytest.skip(f"{family} needs transformers >= {needed}; this is {transformers_version()}")
    folder = tiny_models / "vlm" / folder_name(family)
    assert (folder / "config.json").is_file(), f"no tiny {family} in {folder}, though this transformers has it"
    return folder


def _families():
    from devtools.tiny_vlm_families import FAMILY_MODULES, family_module
    return [family_module(m).FAMILY for m in FAMILY_MODULES]


@pytest.mark.parametrize("family", _families())
def test_a_family_newer_than_this_transformers_is_a_clear_error(tiny_models, tmp_path, family):
    """Under the installed transformers itself (no stand-in version): a folder of a family whose model_type this
    release lacks fails with the family's name and the release it needs, not "could not read the config"."""
    import json

    from devtools.tiny_vlm_families import too_old_for
    from mmig_core.hf_compat import FAMILY_MIN_TRANSFORMERS, at_least, transformers_version
    module = family_module_of(family)
    minimum = FAMILY_MIN_TRANSFORMERS.get(module.MODEL_TYPE)
    if minimum is None or at_least(minimum):
        pytest.skip(f"{family} ({module.MODEL_TYPE}) exists in transformers {transformers_version()}")
    assert too_old_for(module) == minimum  # the builders skip it for the same reason
    folder = tmp_path / family
    folder.mkdir()
    for file in (tiny_models / TINY_IDEFICS2).iterdir():  # real files; only the model_type is the family's
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": module.MODEL_TYPE}))
    with pytest.raises(ModelFilesError, match=rf"model_type '{module.MODEL_TYPE}'\) need transformers >= "
                                              rf"{re.escape(minimum)}; this ComfyUI has transformers "
                                              rf"{re.escape(transformers_version())}"):
        load_vlm(folder)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "idefics3", "gemma3", "paligemma", "mllama"])
def test_e_llm_is_the_last_hidden_state_each_response_token_came_from(tiny_models, family):
    """describe's e_llm comes from the generation itself: its first row is the prompt's last position in a plain
    forward (same final norm), for families with extra per-token inputs (token_type_ids, cross_attention_mask)."""
    from mmig_core.vlm import chat_inputs, hidden_states
    vlm = load_vlm(family_folder(tiny_models, family))
    prompt = build_prompt("<image1> what is this?", {1: two_images()[1]})
    response, embeds = describe(vlm, prompt, max_new_tokens=4)
    forward = hidden_states(vlm, chat_inputs(vlm, prompt))[0, -1].float().cpu()
    torch.testing.assert_close(embeds.hidden_states[0, 0], forward, atol=1e-4, rtol=1e-4)
    assert 1 <= embeds.hidden_states.shape[1] <= 4 and embeds.hidden_size == vlm.hidden_size


def test_sampling_repeats_with_its_seed(tiny_models):
    from mmig_core.vlm import GenerationSettings
    vlm = load_vlm(family_folder(tiny_models, "qwen2_vl"))
    prompt = build_prompt("<image1> describe it", {1: two_images()[1]})

    def run(seed, **extra):
        return describe(vlm, prompt, max_new_tokens=GenerationSettings(max_new_tokens=8, do_sample=True, seed=seed,
                                                                       temperature=1.5, top_p=1.0, **extra))[0]
    assert run(3) == run(3)
    assert len({run(seed) for seed in range(4)}) > 1  # the seed, not a fixed path, decides
    greedy = describe(vlm, prompt, max_new_tokens=8)[0]
    assert greedy == describe(vlm, prompt, max_new_tokens=GenerationSettings(max_new_tokens=8, seed=99))[0]


def test_image_resolution_is_clamped_to_what_the_tower_takes(tiny_models):
    qwen = {r: load_vlm(family_folder(tiny_models, "qwen2_vl"), image_resolution=r) for r in (1, 10_000)}
    if "shortest_edge" not in (qwen[1].processor.image_processor.size or {}):
        # transformers < 4.49: the image processor sizes by its own min/max_pixels attributes, not a per-call size,
        # so the pack keeps the processor's sizing (the loader logs that the asked resolution is not applied)
        assert qwen[1].images.mode != "pixel budget" and qwen[1].image_resolution == qwen[10_000].image_resolution
    else:
        assert (qwen[1].image_resolution, qwen[10_000].image_resolution) == (32, 64)  # the tiny pixel budget
        assert (qwen[1].tokens_per_image, qwen[10_000].tokens_per_image) == (4, 16)   # 8 px patches, 2x2 merged
    llava = load_vlm(family_folder(tiny_models, "llava"), image_resolution=448)
    assert llava.images.mode == "native" and llava.image_resolution == 32 and llava.tokens_per_image == 16
    # a tower with fixed position embeddings keeps its native size whatever is asked (Gemma3: 448 < 896 crashed)
    gemma = load_vlm(family_folder(tiny_models, "gemma3"), image_resolution=16)
    inputs = prompt_inputs(gemma, build_prompt("<image1>", {1: two_images()[1]}))
    assert inputs["pixel_values"].shape[-1] == gemma.model.config.vision_config.image_size


def test_paligemma_takes_images_first_and_text_only_prompts(tiny_models):
    vlm = load_vlm(family_folder(tiny_models, "paligemma"))
    tok = vlm.processor.tokenizer
    both = prompt_inputs(vlm, build_prompt("a <image1> man", {1: two_images()[1]}))["input_ids"][0].tolist()
    image_id = vlm.model.config.image_token_index
    assert both[:vlm.tokens_per_image] == [image_id] * vlm.tokens_per_image and both[vlm.tokens_per_image] == tok.bos_token_id
    text_only = prompt_inputs(vlm, build_prompt("a lighthouse", {}))["input_ids"][0].tolist()
    assert text_only[0] == tok.bos_token_id and text_only.count(tok.bos_token_id) == 1 and image_id not in text_only


@pytest.mark.parametrize("config, named", [
    ({"model_type": "florence2", "auto_map": {"AutoConfig": "configuration_florence2.Florence2Config"}}, "Florence-2"),
    ({"model_type": "moondream1", "auto_map": {"AutoConfig": "hf_moondream.HfConfig"}}, "moondream2"),
    ({"model_type": "internvl_chat", "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}},
     "-hf"),
    ({"model_type": "some_new_vlm", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}, "some_new_vlm"),
])
def test_remote_code_checkpoints_are_refused_by_name(tmp_path, config, named):
    import json

    from safetensors.torch import save_file
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFilesError, match="remote code") as error:
        load_vlm(tmp_path)
    assert named in str(error.value) and "trust_remote_code=False" in str(error.value)


def test_smolvlm_without_num2words_names_the_package(tiny_models, monkeypatch):
    folder = family_folder(tiny_models, "smolvlm")
    from transformers.models.smolvlm import processing_smolvlm
    monkeypatch.setattr(processing_smolvlm, "num2words", None)
    with pytest.raises(ModelFilesError, match="pip install num2words"):
        load_vlm(folder)


def test_a_prompt_longer_than_the_positions_is_a_clear_error(tiny_models, tmp_path):
    import json
    import shutil

    from mmig_core.vlm import VLMInputError
    short = tmp_path / "short"
    shutil.copytree(family_folder(tiny_models, "llava"), short)
    config = json.loads((short / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 30  # one 16-token image fits, two do not
    (short / "config.json").write_text(json.dumps(config))
    vlm = load_vlm(short)
    with pytest.raises(VLMInputError, match="fewer images"):
        prompt_inputs(vlm, build_prompt("<image1> and <image2>", two_images()))
    assert prompt_inputs(vlm, build_prompt("<image1>", {1: two_images()[1]}))["input_ids"].shape[1] <= 30
