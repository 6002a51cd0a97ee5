"""Tiny LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf's layout): a SigLIP tower (fixed position
embeddings: native size only) with anyres tiling into a Qwen2 decoder; ChatML turns with "<image>" first."""
from __future__ import annotations

from pathlib import Path

from . import _common, qwen2_vl

FAMILY = "llava_onevision"
MODEL_TYPE = "llava_onevision"
IMAGE_SIZE, PATCH = 32, 8  # real: 384, 14 (729 tokens per view)
GRID_PINPOINTS = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                  [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
FACTS = {"hub_id": "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "image_token": "<image>", "bos": None,
         "placeholder": "<image>", "native_size": 384, "patch_size": 14, "fixed_position_embeddings": True}

# The released template (images, then videos, then text of each turn), as data.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build(folder: Path, seed: int = 0) -> Path:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, Qwen2TokenizerFast)

    from .qwen2_vl import video_processor_kwargs
    tok = _common.train_tokenizer(base_special=qwen2_vl.BASE_SPECIAL, added_special=["<|im_start|>", "<|im_end|>",
                                                                                      "<image>", "<video>"],
                                  bos=None, eos="<|im_end|>", pad="<|endoftext|>", tokenizer_class=Qwen2TokenizerFast)
    ids = tok.convert_tokens_to_ids
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=ids("<image>"),
                                  video_token_index=ids("<video>"), vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                  image_grid_pinpoints=GRID_PINPOINTS, tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _common.random_init(model, tok, seed=seed, eos_ids=(text["eos_token_id"],))
    norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    image_processor = LlavaOnevisionImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                   image_grid_pinpoints=GRID_PINPOINTS, **norm)
    video = video_processor_kwargs("LlavaOnevisionVideoProcessor", size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                   **norm)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                        num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
                                        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE, **video)
    return _common.save(model, processor, folder)
