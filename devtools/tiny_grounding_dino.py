"""A tiny random-weight GroundingDINO saved like a real one, for the dataset bootstrapper's tests.

`build_tiny_grounding_dino(folder)` writes config.json, model.safetensors, the image processor and a small
WordPiece BERT tokenizer (built offline from the word list below) with `save_pretrained`, so
`training.data.detector.GroundingDinoDetector` reads it through exactly the code path it uses for
IDEA-Research/grounding-dino-tiny. The interface follows the real model (BERT uncased tokenizer, "." as the
phrase separator, Swin backbone, 4 feature levels, sigmoid token logits); only the widths inside are tiny.

    python -m devtools.tiny_grounding_dino OUT_DIR
"""
from __future__ import annotations

import os
from pathlib import Path

from devtools.tiny_builder_cli import run_builder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGE_SIZE = 128  # shortest edge the processor resizes to (at 64 the 4th feature level is 1x1: GroupNorm fails)
MAX_TEXT_LEN = 32
D_MODEL = 32  # GroupNorm(32, d_model) in the input projections needs a multiple of 32
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PUNCTUATION = [".", ",", "!", "?", "'", "-"]
WORDS = """a an the and of in on with his her their to at near next by two three
person people man men woman women boy girl child children kid baby head face player lady
dog dogs cat cats horse bird cow sheep bear teddy elephant zebra giraffe
car bus truck bicycle motorcycle train boat airplane chair table bed sofa couch lamp
cup bowl plate pizza cake apple banana sandwich laptop phone clock vase book umbrella ball
tree flower grass field street road beach sky water house building window door""".split()
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")


def vocabulary() -> list[str]:
    """WordPiece vocabulary: specials, punctuation, whole words, then single letters and their ## forms, so
    every lowercase word tokenizes (unknown words split into letters instead of becoming [UNK])."""
    letters = [c for c in LETTERS if c not in WORDS]  # "a" is already a word
    vocab = SPECIAL_TOKENS + PUNCTUATION + WORDS + letters + ["##" + c for c in LETTERS]
    assert len(set(vocab)) == len(vocab), "duplicate vocabulary entries"
    return vocab


def build_tokenizer(folder: Path):
    from transformers import BertTokenizer, BertTokenizerFast

    from mmig_core.hf_compat import at_least

    vocab = vocabulary()
    if at_least("5"):  # one tokenizers-backed BertTokenizer, built from the vocabulary itself
        tok = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    else:  # 4.x reads a vocab.txt; save_pretrained writes it into the folder again
        folder.mkdir(parents=True, exist_ok=True)
        vocab_file = folder / "vocab.txt"
        vocab_file.write_text("".join(token + "\n" for token in vocab), encoding="utf-8")
        tok = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    tok.model_max_length = MAX_TEXT_LEN
    # Offline, a tokenizer can come out empty without any error: check it holds the vocabulary.
    assert len(tok) == len(vocab), f"tokenizer has {len(tok)} tokens, expected {len(vocab)}"
    assert tok.convert_tokens_to_ids("[PAD]") == 0 and tok.convert_tokens_to_ids("dog") == vocab.index("dog")
    assert tok.tokenize("a zebra .") == ["a", "zebra", "."]
    return tok


def build_tiny_grounding_dino(folder: Path, seed: int = 0) -> Path:
    """Write a tiny GroundingDINO into `folder` (created if needed) and return it. Deterministic in `seed`."""
    import torch
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    backbone = SwinConfig(image_size=IMAGE_SIZE, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 1, 1], window_size=4, out_features=["stage2", "stage3", "stage4"])
    text = BertConfig(vocab_size=len(tok), hidden_size=D_MODEL, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=2 * D_MODEL, max_position_embeddings=MAX_TEXT_LEN, pad_token_id=0)
    config = GroundingDinoConfig(
        backbone_config=backbone.to_dict(), text_config=text.to_dict(), num_queries=20, d_model=D_MODEL,
        encoder_layers=1, decoder_layers=2,  # 2: one decoder layer breaks the bbox-head tying
        encoder_ffn_dim=2 * D_MODEL, decoder_ffn_dim=2 * D_MODEL,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_n_points=2, decoder_n_points=2,
        num_feature_levels=4, max_text_len=MAX_TEXT_LEN, dropout=0.0, fusion_droppath=0.0)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": IMAGE_SIZE, "longest_edge": 2 * IMAGE_SIZE})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    run_builder(build_tiny_grounding_dino, "tiny GroundingDINO", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
