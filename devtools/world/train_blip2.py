"""Train a small BLIP-2 (OPT) to caption the scene world; saved with save_pretrained for MMIG BLIP-2 Loader.

    python -m devtools.world.train_blip2 [--steps N] [--seed S] [--out devtools/world/weights/blip2]

The architecture is the tiny BLIP-2 of devtools/tiny_blip2.py (vision tower, Q-Former, OPT, `<image>` expanded into
the query tokens by the processor), widened within the 6 MB budget: 96 px input in 8 px patches (a 28 px object
is 21 px there), 64-wide layers (two per tower), 8 query tokens. The tokenizer is the same byte-level BPE recipe,
trained on the tiny corpus plus world captions, so every world word ("purple", "triangle", "background") is one
token.

Training: all of the model (vision, Q-Former, OPT) on world scenes of seeds 0..99_999 -> their captions, next-token
cross-entropy on the caption and its end-of-sequence token. This is the loss of `mmig_core.blip2_loss` (MMIG's
L_BLIP2) plus the EOS term, which the pack's loss leaves out (it scores a given caption; a captioner must also
learn where to stop), with one deviation: the shape words' terms weigh 5x (L_BLIP2 weighs every token alike; see
below). Pixel values come from the saved processor itself, so training sees what
`mmig_core.blip2.caption_images` (the node's function) feeds the model. Deterministic: one thread, seeded.

The committed model: `--steps 6000 --image-size 96 --shape-weight 5 --decoded 0.25` (a quarter of each batch
from `decoded_pool`, scenes as the world SDXL's VAE decodes them; the shape words' loss weighted 5x:
`word_token_weights`; ~28 min on one core beside a second run). Caption exact-match on 200 evaluation scenes
(greedy): 0.91, with the objects' shapes right 96 % of the time, and 0.69 on 100 of them round-tripped through the
world VAE. How it got there (exact match; 100 scenes up to 0.36, 200 after): 48 px, 1500 steps on clean renders
0.14; 6000 steps 0.28; with the decoded quarter 0.36 (one object 0.73, two 0.33, three 0.18); 96 px input 0.39 --
count, colours and backgrounds were 99-100 % right in all of these, the shapes 58-62 % -- and then the shape
weight 0.91. 64 px input instead of 48 px was no better (0.13 at 1500 steps).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

from devtools.paths import REPO_ROOT  # noqa: E402
from devtools.world import BACKGROUNDS, COLOURS, SHAPES, caption, render, sample_scene  # noqa: E402

OUT = REPO_ROOT / "devtools" / "world" / "weights" / "blip2"
TRAIN_SEEDS = 100_000  # world training scenes: seeds 0..99_999 (evaluation: 1_000_000 + i)
IMAGE_SIZE = 96
PATCH = 8
WIDTH = 64
QUERIES = 8
BPE_VOCAB = 700
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3; </s> is BOS and EOS
IMAGE_TOKEN = "<image>"
DEFAULT_STEPS = 6000
BATCH = 32
LR = 2e-3
DECODED_POOL = 3000
SHAPE_WEIGHT = 5.0
DECODED_NOISE = 0.3  # latent units (the world latents span about +-1.25)


def world_corpus(n: int = 3000) -> list[str]:
    """Captions of training scenes plus every world word, for the tokenizer (and the VLM's: train_vlm)."""
    words = " ".join(list(COLOURS) + list(SHAPES) + list(BACKGROUNDS))
    return [caption(sample_scene(s)) for s in range(n)] + [words, "an orange", "an a on and background"]


def build_tokenizer(extra_lines: list[str] | None = None):
    """OPT-style byte-level BPE (as devtools/tiny_blip2.build_tokenizer) trained on its corpus + the world's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AddedToken, GPT2TokenizerFast

    from devtools.tiny_blip2 import CORPUS

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(CORPUS.splitlines() + world_corpus() + list(extra_lines or []), trainer=trainer)
    bos = raw.token_to_id("</s>")
    raw.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                      special_tokens=[("</s>", bos)])
    size = raw.get_vocab_size()
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    tok = GPT2TokenizerFast(tokenizer_object=raw, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>", add_prefix_space=False)
    tok.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    tok.model_max_length = 64
    assert len(tok) == size + 1 and tok.convert_tokens_to_ids(IMAGE_TOKEN) == size
    for word in list(COLOURS) + list(SHAPES) + list(BACKGROUNDS):  # every world word one token after a space
        assert len(tok.tokenize(" " + word)) == 1, (word, tok.tokenize(" " + word))
    return tok


def build_model(seed: int, image_size: int = IMAGE_SIZE, width: int = WIDTH):
    """(model, processor): the untrained world BLIP-2, initialised by transformers' own init under `seed`."""
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    tok = build_tokenizer()
    vocab = len(tok)
    vision = Blip2VisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                               num_attention_heads=4, image_size=image_size, patch_size=PATCH)
    qformer = Blip2QFormerConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                 num_attention_heads=4, cross_attention_frequency=1, encoder_hidden_size=width,
                                 max_position_embeddings=64, vocab_size=vocab)
    text = OPTConfig(vocab_size=vocab, hidden_size=width, word_embed_proj_dim=width, ffn_dim=2 * width,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                     bos_token_id=2, eos_token_id=2, pad_token_id=1, dropout=0.0)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=text.to_dict(), num_query_tokens=QUERIES,
                         image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size}, do_resize=True, do_rescale=True, do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=QUERIES)
    return model, processor


def pixel_batch(processor, images: list[np.ndarray]):
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def encode_captions(processor, captions: list[str]):
    """input_ids [B, L] = query tokens, </s>, caption, </s>, padded; labels = the caption and its </s>, else -100."""
    import torch

    prefix = processor(images=[np.zeros((8, 8, 3), np.uint8)], text=[""], return_tensors="pt")["input_ids"][0].tolist()
    tok = processor.tokenizer
    rows = [prefix + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in captions]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        labels[i, len(prefix):len(row)] = torch.tensor(row[len(prefix):])
        mask[i, :len(row)] = 1
    return ids, labels, mask


def lm_loss(logits, labels, token_weights=None):
    """Next-token cross-entropy over the labelled tokens; `token_weights` [vocab] (optional) weights each target
    token's term (a weighted mean), e.g. the shape words up (see `word_token_weights`)."""
    import torch.nn.functional as F
    logits = logits[:, -labels.shape[1]:]  # older versions prepend the query outputs to the logits
    targets = labels[:, 1:].reshape(-1)
    terms = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets, ignore_index=-100,
                            reduction="none")
    kept = targets != -100
    if token_weights is None:
        return terms[kept].mean()
    weights = token_weights[targets[kept]]
    return (terms[kept] * weights).sum() / weights.sum()


def word_token_weights(tokenizer, words, weight: float):
    """[vocab] loss weights: `weight` on each of `words` (as a token after a space: every world word is one), 1
    elsewhere. A caption is ~20 tokens of which the shapes are 1-3, and the colours, count and background are
    learnt first (BLIP-2 at 96 px after 6000 steps: all 99-100 % right on evaluation scenes, the shapes 62 %);
    weighting the shape words 5x spent the same steps on them (shapes 96 %, exact captions 0.39 -> 0.91)."""
    import torch
    weights = torch.ones(len(tokenizer))
    for word in words:
        (token,) = tokenizer.tokenize(" " + word)
        weights[tokenizer.convert_tokens_to_ids(token)] = weight
    return weights


def lr_at(step: int, steps: int, peak: float) -> float:
    import math
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - informative only
        return "unknown"


def write_manifest(folder: Path, **fields) -> dict:
    files = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "MANIFEST.json"}
    manifest = {**fields, "git_commit_of_trainer": git_commit(), "sha256": files}
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def save_fp16(model, processor, folder: Path) -> None:
    """save_pretrained in fp16 (the loader casts to the dtype it is asked for); processor files beside it."""
    import copy

    import torch
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.safetensors"):
        old.unlink()
    copy.deepcopy(model).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def decoded_pool(n: int, seed: int, noise: float = DECODED_NOISE,
                 cache: bool = False) -> tuple[list[np.ndarray], list]:
    """`n` training scenes as the world SDXL draws them at best: rendered, encoded to its cell-mean latents, a
    Gaussian error of std U(0, noise) added (the UNet's residual error), and decoded by the committed world VAE
    decoder (devtools/world/weights/sdxl). A captioner trained on clean renders only misreads these soft-edged
    images (it called the demo's blue blob and red square "a blue triangle, a red triangle and a purple
    triangle"), and MMIG BLIP-2 Caption reads the sampler's output, not a render. Decoding costs ~0.13 s an image
    on one core, so a fixed pool is decoded once and sampled from, not a fresh set per step (`cache`: and kept in
    .cache/world/ for the next run, keyed by the committed SDXL file's sha256)."""
    import torch

    from devtools import tiny_sdxl
    from devtools.paths import CACHE_DIR
    from devtools.world import train_sdxl

    rng = np.random.default_rng(seed + 7)
    scenes = [sample_scene(int(s)) for s in rng.integers(0, TRAIN_SEEDS, n)]
    cached = CACHE_DIR / "world" / f"decoded_pool_n{n}_seed{seed}_noise{noise:g}_{_sdxl_sha256()[:12]}.npy"
    if cache and cached.is_file():  # the same scenes, noise and decoder give the same pool
        return list(np.load(cached)), scenes
    vae = train_sdxl.build_taesd(0)
    state = train_sdxl._read(train_sdxl.WEIGHTS_FILE)
    prefix = tiny_sdxl.VAE_PREFIX
    vae.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)})
    gen = torch.Generator().manual_seed(seed + 7)
    images = []
    for i in range(0, n, 32):
        chunk = scenes[i:i + 32]
        x = train_sdxl.images_to_tensor([render(s)[0] for s in chunk])
        with torch.no_grad():
            z = train_sdxl.encode_closed_form(x)
            sigma = torch.rand(len(chunk), 1, 1, 1, generator=gen) * noise
            y = vae.taesd_decoder(z + sigma * torch.randn(z.shape, generator=gen)).clamp(0, 1)
        images += list((y.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8))
    if cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}.partial.npy")
        np.save(partial, np.stack(images))
        partial.replace(cached)
    return images, scenes


def train(steps: int = DEFAULT_STEPS, seed: int = 0, out: Path = OUT, log_every: int = 100,
          image_size: int = IMAGE_SIZE, decoded: float = 0.0, pool: int = DECODED_POOL, width: int = WIDTH,
          shape_weight: float = SHAPE_WEIGHT) -> dict:
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    model, processor = build_model(seed, image_size, width)
    model.train()
    rng = np.random.default_rng(seed)
    n_decoded = int(round(decoded * BATCH))
    pool_images, pool_scenes = decoded_pool(pool, seed, cache=True) if n_decoded else ([], [])
    if n_decoded:
        print(f"decoded pool of {pool} in {time.perf_counter() - start:.0f} s", flush=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
    token_weights = word_token_weights(processor.tokenizer, SHAPES, shape_weight) if shape_weight != 1.0 else None
    losses = []
    for step in range(steps):
        seeds = rng.integers(0, TRAIN_SEEDS, BATCH - n_decoded)
        scenes = [sample_scene(int(s)) for s in seeds]
        images = [render(s)[0] for s in scenes]
        for j in rng.integers(0, len(pool_images), n_decoded) if n_decoded else ():
            images.append(pool_images[j])
            scenes.append(pool_scenes[j])
        pixels = pixel_batch(processor, images)
        ids, labels, mask = encode_captions(processor, [caption(s) for s in scenes])
        for group in optimiser.param_groups:
            group["lr"] = lr_at(step, steps, LR)
        logits = model(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
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
    save_fp16(model, processor, Path(out))
    final = float(np.mean(losses[-min(100, len(losses)):]))
    return write_manifest(Path(out), command=f"python -m devtools.world.train_blip2 --steps {steps} --seed {seed}"
                          + (f" --image-size {image_size}" if image_size != IMAGE_SIZE else "")
                          + (f" --width {width}" if width != WIDTH else "")
                          + f" --shape-weight {shape_weight:g}"
                          + (f" --decoded {decoded:g} --pool {pool}" if n_decoded else " --decoded 0"),
                          decoded_images_per_batch=n_decoded,
                          decoded_by=(f"devtools/world/weights/sdxl/world_sdxl.safetensors sha256 "
                                      f"{_sdxl_sha256()}" if n_decoded else None),
                          seed=seed, steps=steps, batch=BATCH, lr=LR, train_seconds=round(seconds, 1),
                          train_loss=round(final, 5), train_seeds=f"0..{TRAIN_SEEDS - 1}")


def _sdxl_sha256() -> str:
    from devtools.world import train_sdxl
    return train_sdxl.sha256(train_sdxl.WEIGHTS_FILE)


def save_untrained(folder: Path, seed: int = 0) -> Path:
    """The baseline: the same architecture at its initialisation (step 0), saved as the loader reads it."""
    model, processor = build_model(seed)
    save_fp16(model.eval(), processor, Path(folder))
    return Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.world.train_blip2", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="the vision tower's input, px (8 px patches)")
    parser.add_argument("--width", type=int, default=WIDTH, help="every tower's hidden size")
    parser.add_argument("--shape-weight", type=float, default=SHAPE_WEIGHT,
                        help="loss weight of the shape words (1: none; see word_token_weights)")
    parser.add_argument("--decoded", type=float, default=0.25,
                        help="fraction of each batch taken from a pool of VAE-decoded scenes (see decoded_pool)")
    parser.add_argument("--pool", type=int, default=DECODED_POOL, help="decoded scenes in that pool")
    args = parser.parse_args(argv)
    manifest = train(args.steps, args.seed, args.out, image_size=args.image_size, decoded=args.decoded,
                     pool=args.pool, width=args.width, shape_weight=args.shape_weight)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
