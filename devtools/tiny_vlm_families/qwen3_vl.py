"""Tiny Qwen3-VL (Qwen/Qwen3-VL-2B-Instruct's layout): 16 px patches with learned position embeddings that are
interpolated to each image's grid, DeepStack features into the first decoder layers, interleaved MRoPE; ChatML
turns without a default system prompt. Needs transformers >= 4.57."""
from __future__ import annotations

from pathlib import Path

from . import _common, qwen2_vl

FAMILY = "qwen3_vl"
MODEL_TYPE = "qwen3_vl"
PATCH = 8  # real: 16
FACTS = {**qwen2_vl.FACTS, "hub_id": "Qwen/Qwen3-VL-2B-Instruct", "patch_size": 16, "min_transformers": "4.57"}

# The released template's image and turn format (its tool-call and reasoning branches left out), as data.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' "
    "or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>{% elif "
    "content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' "
    "in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build(folder: Path, seed: int = 0) -> Path:
    _common.require_family(MODEL_TYPE)
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    tok = qwen2_vl.tokenizer()
    text = qwen2_vl.text_config(tok, head_dim=16)
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    config = Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=qwen2_vl.TEXT_HIDDEN, patch_size=PATCH, spatial_merge_size=qwen2_vl.MERGE,
                           temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0]),
        text_config=text, tie_word_embeddings=False, **qwen2_vl.special_ids(tok))
    model = Qwen3VLForConditionalGeneration(config).eval()
    _common.random_init(model, tok, seed=seed, eos_ids=(config.text_config.eos_token_id,))
    image_processor, video = qwen2_vl.processors(tok, Qwen2VLImageProcessor, "Qwen3VLVideoProcessor", patch=PATCH)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE, **video)
    return _common.save(model, processor, folder)
