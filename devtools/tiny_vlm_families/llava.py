"""Tiny LLaVA 1.5 (llava-hf/llava-1.5-7b-hf's layout): a CLIP ViT tower (its second-to-last layer, CLS token
dropped) and a two-layer MLP projector into a Llama decoder; "USER: <image>\\n... ASSISTANT:" turns, images first."""
from __future__ import annotations

from pathlib import Path

from . import _common

FAMILY = "llava"
MODEL_TYPE = "llava"
IMAGE_SIZE = 32   # real: 336
PATCH = 8         # real: 14 (576 tokens per image)
TEXT_HIDDEN = 64
FACTS = {"hub_id": "llava-hf/llava-1.5-7b-hf", "image_token": "<image>", "bos": "<s>", "placeholder": "<image>\n",
         "native_size": 336, "patch_size": 14, "tokens_per_image": 576}

# The released chat template (images of a turn first, then its text), as data.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def llama_tokenizer(image_tokens=("<image>",)):
    from transformers import LlamaTokenizerFast
    return _common.train_tokenizer(base_special=["<unk>", "<s>", "</s>"], added_special=list(image_tokens),
                                   bos="<s>", eos="</s>", unk="<unk>", pad="<unk>", prepend_bos=True,
                                   tokenizer_class=LlamaTokenizerFast)


def llama_text(tok) -> dict:
    return dict(model_type="llama", vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


def clip_vision(image_size=IMAGE_SIZE, patch=PATCH) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=image_size, patch_size=patch, projection_dim=32)


def clip_image_processor(size=IMAGE_SIZE, **extra):
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=[0.48145466, 0.4578275, 0.40821073],
                              image_std=[0.26862954, 0.26130258, 0.27577711], **extra)


def build(folder: Path, seed: int = 0) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    tok = llama_tokenizer()
    # image_seq_length: one image's tokens, as the real config's 576; before 4.48 the forward takes a prompt with
    # fewer image tokens than this for an unexpanded (legacy) one and fails on the tiny model's 16
    config = LlavaConfig(vision_config=clip_vision(), text_config=llama_text(tok),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         image_seq_length=(IMAGE_SIZE // PATCH) ** 2, tie_word_embeddings=False)
    model = LlavaForConditionalGeneration(config).eval()
    _common.random_init(model, tok, seed=seed, eos_ids=(2,))
    processor = LlavaProcessor(image_processor=clip_image_processor(), tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    return _common.save(model, processor, folder)
