"""Tiny InternVL 3 in the transformers layout (OpenGVLab/InternVL3-1B-hf, model type internvl; not the original
remote-code InternVL3-1B): an InternViT with fixed position embeddings, a 0.5 pixel shuffle (2x2 patches -> one
token) and an MLP projector, feeding a Qwen2 decoder with ChatML turns. The chat template writes an image as
"<IMG_CONTEXT>\\n"; the processor replaces each <IMG_CONTEXT> with "<img>" + tiles x image_seq_length x
<IMG_CONTEXT> + "</img>". It tiles: by default (`crop_to_patches`) an image becomes 1..12 tiles of the tower's size
chosen by aspect ratio, plus a thumbnail when there is more than one. Kept from the real model: the tiling, the
fixed per-tile size, the pixel shuffle, no system prompt in the -hf template, no BOS."""
from __future__ import annotations

from pathlib import Path

from . import _common
from .gemma3 import named_tokens, seeded_model

FAMILY = "internvl"
MODEL_TYPE = "internvl"
IMAGE_SIZE = 32        # real: 448 (per tile)
PATCH = 4              # real: 14 -> 32 x 32 patches, pixel-shuffled to 16 x 16 = 256 tokens
TOKENS_PER_TILE = (IMAGE_SIZE // PATCH // 2) ** 2
TEXT_HIDDEN = 32
BASE_SPECIAL = ["<|endoftext|>"]
ADDED_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                 "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
                 "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                 "<video>"]
NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}

# The -hf checkpoints' chat template (set by transformers' convert_internvl_weights_to_hf.py), kept as data.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}")

FACTS = {
    "hub_id": "OpenGVLab/InternVL3-1B-hf",
    "chat_template_source": ("huggingface/transformers src/transformers/models/internvl/"
                             "convert_internvl_weights_to_hf.py `chat_template` (written into the -hf checkpoints)"),
    "processor_class": "InternVLProcessor",
    "image_token": "<IMG_CONTEXT>",
    "placeholder": "<IMG_CONTEXT>\n",               # what the chat template writes for one image
    "expanded": "<img>{tiles x image_seq_length x <IMG_CONTEXT>}</img>\n",
    "tokens_per_tile": TOKENS_PER_TILE,            # real: 256
    "tiles": (1, 12 + 1),                          # crop_to_patches: 1..max_patches tiles, + a thumbnail if > 1
    "bos_in_template": False,                      # Qwen2 tokenizer: no BOS at all
    "native_size": IMAGE_SIZE, "real_native_size": 448, "fixed_position_embeddings": True,
    "per_token_inputs": [],
    "resolution_kwargs": {"crop_to_patches": False},  # one tile of `size` per image; or max_patches=N to tile
    "min_transformers": "4.52",
}


def tokenizer():
    from transformers import Qwen2TokenizerFast
    tok = _common.train_tokenizer(base_special=BASE_SPECIAL, added_special=ADDED_SPECIAL, bos=None,
                                  eos="<|im_end|>", pad="<|endoftext|>", tokenizer_class=Qwen2TokenizerFast)
    named_tokens(tok, NAMED_TOKENS)
    return tok


def _classes():
    _common.require_family(MODEL_TYPE)
    try:
        from transformers import (InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
                                  InternVLVideoProcessor)
    except ImportError as e:  # InternVL's transformers layout arrived in 4.52
        import transformers
        raise RuntimeError(f"the tiny InternVL needs transformers >= 4.52 (installed: {transformers.__version__})"
                           ) from e
    import transformers
    if int(transformers.__version__.split(".")[0]) >= 5:  # one (torchvision) image processor; "Fast" deprecated
        from transformers import GotOcr2ImageProcessor as image_processor_class
    else:  # the real -hf checkpoints name the fast one
        from transformers import GotOcr2ImageProcessorFast as image_processor_class
    return InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, InternVLVideoProcessor, \
        image_processor_class


def build(folder: Path, seed: int = 0) -> Path:
    config_class, model_class, processor_class, video_class, image_class = _classes()
    tok = tokenizer()
    ids = tok.convert_tokens_to_ids
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
                tie_word_embeddings=True)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[PATCH, PATCH], use_absolute_position_embeddings=True)
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids("<IMG_CONTEXT>"),
                          image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5, tie_word_embeddings=True)
    model = seeded_model(model_class, config, seed)
    _common.random_init(model, tok, seed=seed, eos_ids=(ids("<|im_end|>"),))
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = image_class(size=size, crop_to_patches=False, min_patches=1, max_patches=12,
                                  image_mean=mean, image_std=std, do_convert_rgb=True)
    video_processor = video_class(size=size, image_mean=mean, image_std=std)
    processor = processor_class(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                image_seq_length=TOKENS_PER_TILE, chat_template=CHAT_TEMPLATE)
    return _common.save(model, processor, folder)
