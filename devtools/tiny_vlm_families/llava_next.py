"""Tiny LLaVA-NeXT (llava-hf/llava-v1.6-mistral-7b-hf's layout): LLaVA's CLIP tower and projector with "anyres"
tiling (a base view plus tiles on the best grid pinpoint, rows ended by a learned newline embedding) into a
Mistral decoder; "[INST] <image>\\n... [/INST]" turns."""
from __future__ import annotations

from pathlib import Path

from . import _common, llava

FAMILY = "llava_next"
MODEL_TYPE = "llava_next"
IMAGE_SIZE, PATCH = llava.IMAGE_SIZE, llava.PATCH
GRID_PINPOINTS = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
FACTS = {"hub_id": "llava-hf/llava-v1.6-mistral-7b-hf", "image_token": "<image>", "bos": "<s>",
         "placeholder": "<image>\n", "native_size": 336, "patch_size": 14,
         "grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]}

# The released Mistral-instruct template (images of a turn first), as data.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] "
    "+ '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif "
    "message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def build(folder: Path, seed: int = 0) -> Path:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor
    tok = llava.llama_tokenizer()
    text = {**llava.llama_text(tok), "model_type": "mistral", "sliding_window": None}
    # image_seq_length: the base view's tokens (as llava.py: 4.47's forward reads fewer as a legacy prompt)
    config = LlavaNextConfig(vision_config=llava.clip_vision(), text_config=text,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_grid_pinpoints=GRID_PINPOINTS,
                             image_seq_length=(IMAGE_SIZE // PATCH) ** 2, tie_word_embeddings=False)
    model = LlavaNextForConditionalGeneration(config).eval()
    _common.random_init(model, tok, seed=seed, eos_ids=(2,))
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS, image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=CHAT_TEMPLATE)
    return _common.save(model, processor, folder)
