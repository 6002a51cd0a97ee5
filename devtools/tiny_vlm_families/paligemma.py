"""Tiny PaliGemma 2 (google/paligemma2-3b-mix-224's layout): a SigLIP tower with fixed position embeddings, a linear
projector, a Gemma 2 decoder. No chat template: the processor writes its own prompt, N x <image> + "<bos>" + prefix
+ "\\n", where the prefix is a task such as "caption en" (the mix checkpoints' format). The tokenizer also holds the
1024 <locNNNN> and 128 <segNNN> tokens, as the real one does. Kept from the real model: the fixed position table
(the processor must resize to exactly `image_size`), one image token per patch, token_type_ids (0 on the prefix)."""
from __future__ import annotations

from pathlib import Path

from . import _common
from .gemma3 import gemma_tokenizer, seeded_model

FAMILY = "paligemma"
MODEL_TYPE = "paligemma"
IMAGE_SIZE = 32        # real: 224 (448 and 896 for the larger variants)
PATCH = 8              # real: 14 -> 256 tokens at 224 px
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH) ** 2
TEXT_HIDDEN = 32
IMAGE_TOKEN = "<image>"
# the real tokenizer's detection and segmentation tokens (ids 256000..257151 there), plain added tokens
EXTRA_TOKENS = [f"<loc{i:0>4}>" for i in range(1024)] + [f"<seg{i:0>3}>" for i in range(128)]

FACTS = {
    "hub_id": "google/paligemma2-3b-mix-224",
    "chat_template_source": None,                  # the real checkpoint has none
    "prompt_format": IMAGE_TOKEN + "{prompt}",    # the text to give the processor for one image and a prompt
    "rendered": "{image_tokens}<bos>{prompt}\n",   # what it tokenizes: it inserts <bos> after the last <image>
    "processor_class": "PaliGemmaProcessor",
    "image_token": IMAGE_TOKEN,
    "placeholder": IMAGE_TOKEN,                    # written before the <bos>; the processor adds <bos> and "\n"
    "tokens_per_image": TOKENS_PER_IMAGE,          # real: 256 at 224 px (1024 at 448, 4096 at 896)
    "bos_in_template": True,                       # the processor writes "<bos>" text after the image tokens
    "native_size": IMAGE_SIZE, "real_native_size": 224, "fixed_position_embeddings": True,
    "per_token_inputs": ["token_type_ids"],       # 0 on the prefix (prompt), 1 on a suffix; also returns labels
    "per_token_inputs_need_suffix_before": "5.0",  # 4.x returns token_type_ids (and labels) only with a suffix
    "resolution_kwargs": {"size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}},
    "needs_images": True,                          # the processor refuses a text without images
}


def build(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (AddedToken, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessor)
    tok = gemma_tokenizer([IMAGE_TOKEN], {}, model_max_length=8192)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in EXTRA_TOKENS])
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                           image_seq_length=TOKENS_PER_IMAGE)
    image_processor.image_seq_length = TOKENS_PER_IMAGE  # versions that drop unknown kwargs
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    assert len(processor.tokenizer) == len(tok), "the processor added tokens the tokenizer lacked"
    ids = tok.convert_tokens_to_ids
    text = dict(model_type="gemma2", vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                query_pre_attn_scalar=16, max_position_embeddings=2048, sliding_window=512,
                pad_token_id=ids("<pad>"), eos_token_id=ids("<eos>"), bos_token_id=ids("<bos>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=TEXT_HIDDEN, vision_use_head=False)
    config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=ids(IMAGE_TOKEN),
                             projection_dim=TEXT_HIDDEN, hidden_size=TEXT_HIDDEN, vocab_size=len(tok))
    model = seeded_model(PaliGemmaForConditionalGeneration, config, seed)
    _common.random_init(model, tok, seed=seed, eos_ids=(ids("<eos>"),))
    with torch.no_grad():  # random responses stay words: no <locNNNN>/<segNNN> from the random head
        model.get_output_embeddings().weight[ids(EXTRA_TOKENS[0]):ids(EXTRA_TOKENS[-1]) + 1].zero_()
    return _common.save(model, processor, folder)
