"""LLMGA's prompt format: what an LLMGA checkpoint is asked, and the prompt it writes between generation tags.

Asking. The released code (dvlab-research/LLMGA) never asks for tags in the user's turn: its user turns are
short templates ("Generate a similar image.", "Inpaint this image.", "Extend this image.", an edit
instruction after a first "Generate a similar image" turn), and the `llava_llama_2` conversation's system
prompt is what asks for `<gen_image> DETAILED DESCRIPTION </gen_image>`. The strings below are that prompt
format, kept as data (tests/conformance/llmga_prompts holds them as read from the released code). The
system prompt follows the released CLIs' choice of conversation by checkpoint name; other VLMs get the
pack's own request sentence (GENERATION_REQUEST) appended to the user's turn instead.

Extracting. The paper writes `<gen_img>...</gen_img>`, the released code `<gen_image>...</gen_image>`; both are
accepted, in any mix. Where a response has both released tags, in order, the prompt is the released CLIs'
(`caption[find("<gen_image>") + 12:find("</gen_image>")]`) with its whitespace normalised. Deliberate
differences: the pack skips the tag only (the CLIs skip one more character, the first letter of a prompt
written without a space after the tag); strips and collapses whitespace; matches tags in any case and
the paper's `<gen_img>`; a response with only one tag, or a closing tag before the opening one, has no
prompt (None: the node then uses the whole response or stops, as the user chose) where the CLIs take the
text after the opening tag or before the closing one, or an empty string; the first complete block
wins; a block nested in another counts as part of the outer one, and tags left inside it are removed.
"""
from __future__ import annotations

import re

TAG = re.compile(r"<(/?)gen_im(?:g|age)>", re.IGNORECASE)
GENERATION_REQUEST = (" Write a detailed prompt for generating the image, between <gen_image> and </gen_image>.")

# The released `llava_llama_2` conversation's system prompt (llmga/llava/conversation.py): the one that asks for tags.
SYSTEM_PROMPT = ("You are LLMGA, a useful language and vision generation assistant. You can generate images "
                 "according to the user's requirements. If the user wants you to inpaint or outpaint images, please "
                 "imagine what is in the black mask parts of the image. If image generation is required, please "
                 "provide a detailed description of the generated images in the form of <gen_image> DETAILED "
                 "DESCRIPTION </gen_image>.")
_VICUNA = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
           "detailed, and polite answers to the human's questions.")
_CHATML = "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
# System text of each released conversation (role headers such as "<|im_start|>system\n" left to the chat template).
SYSTEM_PROMPTS = {
    "llava_llama_2": SYSTEM_PROMPT, "llava_v1": _VICUNA, "llava_v0": _VICUNA,
    "llama_3": ("You are a helpful language and vision assistant. You are able to understand the visual content "
                "that the user provides, and assist the user with a variety of tasks using natural language."),
    "qwen_2": _CHATML, "mpt": _CHATML, "chatml_direct": "Answer the questions.",
    "gemma": "", "phi_3": "", "mistral_instruct": "",
}
# The released CLIs' conversation by checkpoint name (llmga/serve/cli*.py): the first part found in the lower-cased
# name wins. The CLIs fall back to llava_v0, whose system prompt never mentions the tags; the pack falls back to
# llava_llama_2 instead (every released LLMGA checkpoint matches a rule; a renamed one still gets asked for tags).
CONVERSATION_BY_NAME = (("llama-2", "llava_llama_2"), ("llama3", "llama_3"), ("gemma", "gemma"), ("qwen2", "qwen_2"),
                        ("phi-3", "phi_3"), ("mistral", "mistral_instruct"), ("v1.6-34b", "chatml_direct"),
                        ("v1", "llava_v1"), ("mpt", "mpt"))
FALLBACK_CONVERSATION = "llava_llama_2"

# The user's turn per task (llmga/llava/prompt_temp.py, the templates the training data and CLIs use).
TASKS = ("as written", "similar image", "inpaint", "outpaint", "edit")
TASK_TEMPLATES = {"similar image": "Generate a similar image.", "inpaint": "Inpaint this image.",
                  "outpaint": "Extend this image."}
EDIT_FIRST_TURN = "Generate a similar image"  # llmga/serve/cli-sd15-editing.py: the turn before the edit instruction

# The released configs' model types (llmga/llava/model/language_model/*.py): LLaVA's layout. A plain LLaVA model has
# them too; MMIG MLLM Describe's prompt_style then says which format to use.
LLAVA_MODEL_TYPES = ("llava_llama", "llava_mistral", "llava_mpt", "llava_phi3", "llava_qwen2", "llava_gemma")
PROMPT_STYLES = ("auto", "llmga", "pack")


def conversation_mode(model_name: str) -> str:
    """The released conversation for a checkpoint folder name (the pack's fallback: llava_llama_2)."""
    name = model_name.lower()
    return next((mode for part, mode in CONVERSATION_BY_NAME if part in name), FALLBACK_CONVERSATION)


def system_prompt(model_name: str) -> str:
    """The system prompt an LLMGA checkpoint of this name was trained with."""
    return SYSTEM_PROMPTS[conversation_mode(model_name)]


def is_llmga(config: dict, model_name: str = "") -> bool:
    """An LLMGA checkpoint: a released LLaVA-style model type (or mm_vision_tower / mm_projector_type keys), or
    "llmga" in the folder name."""
    model_type = str(config.get("model_type", "")).lower()
    llava = model_type in LLAVA_MODEL_TYPES or ("mm_vision_tower" in config and "mm_projector_type" in config)
    return llava or "llmga" in model_name.lower()


def resolve_prompt_style(style: str, config: dict, model_name: str = "") -> str:
    """"llmga" or "pack": auto is llmga for an LLMGA checkpoint (`is_llmga`), else the pack's own."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if style == "auto":
        return "llmga" if is_llmga(config, model_name) else "pack"
    return style


def extract_generation_prompt(response: str) -> str | None:
    """The first tagged generation prompt in `response`, stripped; None when no complete block exists."""
    depth, start = 0, None
    for match in TAG.finditer(response):
        closing = bool(match.group(1))
        if not closing:
            if depth == 0:
                start = match.end()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                inner = TAG.sub(" ", response[start:match.start()])
                return " ".join(inner.split())
    return None


def strip_tags(response: str) -> str:
    """The response with every generation tag removed (what is left when no complete block exists)."""
    return " ".join(TAG.sub(" ", response).split())
