"""LLMGA's released MLLMs in the original LLaVA repository layout, and their map onto transformers' LLaVA.

LLMGA (dvlab-research/LLMGA) releases its MLLMs as the original LLaVA code saves them: a `llava_llama` /
`llava_mistral` config.json holding the language model's fields plus `mm_*` fields, the vision tower named only by
its hub id (`mm_vision_tower`, CLIP ViT-L/14-336), the projector as `model.mm_projector.0/2.*`, the language model as
`model.embed_tokens` / `model.layers.*` / `lm_head`, no processor, no `<image>` token, no chat template. transformers
cannot load that folder; `training.convert_llmga` turns it into a LlavaForConditionalGeneration folder.

Here are the facts that conversion needs (host-agnostic, no torch at import):
- `original_layout_message(folder)`: the loader's clear message for such a folder (which family, which command);
- `hub_key(original_key)`: the weight-name map onto the llava-hf layout (the layout of llava-hf/llava-1.5-7b-hf,
  which every transformers version from 4.x to 5.x loads);
- `text_config(...)` / `llava_config(...)`: the config mapping;
- `CONVERSATIONS` / `chat_template(mode)`: LLMGA's conversation templates as data, and a Jinja chat template that
  renders a conversation exactly as LLMGA's `Conversation.get_prompt()` does (checked against text the reference
  rendered, tests/conformance/llmga_llava/).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from . import llmga_tags

# Original-layout model types -> the transformers text model they wrap. Only these two convert: LLaVA's projector and
# splice are the same for the others, but their tokenizers / templates (Gemma, Phi-3, Qwen2, MPT) are not covered.
CONVERTIBLE = {"llava_llama": "llama", "llava_mistral": "mistral"}
OTHER_ORIGINAL_TYPES = {"llava_mpt": "MPT", "llava_gemma": "Gemma", "llava_Phi3": "Phi-3", "llava_Qwen2": "Qwen2",
                        "llava_phi3": "Phi-3", "llava_qwen2": "Qwen2"}
FAMILY_NAMES = {"llava_llama": "LLaMA (LLaMA-2 / Vicuna / LLaMA-3)", "llava_mistral": "Mistral"}

# Fields the original LLaVA code adds to the language model's config; none belongs in transformers' text_config.
LLAVA_ONLY_FIELDS = (
    "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type", "mm_projector_lr", "mm_vision_tower_lr",
    "mm_resampler_type", "mm_mask_type", "mm_spatial_pool_mode", "mm_spatial_pool_stride", "mm_newline_position",
    "image_aspect_ratio", "image_grid_pinpoints", "image_crop_resolution", "image_split_resolution",
    "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tune_mm_vision_resampler", "freeze_mm_vision_resampler",
    "unfreeze_mm_vision_tower", "use_mm_proj", "tokenizer_padding_side", "tokenizer_model_max_length",
    "architectures", "_name_or_path", "model_type", "transformers_version", "vocab_size",
)
# Select-feature names: LLaVA's "patch" drops CLS ("default" in transformers), "cls_patch" keeps it ("full").
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}
IMAGE_TOKEN = "<image>"

# LLMGA's conversation templates (llmga/llava/conversation.py at 7e32eb6), as data. The test holds them equal to
# tests/conformance/llmga_prompts/facts.json, which was read from the reference. Which mode a checkpoint uses is
# llmga_tags.conversation_mode(name) (the CLIs' rule).
_LLMGA_SYSTEM = llmga_tags.SYSTEM_PROMPTS["llava_llama_2"]
_VICUNA_SYSTEM = llmga_tags.SYSTEM_PROMPTS["llava_v1"]
CONVERSATIONS = {
    "llava_llama_2": {"system": _LLMGA_SYSTEM, "roles": ["USER", "ASSISTANT"], "sep_style": "LLAMA_2",
                      "sep": "<s>", "sep2": "</s>"},
    "mistral_instruct": {"system": "", "roles": ["USER", "ASSISTANT"], "sep_style": "LLAMA_2",
                         "sep": "<s>", "sep2": "</s>"},
    "llava_v1": {"system": _VICUNA_SYSTEM, "roles": ["USER", "ASSISTANT"], "sep_style": "TWO",
                 "sep": " ", "sep2": "</s>"},
    "llava_v0": {"system": _VICUNA_SYSTEM, "roles": ["Human", "Assistant"], "sep_style": "SINGLE",
                 "sep": "###", "sep2": None},
    "llama_3": {"system": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
                          "assistant. You are able to understand the visual content that the user provides, and "
                          "assist the user with a variety of tasks using natural language.",
                # The reference's assistant role is the *system* header; kept, since the released model learnt it.
                "roles": ["<|start_header_id|>user<|end_header_id|>\n\n",
                          "<|start_header_id|>system<|end_header_id|>\n\n"],
                "sep_style": "LLAMA_3", "sep": "<|eot_id|>", "sep2": None},
}
class LayoutError(ValueError):
    """A folder or file that cannot be converted; the message says what to fix."""


def read_config(folder) -> dict | None:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return config if isinstance(config, dict) else None


def _is_original(config: dict | None) -> bool:
    if not config:
        return False
    model_type = config.get("model_type")
    # transformers' own llava_next / llava_onevision types start with "llava_" too: only the original types count,
    # or a config carrying the original code's mm_* fields.
    return model_type in CONVERTIBLE or model_type in OTHER_ORIGINAL_TYPES or "mm_vision_tower" in config \
        or "mm_projector_type" in config


def is_original_layout(folder) -> bool:
    """True for a folder saved by the original LLaVA code (LLMGA's released MLLMs)."""
    return _is_original(read_config(folder))


def convert_command(folder, vision_tower: str = "CLIP_FOLDER") -> str:
    folder = Path(folder)
    out = folder.with_name(folder.name + "-llava-hf")
    return f'python -m training.convert_llmga "{folder}" "{out}" --vision-tower "{vision_tower}"'


def original_layout_message(folder) -> str | None:
    """None for any folder that is not in the original LLaVA layout; else the message the loader raises."""
    config = read_config(folder)
    if not _is_original(config):
        return None
    model_type = config.get("model_type", "?")
    tower = config.get("mm_vision_tower", "openai/clip-vit-large-patch14-336")
    if model_type not in CONVERTIBLE:
        family = OTHER_ORIGINAL_TYPES.get(model_type, model_type)
        return (f"{folder} is an LLMGA/LLaVA checkpoint in the original LLaVA repository layout with a {family} "
                f"language model (model_type '{model_type}'). transformers cannot load that layout, and the pack's "
                f"converter (training.convert_llmga) handles only {', '.join(sorted(CONVERTIBLE))} so far. Use an "
                f"LLMGA release with a LLaMA or Mistral language model, or a model already in the transformers "
                f"LLaVA layout.")
    return (f"{folder} is an LLMGA/LLaVA checkpoint in the original LLaVA repository layout (model_type "
            f"'{model_type}', a {FAMILY_NAMES[model_type]} language model; its vision tower '{tower}' is named only "
            f"by its hub id, and it has no processor, no <image> token and no chat template). transformers cannot "
            f"load it as is. Convert it once into a transformers LLaVA folder, from the ComfyUI-MMIG folder, with a "
            f"local copy of {tower}:\n    {convert_command(folder, f'<folder of {tower}>')}\n"
            f"and load the converted folder instead.")


def check_convertible(config: dict, folder) -> str:
    """The text model type; a LayoutError naming the field for anything the llava-hf layout cannot hold."""
    model_type = config.get("model_type")
    if model_type not in CONVERTIBLE:
        raise LayoutError(original_layout_message(folder) or
                          f"{folder} is not an LLMGA/LLaVA checkpoint in the original layout (its config.json has "
                          f"model_type {model_type!r} and no mm_vision_tower); nothing to convert.")
    checks = [
        ("mm_projector_type", config.get("mm_projector_type", "linear"), ("mlp2x_gelu",),
         "transformers' LLaVA projector is linear -> GELU -> linear"),
        ("mm_vision_select_feature", config.get("mm_vision_select_feature", "patch"), tuple(SELECT_FEATURE), ""),
        ("mm_patch_merge_type", config.get("mm_patch_merge_type", "flat"), ("flat",),
         "the spatial/unpad merge is LLaVA-NeXT's, not LLMGA's"),
        ("image_aspect_ratio", config.get("image_aspect_ratio", "square"), ("pad", "square"),
         "anyres tiling is LLaVA-NeXT's"),
        ("mm_use_im_start_end", bool(config.get("mm_use_im_start_end", False)), (False,),
         "LLMGA's releases do not wrap the image in start/end tokens"),
    ]
    for field, value, allowed, why in checks:
        if value not in allowed:
            raise LayoutError(f"{folder}/config.json has {field}={value!r}; the converter handles only "
                              f"{', '.join(map(repr, allowed))}{' (' + why + ')' if why else ''}.")
    if not isinstance(config.get("mm_hidden_size"), int) or not isinstance(config.get("hidden_size"), int):
        raise LayoutError(f"{folder}/config.json lacks an integer mm_hidden_size / hidden_size.")
    return CONVERTIBLE[model_type]


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hub_key(key: str) -> str | None:
    """The llava-hf name of an original-layout weight; None for a weight that has no place there (rotary buffers);
    a LayoutError for a name the original layout does not have."""
    if key.endswith("rotary_emb.inv_freq"):
        return None  # recomputed from rope_theta; older checkpoints saved it as a buffer
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key in ("model.embed_tokens.weight", "model.norm.weight") or _LAYER.match(key):
        return "language_model." + key
    projector = {"model.mm_projector.0.": "multi_modal_projector.linear_1.",
                 "model.mm_projector.2.": "multi_modal_projector.linear_2."}
    for old, new in projector.items():
        if key.startswith(old) and key[len(old):] in ("weight", "bias"):
            return new + key[len(old):]
    tower = "model.vision_tower.vision_tower.vision_model."  # a checkpoint that trained its tower saves it here
    if key.startswith(tower):
        return None if key.endswith("position_ids") else "vision_tower.vision_model." + key[len(tower):]
    raise LayoutError(f"weight {key!r} is not part of the original LLaVA layout the converter knows "
                      f"(model.embed_tokens, model.layers.*, model.norm, lm_head, model.mm_projector.0/2, "
                      f"model.vision_tower.vision_tower.vision_model.*)")


_CLIP_VISION_MODULES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")


def clip_hub_key(key: str) -> str | None:
    """A CLIP folder's weight -> its llava-hf name; None for the text side and buffers. Handles CLIPModel folders
    (`vision_model.*`, the hub's openai/clip-vit-large-patch14-336), CLIPVisionModel folders saved by 4.x
    (`vision_model.*`) and by 5.x (the tower's modules at the top: `embeddings.*`, `encoder.*`, ...)."""
    rest = key[len("vision_model."):] if key.startswith("vision_model.") else key
    if not rest.startswith(_CLIP_VISION_MODULES) or rest.endswith("position_ids"):
        return None
    return "vision_tower.vision_model." + rest


def clip_vision_config(clip_config: dict, folder) -> dict:
    """The vision config of a CLIPModel or CLIPVisionModel folder's config.json."""
    if clip_config.get("model_type") == "clip_vision_model":
        vision = dict(clip_config)
    elif clip_config.get("model_type") == "clip":
        vision = dict(clip_config.get("vision_config") or clip_config.get("vision_config_dict") or {})
    else:
        raise LayoutError(f"{folder} is not a CLIP folder (config.json model_type {clip_config.get('model_type')!r};"
                          f" expected 'clip' or 'clip_vision_model', e.g. openai/clip-vit-large-patch14-336).")
    for key in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        vision.pop(key, None)
    vision["model_type"] = "clip_vision_model"
    for field in ("hidden_size", "image_size", "patch_size", "num_hidden_layers"):
        if not isinstance(vision.get(field), int):
            raise LayoutError(f"{folder}/config.json: the vision config lacks an integer {field}.")
    return vision


def text_config(config: dict, text_model_type: str, vocab_size: int) -> dict:
    text = {k: v for k, v in config.items() if k not in LLAVA_ONLY_FIELDS}
    if text.get("rope_scaling", 0) is None:
        del text["rope_scaling"]  # null in LLaVA's saves; newer transformers warn on an explicit null
    text.update(model_type=text_model_type, vocab_size=vocab_size)
    return text


def llava_config(config: dict, vision: dict, text_model_type: str, vocab_size: int, image_token_id: int) -> dict:
    """The config.json of the converted folder, with llava-hf's field names."""
    layer = config.get("mm_vision_select_layer", -2)
    strategy = SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    text = text_config(config, text_model_type, vocab_size)
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": image_token_id, "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": layer, "vision_feature_select_strategy": strategy,
        "image_seq_length": patches + (1 if strategy == "full" else 0),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "torch_dtype": config.get("torch_dtype", "float16"),
        "text_config": text, "vision_config": vision,
    }


def image_processor_kwargs(preprocessor: dict) -> dict:
    """CLIPImageProcessor settings of the CLIP folder, kept for the converted processor."""
    keep = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_convert_rgb")
    return {k: preprocessor[k] for k in keep if k in preprocessor}


def chat_template(mode: str) -> str:
    """A Jinja chat template that renders LLMGA's `Conversation.get_prompt()` text for `mode`.

    Messages are transformers' chat messages; an image item renders `<image>` followed by a newline, as LLMGA's CLIs
    write `DEFAULT_IMAGE_TOKEN + "\\n" + text` (unless the text after it already starts with one, as the pack's
    own task sentences do: either way the text is LLMGA's). A `system` message replaces the mode's system prompt.
    No BOS: the tokenizer adds it, as `tokenizer_image_token` does. Multi-turn LLAMA_2 prompts keep LLMGA's literal
    `<s>` before later [INST] turns and the `<<SYS>>` block even when the system prompt is empty (mistral_instruct), since the
    released models were trained on exactly that text."""
    if mode not in CONVERSATIONS:
        raise LayoutError(f"conversation mode {mode!r} has no chat template here; known: {', '.join(CONVERSATIONS)}")
    conv = CONVERSATIONS[mode]
    style = conv["sep_style"]
    # LLAMA_3's system string carries its role header; a system message supplies only the text after it.
    header = "<|start_header_id|>system<|end_header_id|>\n\n" if style == "LLAMA_3" else ""

    def lit(value) -> str:
        return json.dumps(value if value is not None else "")

    # One line, no whitespace control: every character outside the tags is prompt text. transformers renders with
    # trim_blocks, which eats a newline right after a block tag: such a newline is written as an expression.
    content = ("{% macro content(m) %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
               "{% for item in m['content'] %}{% if item['type'] == 'image' %}<image>"
               "{% if not (loop.nextitem is defined and loop.nextitem['type'] == 'text' "
               "and loop.nextitem['text'][:1] == '\\n') %}{{ '\\n' }}{% endif %}"
               "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
               "{% endmacro %}")
    head = (content + "{% set system = " + lit(conv["system"]) + " %}{% set msgs = messages %}"
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% set system = " + lit(header) + " + content(messages[0]) %}"
            "{% set msgs = messages[1:] %}{% endif %}"
            "{% set user = " + lit(conv["roles"][0]) + " %}{% set assistant = " + lit(conv["roles"][1]) + " %}"
            "{% set sep = " + lit(conv["sep"]) + " %}{% set sep2 = " + lit(conv["sep2"]) + " %}")
    if style == "LLAMA_2":
        body = ("{% for m in msgs %}{% if loop.index0 % 2 == 0 %}{% if not loop.first %}{{ sep }}{% endif %}"
                "[INST] {% if loop.first %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}{{ content(m) }} [/INST]"
                "{% else %} {{ content(m) }} {{ sep2 }}{% endif %}{% endfor %}")
        return head + body
    if style in ("TWO", "SINGLE", "LLAMA_3"):
        second = "sep2" if style == "TWO" else "sep"
        colon, gen_suffix = (": ", ":") if style != "LLAMA_3" else ("", "")
        body = ("{{ system }}{{ sep }}{% for m in msgs %}{% if loop.index0 % 2 == 0 %}{{ user }}{% else %}"
                "{{ assistant }}{% endif %}" + colon + "{{ content(m) }}{% if loop.index0 % 2 == 0 %}{{ sep }}"
                "{% else %}{{ " + second + " }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ assistant }}" + gen_suffix + "{% endif %}")
        return head + body
    raise LayoutError(f"separator style {style!r} has no chat template here")
