"""A tiny random-weight BLIP-2 (OPT) saved like a real one, for tests and demos.

`build_tiny_blip2(folder)` writes config.json, model.safetensors, the processor and a small byte-level
BPE tokenizer (trained offline on the corpus below) with `save_pretrained`, so `mmig_core.blip2.load_blip2`
reads it through exactly the code path it uses for Salesforce/blip2-opt-2.7b. The interface follows the
real model (OPT tokenizer conventions, `<image>` placeholder expanded into `num_query_tokens` tokens,
CLIP normalisation); only the widths inside are tiny.

    python -m devtools.tiny_blip2 OUT_DIR
"""
from __future__ import annotations

import os
from pathlib import Path

from devtools.tiny_builder_cli import run_builder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 4
HIDDEN = 32
BPE_VOCAB = 600  # target size of the trained BPE (the corpus may yield fewer merges; the real size is checked)
# OPT's special tokens and ids: <s>=0 <pad>=1 </s>=2 <unk>=3; </s> is both BOS and EOS.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"

CORPUS = """\
a photo of a cat sitting on a wooden table
a dog running across a green field in the sun
a red car parked on the side of a city street
a bowl of fruit with apples, oranges and bananas
a man riding a bicycle down a busy road
a woman holding an umbrella in the rain
two children playing with a ball in the park
a close up of a yellow flower with green leaves
a mountain landscape with snow on the peaks
a boat floating on a calm blue lake at sunset
a plate of pasta with tomato sauce and basil
a group of people standing in front of a building
a black and white photo of an old train station
a small bird perched on a tree branch
a kitchen with white cabinets and a large window
a living room with a gray sofa and a lamp
a painting of a house next to a river
a cup of coffee on a desk next to a laptop
a horse grazing in a field near a fence
a beach with palm trees and clear water
a bedroom with a large bed and two pillows
a pizza with cheese and pepperoni on a board
a city skyline at night with bright lights
a young girl smiling at the camera
an airplane flying through a cloudy sky
a teddy bear sitting on a chair
a stop sign at the corner of a street
a giraffe standing next to a tall tree
a bathroom with a sink, a mirror and a toilet
a train traveling on tracks through the countryside
a person skiing down a snowy slope
a surfer riding a wave in the ocean
a clock tower in the middle of a town square
a vase of roses on a wooden shelf
an elephant walking along a dirt road
a laptop and a phone on a white table
a bus driving down a road in the city
a sandwich cut in half on a plate
a cat sleeping on a blue blanket
a sheep standing in a field of grass
a close up of a slice of chocolate cake
a zebra standing in the tall grass
a bench in a park covered with autumn leaves
a tennis player hitting a ball on a court
a bunch of bananas hanging from a tree
a motorcycle parked in front of a shop
a dog lying on the floor next to a door
a snowy street with cars and street lights
"""


def build_tokenizer():
    """A byte-level BPE trained on CORPUS, wrapped as OPT's tokenizer class (GPT-2 family) plus `<image>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, GPT2TokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    bos = raw.token_to_id("</s>")
    # OPT prepends </s> to every text; a post-processor in tokenizer.json does it in every transformers version.
    raw.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                      special_tokens=[("</s>", bos)])
    size = raw.get_vocab_size()
    assert size > 256 + len(SPECIAL_TOKENS), f"BPE training produced only {size} tokens"
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]

    tok = GPT2TokenizerFast(tokenizer_object=raw, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>", add_prefix_space=False)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    tok.model_max_length = 64
    # Offline, a tokenizer can come out empty without any error: check it holds what was trained.
    assert len(tok) == size + 1, f"tokenizer has {len(tok)} tokens, expected {size + 1}"
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == size
    return tok


def build_tiny_blip2(folder: Path, seed: int = 0) -> Path:
    """Write a tiny BLIP-2 (OPT) into `folder` (created if needed) and return it. Deterministic in `seed`."""
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    vocab = len(tok)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)

    vision = Blip2VisionConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                               num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                                 num_attention_heads=2, cross_attention_frequency=1, encoder_hidden_size=HIDDEN,
                                 max_position_embeddings=64, vocab_size=vocab)
    text = OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, word_embed_proj_dim=HIDDEN, ffn_dim=2 * HIDDEN,
                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                     bos_token_id=2, eos_token_id=2, pad_token_id=1, dropout=0.0)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=NUM_QUERY_TOKENS,
                         image_token_index=image_token_id)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
        with torch.no_grad():
            for p in model.parameters():  # explicit init: do not depend on a version's init defaults
                if p.dim() > 1:
                    p.normal_(0.0, 0.5)
            # Tokens that decode to nothing readable (special, whitespace, control bytes, partial UTF-8) get
            # zero embeddings. The LM head is tied to them, so their logit is 0 and in practice never beats the
            # best random one: random captions are readable fragments and never blank. EOS keeps its weights.
            emb = model.get_input_embeddings().weight
            for i in range(vocab):
                piece = tok.decode([i], skip_special_tokens=True)
                if i != text.eos_token_id and not (piece.strip() and piece.isprintable() and "\ufffd" not in piece):
                    emb[i].zero_()

    image_processor = BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_resize=True, do_rescale=True, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    try:  # transformers >= 4.45 expands <image> into num_query_tokens placeholders in the processor
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=NUM_QUERY_TOKENS)
    except TypeError:  # older versions prepend the query embeddings inside the model
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tok)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    run_builder(build_tiny_blip2, "tiny BLIP-2", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
