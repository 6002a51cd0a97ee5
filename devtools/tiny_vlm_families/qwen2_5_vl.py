"""Tiny Qwen2.5-VL (Qwen/Qwen2.5-VL-3B-Instruct's layout): Qwen2-VL's tokens, template and processor; a windowed
vision tower with SwiGLU blocks and an output width of its own."""
from __future__ import annotations

from pathlib import Path

from . import _common, qwen2_vl

FAMILY = "qwen2_5_vl"
MODEL_TYPE = "qwen2_5_vl"
FACTS = {**qwen2_vl.FACTS, "hub_id": "Qwen/Qwen2.5-VL-3B-Instruct", "max_pixels": 12845056,
         "min_transformers": "4.49"}


def build(folder: Path, seed: int = 0) -> Path:
    _common.require_family(MODEL_TYPE)
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    tok = qwen2_vl.tokenizer()
    config = qwen2_vl.make_config(
        Qwen2_5_VLConfig,
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=qwen2_vl.TEXT_HIDDEN,
             patch_size=qwen2_vl.PATCH, spatial_merge_size=qwen2_vl.MERGE, temporal_patch_size=2,
             window_size=4 * qwen2_vl.PATCH, fullatt_block_indexes=[1]),
        qwen2_vl.text_config(tok), qwen2_vl.special_ids(tok))
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    _common.random_init(model, tok, seed=seed, eos_ids=(config.get_text_config().eos_token_id,))
    image_processor, video = qwen2_vl.processors(tok, Qwen2VLImageProcessor, "Qwen2VLVideoProcessor")
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    chat_template=qwen2_vl.CHAT_TEMPLATE, **video)
    return _common.save(model, processor, folder)
