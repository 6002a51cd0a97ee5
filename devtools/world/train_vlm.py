"""Train a small Idefics2 to answer the world's describe and edit instructions, LLMGA-style; for MMIG VLM Loader.

    python -m devtools.world.train_vlm [--steps N] [--seed S] [--out devtools/world/weights/vlm]

The architecture is devtools/tiny_idefics2.py's (SigLIP-style tower, perceiver connector, Mistral text model, its
chat template and image tokens), widened within the 8 MB budget: 96 px input in 8 px patches, 8 perceiver tokens
per image, a 2-layer 96-wide text model. The tokenizer is the same byte-level BPE recipe trained on the tiny corpus
plus world captions, instructions and LLMGA's tags, so world words are single tokens.

Every answer is a world caption between LLMGA's released tags: "<gen_image> a red circle on a grey background
</gen_image>" (what MMIG MLLM Describe extracts in its "llmga prompt" mode). The training prompts are built by the
pack's own prompt code (`mmig_core.vlm.chat_messages` / `edit_messages` and the processor), so the model learns
exactly the inputs the node gives it, in the pack's prompt style (no system prompt; LLMGA's long system prompt is
left out to keep sequences short on a CPU):
- describe: "<image> Describe the image." (with or without the pack's request for tags) -> the caption;
- similar image: LLMGA's first edit turn "<image>\\nGenerate a similar image" -> the caption;
- edit, as written: "<image> Make the circle blue." -> the edited scene's caption;
- edit, LLMGA's two turns (the node's task "edit"): the first turn answered with the caption, then the instruction
  without the image -> the edited scene's caption.
Edits come from devtools/world/edits.py (recolour, reshape, remove, background). Loss: next-token cross-entropy on
the answer and its <end_of_utterance>. Deterministic: one thread, seeded; scenes of seeds 0..99_999.

The committed model: `--steps 6000 --image-size 96` (~24 min on one core beside other runs). What made it see
objects: the perceiver latents (see `build_model`). The previous model (48 px, latents all ones as transformers
initialises them, 400 steps) named the objects of 0 of 50 evaluation scenes (3 % of 30 after 6000 steps); its
loss on a batch was 0.35 with the right images and 0.58 with shuffled ones, so it read the background only. With distinct
latents at 96 px, on 40 evaluation scenes: names the objects 0.30, describe exact 0.30, edit correct 0.375
(`bench/_quality_vlm.py`'s figures); its errors are the objects' shapes, as BLIP-2's were. Not kept, because the
same 40-scene figures did not move: 6000 more steps at lr 1e-3 (`--init`), and then 5000 more with the colour and
shape words weighted 5x or 10x (`--word-weight`, which took BLIP-2 from 0.39 to 0.91 exact when trained so from
the start). Worse: `--word-weight 5` from scratch (6000 steps): names 0.175, describe exact 0.05, edit correct
0.075, and the backgrounds of 1 of the first 8 scenes right (8 of 8 without the weight).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from devtools.paths import REPO_ROOT  # noqa: E402
from devtools.world import BACKGROUNDS, COLOURS, SHAPES, caption, render, sample_scene, to_tensor  # noqa: E402
from devtools.world.edits import sample_edit  # noqa: E402
from devtools.world.train_blip2 import (lm_loss, lr_at, save_fp16, word_token_weights, world_corpus,  # noqa: E402
                                        write_manifest)

OUT = REPO_ROOT / "devtools" / "world" / "weights" / "vlm"
TRAIN_SEEDS = 100_000
IMAGE_SIZE = 96
PATCH = 8
LATENTS = 8
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH)
TEXT_HIDDEN = 96
PERCEIVER = dict(hidden_size=TEXT_HIDDEN, resampler_n_latents=LATENTS, resampler_depth=1, resampler_n_heads=4,
                 resampler_head_dim=24, num_key_value_heads=2)
TEXT = dict(hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
BPE_VOCAB = 800
DESCRIBE = "Describe the image."
DEFAULT_STEPS = 6000
BATCH = 16
LR = 2e-3
# the mix of training prompts (fractions of a batch)
MIX = (("describe", 0.3), ("similar", 0.1), ("edit", 0.3), ("edit2", 0.3))
DESCRIBE_HEAVY = (("describe", 0.5), ("similar", 0.2), ("edit", 0.15), ("edit2", 0.15))  # the continuation's mix


def tagged(text: str) -> str:
    """A world caption as LLMGA writes a generation prompt."""
    return f"<gen_image> {text} </gen_image>"


def instruction_corpus(n: int = 2000) -> list[str]:
    from mmig_core.llmga_tags import EDIT_FIRST_TURN, GENERATION_REQUEST
    lines = [DESCRIBE, EDIT_FIRST_TURN, GENERATION_REQUEST, tagged(caption(sample_scene(0)))]
    for s in range(n):
        lines.append(sample_edit(sample_scene(s), s).instruction)
    return lines


def build_tokenizer():
    """Mistral-style byte-level BPE (as devtools/tiny_idefics2.build_tokenizer) on its corpus + the world's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, PreTrainedTokenizerFast

    from devtools.tiny_blip2 import CORPUS
    from devtools.tiny_idefics2 import IMAGE_TOKENS, SPECIAL_TOKENS

    corpus = CORPUS.splitlines() + world_corpus() + instruction_corpus()
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
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>", model_input_names=["input_ids", "attention_mask"])
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                          for t in IMAGE_TOKENS]})
    tok.model_max_length = 8192
    assert len(tok) == size + len(IMAGE_TOKENS)
    for word in list(COLOURS) + list(SHAPES) + list(BACKGROUNDS):
        assert len(tok.tokenize(" " + word)) == 1, (word, tok.tokenize(" " + word))
    return tok


def build_model(folder: Path, seed: int, image_size: int = IMAGE_SIZE) -> Path:
    """Save the untrained world VLM (transformers' own init under `seed`) into `folder`, as the loader reads it.

    One deviation from transformers' init: the perceiver's latents start as N(0, 1) rows, not all ones. Identical
    latents ask the same question of the image, so the 8 image tokens the text model reads are one vector 8 times
    (a vision summary: the first world VLM, trained so, learnt backgrounds, 0.92, and no objects; its latents were
    still equal rows to 2 %). Released Idefics2 checkpoints have trained, distinct latents, so this only changes
    where training starts."""
    import torch
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_idefics2 import Idefics2ImageProcessor

    from devtools.tiny_idefics2 import CHAT_TEMPLATE

    tok = build_tokenizer()
    vocab = len(tok)
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    text = dict(model_type="mistral", vocab_size=vocab, max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, pad_token_id=0, sliding_window=None, **TEXT)
    config = Idefics2Config(vision_config=dict(VISION, image_size=image_size), perceiver_config=PERCEIVER,
                            text_config=text,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config).eval()
    latents = next(p for n, p in model.named_parameters() if n.endswith("perceiver_resampler.latents"))
    with torch.no_grad():
        latents.copy_(torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)))
    # A chat turn ends with <end_of_utterance>: generation stops there (or at </s>).
    model.generation_config.eos_token_id = [eou, 2]
    model.generation_config.pad_token_id = 0
    image_processor = Idefics2ImageProcessor(
        do_resize=True, size={"shortest_edge": image_size // 2, "longest_edge": image_size},
        do_rescale=True, do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        do_pad=True, do_image_splitting=False)
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=LATENTS,
                                  chat_template=CHAT_TEMPLATE)
    save_fp16(model, processor, Path(folder))
    return Path(folder)


def example(vlm, scene, kind: str, rng) -> tuple[dict, list[int]]:
    """(processor inputs of the prompt, answer token ids) for one training example of `kind`."""
    from mmig_core import vlm as core
    from mmig_core.llmga_tags import EDIT_FIRST_TURN, GENERATION_REQUEST
    from mmig_core.mm_prompt import MMPrompt

    image = to_tensor(render(scene)[0])[0]
    sep = " " if rng.random() < 0.5 else "\n"
    if kind in ("describe", "similar"):
        answer = tagged(caption(scene))
        if kind == "describe":
            suffix = GENERATION_REQUEST if rng.random() < 0.2 else ""
            messages, images = core.chat_messages(vlm, MMPrompt((0, sep + DESCRIBE), (image,)), suffix=suffix)
        else:
            messages, images = core.edit_messages(vlm, MMPrompt((0, " x"), (image,)), EDIT_FIRST_TURN)
    else:
        edit = sample_edit(scene, int(rng.integers(1 << 30)))
        answer = tagged(caption(edit.scene))
        prompt = MMPrompt((0, sep + edit.instruction), (image,))
        if kind == "edit":
            messages, images = core.chat_messages(vlm, prompt)
        else:
            messages, images = core.edit_messages(vlm, prompt, EDIT_FIRST_TURN, first_response=tagged(caption(scene)))
    inputs = core._processor_inputs(vlm, core._render(vlm, messages), images, to_device=False)
    tok = vlm.processor.tokenizer
    answer_ids = tok(" " + answer, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(
        "<end_of_utterance>")]
    return inputs, answer_ids


def collate(examples):
    """Right-padded batch: input_ids, attention_mask, labels (answer tokens only), pixel values stacked."""
    import torch
    rows = [ex[0]["input_ids"][0].tolist() + ex[1] for ex in examples]
    length = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, (inputs, answer)) in enumerate(zip(rows, examples)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, len(row) - len(answer):len(row)] = torch.tensor(answer)
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels,
                 pixel_values=torch.cat([ex[0]["pixel_values"] for ex in examples]))
    if "pixel_attention_mask" in examples[0][0]:
        batch["pixel_attention_mask"] = torch.cat([ex[0]["pixel_attention_mask"] for ex in examples])
    return batch


def train(steps: int = DEFAULT_STEPS, seed: int = 0, out: Path = OUT, log_every: int = 50, init: Path | None = None,
          lr: float = LR, mix=MIX, image_size: int = IMAGE_SIZE, word_weight: float = 1.0) -> dict:
    """`init`: continue from a saved world VLM (its MANIFEST is kept in the new one's `init`), else from scratch."""
    import torch

    from mmig_core.vlm import load_vlm

    torch.set_num_threads(1)
    start = time.perf_counter()
    previous = None
    if init is not None:
        previous = json.loads((Path(init) / "MANIFEST.json").read_text())
        vlm = load_vlm(Path(init))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            vlm = load_vlm(build_model(Path(tmp) / "vlm", seed, image_size))
    model = vlm.model.float().train()
    rng = np.random.default_rng(seed)
    kinds = [k for k, _ in mix]
    weights = np.array([w for _, w in mix])
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    # the words that say what is in the scene (the rest of an answer is tags, articles and "background")
    token_weights = word_token_weights(vlm.processor.tokenizer, list(COLOURS) + list(SHAPES),
                                       word_weight) if word_weight != 1.0 else None
    losses = []
    for step in range(steps):
        picks = rng.choice(len(kinds), BATCH, p=weights / weights.sum())
        batch = collate([example(vlm, sample_scene(int(rng.integers(TRAIN_SEEDS))), kinds[k], rng) for k in picks])
        labels = batch.pop("labels")
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        logits = model(**batch, use_cache=False).logits
        loss = lm_loss(logits, labels, token_weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {np.mean(losses[-log_every:]):.4f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    save_fp16(model, vlm.processor, Path(out))
    final = float(np.mean(losses[-min(100, len(losses)):]))
    command = f"python -m devtools.world.train_vlm --steps {steps} --seed {seed}" + (
        f" --image-size {image_size}" if image_size != IMAGE_SIZE and init is None else "") + (
        f" --word-weight {word_weight:g}" if word_weight != 1.0 else "")
    if init is not None:
        command += f" --init {init} --lr {lr} --describe-heavy" if mix is DESCRIBE_HEAVY else f" --init {init} --lr {lr}"
    return write_manifest(Path(out), command=command, init=previous,
                          seed=seed, steps=steps, batch=BATCH, lr=lr, mix=dict(mix), train_seconds=round(seconds, 1),
                          train_loss=round(final, 5), train_seeds=f"0..{TRAIN_SEEDS - 1}")


def save_untrained(folder: Path, seed: int = 0) -> Path:
    """The baseline: the same architecture at its initialisation (step 0)."""
    return build_model(Path(folder), seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.world.train_vlm", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--init", type=Path, default=None, help="continue from this saved world VLM")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="the vision tower's input, px (8 px patches)")
    parser.add_argument("--word-weight", type=float, default=1.0,
                        help="loss weight of the colour and shape words (1: none; see train_blip2.word_token_weights)")
    parser.add_argument("--describe-heavy", action="store_true", help="half the batch describe prompts")
    args = parser.parse_args(argv)
    mix = DESCRIBE_HEAVY if args.describe_heavy else MIX
    print(json.dumps(train(args.steps, args.seed, args.out, init=args.init, lr=args.lr, mix=mix,
                           image_size=args.image_size, word_weight=args.word_weight), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
