"""Tiny Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3's layout): a SigLIP tower whose patches a pixel shuffle merges
(scale factor 2) into a Llama 3 decoder; images split into tiles plus a global view, each tile's tokens between
<fake_token_around_image> and a <row_i_col_j> tag. Its chat template starts with the BOS text that the tokenizer
also adds: the pack must not send it twice."""
from __future__ import annotations

from pathlib import Path

from . import _common
from .gemma3 import no_token_type_ids

FAMILY = "idefics3"
MODEL_TYPE = "idefics3"
IMAGE_SIZE, PATCH, SCALE = 32, 8, 2   # real: 364, 14, 2 (169 tokens per tile)
TEXT_HIDDEN = 64
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]
FACTS = {"hub_id": "HuggingFaceM4/Idefics3-8B-Llama3", "image_token": "<image>", "bos": "<|begin_of_text|>",
         "placeholder": "<image>", "native_size": 364, "patch_size": 14, "tokens_per_tile": 169,
         "template_starts_with_bos": True}

# The released chat template (BOS text first), as data.
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type']"
    " == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def vision(image_size=IMAGE_SIZE, patch=PATCH) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=image_size, patch_size=patch)


def text(tok, bos, eos, pad) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(model_type="llama", vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                bos_token_id=ids(bos), eos_token_id=ids(eos), pad_token_id=ids(pad))


def image_processor_kwargs(image_size=IMAGE_SIZE) -> dict:
    # real: longest_edge 4 * 364 (up to 4x4 tiles); tiny: up to 2x2 tiles of 32 px
    return dict(do_resize=True, size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size},
                do_image_splitting=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def build(folder: Path, seed: int = 0) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor
    tok = _common.train_tokenizer(base_special=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                                  added_special=IMAGE_TOKENS, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                                  pad="<|eot_id|>", prepend_bos=True)
    no_token_type_ids(tok)
    config = Idefics3Config(vision_config=vision(), text_config=text(tok, "<|begin_of_text|>", "<|end_of_text|>",
                                                                     "<|eot_id|>"),
                            scale_factor=SCALE, image_token_id=tok.convert_tokens_to_ids("<image>"),
                            tie_word_embeddings=False)
    model = Idefics3ForConditionalGeneration(config).eval()
    _common.random_init(model, tok, seed=seed, eos_ids=(1, tok.convert_tokens_to_ids("<end_of_utterance>")))
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(**image_processor_kwargs()), tokenizer=tok,
                                  image_seq_len=(IMAGE_SIZE // PATCH // SCALE) ** 2, chat_template=CHAT_TEMPLATE)
    return _common.save(model, processor, folder)
