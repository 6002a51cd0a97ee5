"""A tiny random-weight Idefics2 saved like a real one, for tests and demos.

`build_tiny_idefics2(folder)` writes config.json, model.safetensors, the processor (image processor,
tokenizer, chat template) with `save_pretrained`, so `mmig_core.vlm.load_vlm` reads it through the code
path it uses for HuggingFaceM4/idefics2-8b. The interface follows the real model (SigLIP-style vision
tower, perceiver connector, Mistral text model, `<fake_token_around_image>` / `<image>` /
`<end_of_utterance>` tokens, the "User:...<end_of_utterance>\\nAssistant:" chat format); only the widths
inside are tiny. The tokenizer is a byte-level BPE trained offline on a small corpus.

    python -m devtools.tiny_idefics2 OUT_DIR
"""
from __future__ import annotations

import os
from pathlib import Path

from devtools.tiny_builder_cli import run_builder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGE_SIZE = 32          # the vision tower's native size (real Idefics2: 980)
PATCH_SIZE = 8           # 16 patches per 32 px image (real: 14 px patches, 1024 at 448 px)
PERCEIVER_LATENTS = 4    # tokens per image through the perceiver (real: 64)
TEXT_HIDDEN = 64
BPE_VOCAB = 600
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # Mistral's ids 0, 1, 2
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]

# Idefics2's chat format ("User:<image>text<end_of_utterance>\nAssistant: ..."), written for this builder.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}:{{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def build_tokenizer():
    """A byte-level BPE trained on the tiny BLIP-2's caption corpus, plus Idefics2's image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    from devtools.tiny_blip2 import CORPUS

    corpus = CORPUS.splitlines() + ["User: describe the image. Assistant: a detailed prompt <gen_image> </gen_image>"]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(corpus, trainer=trainer)
    bos = raw.token_to_id("<s>")
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", bos)])
    size = raw.get_vocab_size()
    assert size > 256 + len(SPECIAL_TOKENS), f"BPE training produced only {size} tokens"
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]

    # model_input_names as Mistral's tokenizer has them: 4.x's PreTrainedTokenizerFast would add token_type_ids,
    # which Idefics2's generate refuses.
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>", model_input_names=["input_ids", "attention_mask"])
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                          for t in IMAGE_TOKENS]})
    tok.model_max_length = 8192  # MUMU prompts run past 2000 tokens
    # Offline, a tokenizer can come out empty without any error: check it holds what was trained.
    assert len(tok) == size + len(IMAGE_TOKENS), f"tokenizer has {len(tok)} tokens, expected {size + 3}"
    assert tok.convert_tokens_to_ids(IMAGE_TOKENS) == [size, size + 1, size + 2]
    return tok


TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
TINY_PERCEIVER = dict(hidden_size=TEXT_HIDDEN, resampler_n_latents=PERCEIVER_LATENTS, resampler_depth=1,
                      resampler_n_heads=2, resampler_head_dim=16, num_key_value_heads=1)
TINY_TEXT = dict(hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)


def build_tiny_idefics2(folder: Path, seed: int = 0, *, vision: dict = TINY_VISION, perceiver: dict = TINY_PERCEIVER,
                        text: dict = TINY_TEXT, init_std: float = 0.2) -> Path:
    """Write a tiny Idefics2 into `folder` (created if needed) and return it. Deterministic in `seed`.

    `vision`, `perceiver` and `text` set the widths (the benchmark builds a larger one the same way).
    """
    import torch
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_idefics2 import Idefics2ImageProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = len(tok)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text = dict(model_type="mistral", vocab_size=vocab, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, sliding_window=None, **text)
    config = Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                            image_token_id=image_token_id, tie_word_embeddings=False)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics2ForConditionalGeneration(config).eval()
        with torch.no_grad():
            for p in model.parameters():  # explicit init: do not depend on a version's init defaults
                if p.dim() > 1:
                    p.normal_(0.0, init_std)
            # Tokens that decode to nothing readable (special, control bytes, partial UTF-8) get a zero row in
            # the LM head, so their logit 0 rarely beats the best random one: random responses stay readable.
            head = model.get_output_embeddings().weight
            for i in range(vocab):
                piece = tok.decode([i], skip_special_tokens=True)
                if i != text["eos_token_id"] and not (piece.strip() and piece.isprintable() and "\ufffd" not in piece):
                    head[i].zero_()

    image_size = vision["image_size"]
    image_processor = Idefics2ImageProcessor(
        do_resize=True, size={"shortest_edge": image_size // 2, "longest_edge": image_size},
        do_rescale=True, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        do_pad=True, do_image_splitting=False)
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=perceiver["resampler_n_latents"], chat_template=CHAT_TEMPLATE)
    assert len(processor.tokenizer) == vocab, "the processor added tokens the model has no embeddings for"
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    run_builder(build_tiny_idefics2, "tiny Idefics2", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
