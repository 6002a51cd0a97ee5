"""mmig_core.vlm on the tiny Idefics2 (saved with save_pretrained, offline tokenizer): perceiver removal,
interleaved hidden states, description, and the errors a user can act on."""
import os

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
