"""The pack's LLMGA prompt format against the released code's (facts in llmga_prompts/facts.json, written by
`python -m devtools.conformance llmga_prompts --reference <checkout of dvlab-research/LLMGA>`): its system
prompts, user templates, conversation choice by checkpoint name, LLaVA model types, and what its CLIs extract
from a response."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmig_core import llmga_tags
from mmig_core.mm_prompt import build_prompt
from mmig_core.vlm import chat_messages, edit_messages

FACTS = json.loads((Path(__file__).parent / "llmga_prompts" / "facts.json").read_text())
# Role headers some released system strings carry inline; the pack leaves them to the model's chat template.
ROLE_HEADERS = ("<|start_header_id|>system<|end_header_id|>\n\n", "<|im_start|>system\n")
FAKE_VLM = SimpleNamespace(processor=SimpleNamespace(image_token=FACTS["image_token"]))  # what chat_messages reads


def released_system(mode: str) -> str:
    system = FACTS["conversations"][mode]["system"]
    for header in ROLE_HEADERS:
        system = system.removeprefix(header)
    return system


def released_mode(name: str) -> str:
    rule = FACTS["conversation_mode"]
    return next((mode for part, mode in rule["rules"] if part in name.lower()), rule["default"])


def body(message: dict) -> str:
    return "".join(FACTS["image_token"] if c["type"] == "image" else c["text"] for c in message["content"])


def test_system_prompts_are_the_released_ones():
    assert llmga_tags.SYSTEM_PROMPT == FACTS["conversations"]["llava_llama_2"]["system"]
    assert "<gen_image> DETAILED DESCRIPTION </gen_image>" in llmga_tags.SYSTEM_PROMPT
    for mode, system in llmga_tags.SYSTEM_PROMPTS.items():
        assert system == released_system(mode), mode
    assert {mode for _part, mode in FACTS["conversation_mode"]["rules"]} <= set(llmga_tags.SYSTEM_PROMPTS)
    assert FACTS["tags"] == ["<gen_image>", "</gen_image>"]


@pytest.mark.parametrize("name", ["llmga-llama-2-7b-chat-full-finetune", "llmga-vicuna-7b-v1.5-full-finetune",
                                  "llmga-mistral_instruct-full-finetune", "llmga-llama3-8b-it-full-finetune",
                                  "llmga-Qwen2-0.5B-full-finetune", "llmga-Phi-3-mini-128k-full-finetune",
                                  "llmga-gemma-2b-it-full-finetune", "llmga-cn-Qwen2-0.5B-full-finetune"])
def test_released_checkpoints_get_the_conversation_the_released_cli_picks(name):
    assert [list(p) for p in llmga_tags.CONVERSATION_BY_NAME] == FACTS["conversation_mode"]["rules"]
    assert llmga_tags.conversation_mode(name) == released_mode(name) != FACTS["conversation_mode"]["default"]
    assert llmga_tags.system_prompt(name) == released_system(released_mode(name))


def test_unmatched_names_fall_back_to_the_tag_asking_prompt_deliberately():
    # The CLIs fall back to llava_v0 (no mention of tags); the pack to llava_llama_2 (documented in llmga_tags).
    assert released_mode("my-renamed-model") == "llava_v0"
    assert llmga_tags.conversation_mode("my-renamed-model") == "llava_llama_2"


def test_user_templates_and_model_types_are_the_released_ones():
    for task, template in llmga_tags.TASK_TEMPLATES.items():
        assert template in FACTS["user_templates"][{"similar image": "similar"}.get(task, task)], task
    assert llmga_tags.EDIT_FIRST_TURN == FACTS["edit_first_turn"]
    assert set(llmga_tags.LLAVA_MODEL_TYPES) == {t.lower() for t in FACTS["llava_model_types"].values()}
    for model_type in FACTS["llava_model_types"].values():
        assert llmga_tags.resolve_prompt_style("auto", {"model_type": model_type}) == "llmga"


@pytest.mark.parametrize("task, fact", [("similar image", "similar"), ("inpaint", "inpaint"),
                                        ("outpaint", "outpaint")])
def test_the_pack_sends_the_released_turns(task, fact):
    """The system and user text the pack sends are those inside the released llava_llama_2 rendering."""
    prompt = build_prompt("<image1>", {1: torch.rand(1, 8, 8, 3)})
    messages, images = chat_messages(FAKE_VLM, prompt, system=llmga_tags.system_prompt("llmga-llama-2-7b-chat"),
                                     template=llmga_tags.TASK_TEMPLATES[task])
    assert len(images) == 1 and [m["role"] for m in messages] == ["system", "user"]
    rendered = FACTS["rendered_llava_llama_2"][fact]
    assert rendered == f"[INST] <<SYS>>\n{body(messages[0])}\n<</SYS>>\n\n{body(messages[1])} [/INST]"


def test_the_pack_sends_the_released_edit_turns():
    prompt = build_prompt("<image1> make it winter", {1: torch.rand(1, 8, 8, 3)})
    messages, _ = edit_messages(FAKE_VLM, prompt, llmga_tags.EDIT_FIRST_TURN, system=llmga_tags.SYSTEM_PROMPT,
                                first_response="<gen_image> a cat on a sofa </gen_image>")
    system, first, answer, instruction = (body(m) for m in messages)
    assert FACTS["rendered_llava_llama_2"]["edit_second_turn"] == (
        f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{first} [/INST] {answer} </s><s>[INST] {instruction} [/INST]")


@pytest.mark.parametrize("row", FACTS["extraction"], ids=lambda row: row["response"][:40] or "empty")
def test_extraction_matches_the_released_cli_where_both_tags_are_present(row):
    response, reference = row["response"], row["reference"]
    ours = llmga_tags.extract_generation_prompt(response)
    opening, closing = response.find("<gen_image>"), response.find("</gen_image>")
    if opening != -1 and closing > opening and response[opening + len("<gen_image>")].isspace():
        assert ours == " ".join(reference.split())  # the same prompt, whitespace normalised
    elif opening != -1 and closing > opening:  # no space after the tag: the CLI loses the prompt's first letter
        assert ours[1:] == reference.strip()
    elif "gen_img>" in response.lower() or "<GEN_IMAGE>" in response:  # the paper's tag, other cases: pack only
        assert reference == response and ours
    else:  # one tag only, or in the wrong order: the CLI cuts at whichever it finds; the pack finds no prompt
        assert ours is None
