"""LLMGA's conversation text, rendered by the released code, for the converted LLaVA folder's chat template.

    python -m devtools.conformance llmga_llava --reference <checkout of dvlab-research/LLMGA>

Writes tests/conformance/llmga_llava/rendered.json: for each conversation mode the pack's converter writes a chat
template for (`mmig_core.llava_layout.CONVERSATIONS`), a fixed set of conversations as transformers chat messages,
and the exact text `llmga/llava/conversation.py`'s `get_prompt()` renders for them, built as LLMGA's CLIs build them
(`DEFAULT_IMAGE_TOKEN + "\\n" + text` for a turn with an image, `append_message(roles[1], None)` before generating,
`conv.system` replaced for a system message). The reference is imported as in `llmga_prompts` (stub packages).
"""
from __future__ import annotations

import json
from pathlib import Path

from devtools.conformance.llmga_prompts import _import_reference_modules

REFERENCE = "dvlab-research/LLMGA"
MODES = ["llava_llama_2", "mistral_instruct", "llava_v1", "llava_v0", "llama_3"]


def _text(text):
    return {"type": "text", "text": text}


CASES = [
    {"name": "image_first_turn", "add_generation_prompt": True,
     "messages": [{"role": "user", "content": [{"type": "image"}, _text("Generate a similar image.")]}]},
    {"name": "edit_second_turn", "add_generation_prompt": True,
     "messages": [{"role": "user", "content": [{"type": "image"}, _text("Generate a similar image")]},
                  {"role": "assistant", "content": [_text("<gen_image> a cat on a sofa </gen_image>")]},
                  {"role": "user", "content": [_text("make it winter")]}]},
    {"name": "text_only", "add_generation_prompt": True,
     "messages": [{"role": "user", "content": "Draw a red fox in the snow, soft light."}]},
    {"name": "system_message", "add_generation_prompt": True,
     "messages": [{"role": "system", "content": "You write prompts for an image model."},
                  {"role": "user", "content": [{"type": "image"}, _text("Describe this image.")]}]},
    {"name": "ends_with_answer", "add_generation_prompt": False,
     "messages": [{"role": "user", "content": [{"type": "image"}, _text("What is this?")]},
                  {"role": "assistant", "content": [_text("A dog.")]},
                  {"role": "user", "content": [_text("And its colour?")]},
                  {"role": "assistant", "content": [_text("Brown.")]}]},
]

SYSTEM_HEADER = "<|start_header_id|>system<|end_header_id|>\n\n"


def _reference_prompt(conversation_module, image_token: str, mode: str, case: dict) -> str:
    conv = conversation_module.conv_templates[mode].copy()
    messages = case["messages"]
    if messages[0]["role"] == "system":
        prefix = SYSTEM_HEADER if conv.system.startswith(SYSTEM_HEADER) else ""
        conv.system = prefix + messages[0]["content"]
        messages = messages[1:]
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            text = content
        else:
            text = "".join(image_token + "\n" if c["type"] == "image" else c["text"] for c in content)
        conv.append_message(conv.roles[i % 2], text)
    if case["add_generation_prompt"]:
        conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def regenerate(reference: Path, out: Path) -> None:
    modules = _import_reference_modules(reference)
    conversation, constants = modules["conversation"], modules["constants"]
    rendered = {mode: [dict(case, reference_prompt=_reference_prompt(conversation, constants.DEFAULT_IMAGE_TOKEN,
                                                                      mode, case)) for case in CASES]
                for mode in MODES}
    (out / "rendered.json").write_text(json.dumps({"image_token": constants.DEFAULT_IMAGE_TOKEN,
                                                   "rendered": rendered}, indent=1, ensure_ascii=False) + "\n")
