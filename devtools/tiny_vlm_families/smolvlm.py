"""Tiny SmolVLM / SmolVLM2 (HuggingFaceTB/SmolVLM2-256M-Video-Instruct's layout; model_type smolvlm for both):
Idefics3's tiling and pixel shuffle into a SmolLM2 (Llama) decoder; the template starts with <|im_start|>, which
the tokenizer does not add itself. Its processor needs the `num2words` package."""
from __future__ import annotations

from pathlib import Path

from . import _common, idefics3

FAMILY = "smolvlm"
MODEL_TYPE = "smolvlm"
FACTS = {"hub_id": "HuggingFaceTB/SmolVLM2-256M-Video-Instruct", "image_token": "<image>", "bos": "<|im_start|>",
         "placeholder": "<image>", "native_size": 512, "patch_size": 16, "tokens_per_tile": 64,
         "template_starts_with_bos": True, "needs": "num2words",
         "min_transformers": "4.50"}

# The released chat template, as data.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build(folder: Path, seed: int = 0) -> Path:
    _common.require_family(MODEL_TYPE)
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor, SmolVLMProcessor

    from .qwen2_vl import video_processor_kwargs
    tok = _common.train_tokenizer(base_special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  added_special=idefics3.IMAGE_TOKENS, bos="<|im_start|>", eos="<end_of_utterance>",
                                  pad="<|im_end|>")
    idefics3.no_token_type_ids(tok)
    config = SmolVLMConfig(vision_config=idefics3.vision(), text_config=idefics3.text(tok, "<|im_start|>",
                                                                                      "<end_of_utterance>", "<|im_end|>"),
                           scale_factor=idefics3.SCALE, image_token_id=tok.convert_tokens_to_ids("<image>"),
                           tie_word_embeddings=False)
    model = SmolVLMForConditionalGeneration(config).eval()
    _common.random_init(model, tok, seed=seed, eos_ids=(tok.convert_tokens_to_ids("<end_of_utterance>"),))
    kwargs = idefics3.image_processor_kwargs()
    import transformers
    if not hasattr(transformers, "SmolVLMVideoProcessor"):  # before 4.52 the image processor samples videos
        kwargs["video_sampling"] = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 2 * idefics3.IMAGE_SIZE}}
    video = video_processor_kwargs("SmolVLMVideoProcessor",
                                   **{k: v for k, v in kwargs.items() if k not in ("do_image_splitting", "video_sampling")})
    processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**kwargs), tokenizer=tok,
                                 image_seq_len=(idefics3.IMAGE_SIZE // idefics3.PATCH // idefics3.SCALE) ** 2,
                                 chat_template=CHAT_TEMPLATE, **video)
    return _common.save(model, processor, folder)
