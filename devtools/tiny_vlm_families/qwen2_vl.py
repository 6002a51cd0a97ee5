"""Tiny Qwen2-VL (Qwen/Qwen2-VL-2B-Instruct's layout): a dynamic-resolution ViT whose 2x2 patch merger feeds a
Qwen2 decoder with multimodal RoPE; ChatML turns with each image as <|vision_start|><|image_pad|><|vision_end|>."""
from __future__ import annotations

from pathlib import Path

from . import _common

FAMILY = "qwen2_vl"
MODEL_TYPE = "qwen2_vl"
PATCH = 8          # real: 14
MERGE = 2          # real: 2 (a 2x2 block of patches is one token)
TEXT_HIDDEN = 64
BASE_SPECIAL = ["<|endoftext|>"]
ADDED_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                 "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
FACTS = {"hub_id": "Qwen/Qwen2-VL-2B-Instruct", "image_token": "<|image_pad|>", "bos": None,
         "placeholder": "<|vision_start|><|image_pad|><|vision_end|>", "native_size": None,
         "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "merge_size": 2}

# The released chat template (a default system prompt; images wrapped in vision markers), as data.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def tokenizer():
    from transformers import Qwen2TokenizerFast
    return _common.train_tokenizer(base_special=BASE_SPECIAL, added_special=ADDED_SPECIAL, bos=None,
                                   eos="<|im_end|>", pad="<|endoftext|>", tokenizer_class=Qwen2TokenizerFast)


def text_config(tok, **extra) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **extra)  # 2 * sum = head_dim 16


def special_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def video_processor_kwargs(name: str, **kwargs) -> dict:
    """{"video_processor": transformers.<name>(**kwargs)} where this transformers has the class (4.52 and newer);
    older processors take no video processor."""
    import transformers
    cls = getattr(transformers, name, None)
    return {"video_processor": cls(**kwargs)} if cls is not None else {}


def processors(tok, image_processor_class, video_processor_name: str, *, patch=PATCH, merge=MERGE):
    """The image processor with the tiny pixel budget, 32x32 px (4 tokens) .. 64x64 px (16 tokens), and the
    processor kwargs of the matching video processor."""
    factor = patch * merge
    low, high = (2 * factor) ** 2, (4 * factor) ** 2
    # min_pixels / max_pixels as well: 4.x's init takes the budget from them, over `size`
    kwargs = dict(patch_size=patch, merge_size=merge, temporal_patch_size=2, min_pixels=low, max_pixels=high,
                  size={"shortest_edge": low, "longest_edge": high},
                  image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    return image_processor_class(**kwargs), video_processor_kwargs(video_processor_name, **kwargs)


def make_config(config_class, vision: dict, text: dict, ids: dict):
    """Nested (text_config, 5.x and >= 4.52) or flat (the text fields at the top, 4.50-4.51), as the installed
    release lays the config out."""
    if "text_config" in getattr(config_class, "sub_configs", {}):
        return config_class(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    return config_class(vision_config=vision, tie_word_embeddings=False, **{**text, **ids})


def build(folder: Path, seed: int = 0) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    tok = tokenizer()
    config = make_config(Qwen2VLConfig, dict(depth=1, embed_dim=32, hidden_size=TEXT_HIDDEN, num_heads=2, mlp_ratio=2,
                                             patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2),
                         text_config(tok), special_ids(tok))
    model = Qwen2VLForConditionalGeneration(config).eval()
    _common.random_init(model, tok, seed=seed, eos_ids=(config.get_text_config().eos_token_id,))
    image_processor, video = processors(tok, Qwen2VLImageProcessor, "Qwen2VLVideoProcessor")
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE, **video)
    return _common.save(model, processor, folder)
