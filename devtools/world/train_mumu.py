"""The world MUMU bundle: the pack's `mumu` recipe on the world SDXL and the world VLM, so that an object's image in
the prompt tells the generated object's colour (and shape) when the text does not.

    python -m devtools.world.train_mumu [--steps N] [--batch B] [--seed S]   # writes weights/mumu/

It runs training/recipes/mumu.py (stage 1) on the training engine, unchanged: the VLM (perceiver dropped, as
MUMU) reads the interleaved prompt, its hidden states go through a new MUMU adapter to the SDXL context, and the
UNet (rank-4 LoRA) denoises the scene; the VLM's connector and language model train rank-4 LoRAs. The data is
world scenes 0..N-1 as MUMU records (`write_records`): each object's crop (its box, 4 px margin) goes before
its shape word, and the caption drops the object's colour 40 % of the time and its colour and shape 20 % of the
time ("a <crop> circle", "a <crop>"), drawn per scene from its seed: the crop is then the only place the
colour is told. Control images and augmentation are off (grayscale augmentation would erase the colour the
crops exist to give). The size conditioning is 768 px, what the world UNet was trained with; MMIG MUMU Encode
is given 768 x 768 at inference.

Deviation from MUMU: MUMU trains a 16-layer, 1024-wide adapter on SDXL + Idefics2-8b on millions of captioned
photos with detected crops; this one is 2 layers, 64 wide, on 128 px world scenes for a few hundred steps, and
its captions drop attributes on purpose (MUMU's keep every word and insert the crop before it).
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path

import torch

from devtools.paths import CACHE_DIR
from devtools.world import SIZE, WorldObject, _article, render, sample_scene
from devtools.world.train_diffrir import _git_commit, _sha256  # the world trainers' manifest helpers
from devtools.world.train_sdxl import HOST_ADM_SIZE, world_checkpoint

log = logging.getLogger(__name__)
WORLD_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = WORLD_DIR / "weights" / "mumu"
BUNDLE_NAME = "world-mumu"
VLM_DIR = WORLD_DIR / "weights" / "vlm"
DATA_DIR = CACHE_DIR / "world" / "mumu-records"
TRAIN_SEEDS = 100_000
CROP_MARGIN = 4
IMAGE_TOKENS = 16  # 4 x 4 patches of the world VLM's 8 px: crops are read at 32 px
DROP_COLOUR, DROP_BOTH = 0.4, 0.2  # per object: the caption leaves out its colour / its colour and shape
SIZES = {"adapter_width": 64, "adapter_layers": 2, "adapter_heads": 4, "vlm_lora_rank": 4, "vlm_lora_alpha": 4.0,
         "unet_lora_rank": 4, "unet_lora_alpha": 4.0}


def crop_box(obj: WorldObject, margin: int = CROP_MARGIN) -> list[int]:
    """[x0, y0, x1, y1] around an object, clipped to the image."""
    half = obj.size / 2 + margin
    return [max(0, int(obj.cx - half)), max(0, int(obj.cy - half)),
            min(SIZE, int(obj.cx + half + 1)), min(SIZE, int(obj.cy + half + 1))]


def phrase(obj: WorldObject, words: str) -> tuple[str, int]:
    """The object's words ("full", "shape" or "none") and where its crop goes (before the shape word, or at
    the phrase's end when no shape is said)."""
    if words == "full":
        text = f"{_article(obj.colour)} {obj.colour} {obj.shape}"
        return text, len(text) - len(obj.shape)
    if words == "shape":
        text = f"{_article(obj.shape)} {obj.shape}"
        return text, len(text) - len(obj.shape)
    return "a", 2  # "a <crop>": the crop alone tells both


def record_caption(scene, rng: random.Random) -> tuple[str, list[dict]]:
    """A caption with some attributes left out, and each object's crop box at its char_index."""
    pieces, crops, cursor = [], [], 0
    for i, obj in enumerate(scene.objects):
        draw = rng.random()
        words = "none" if draw < DROP_BOTH else "shape" if draw < DROP_BOTH + DROP_COLOUR else "full"
        joiner = "" if i == 0 else (" and " if i == len(scene.objects) - 1 else ", ")
        text, at = phrase(obj, words)
        crops.append({"box": crop_box(obj), "char_index": cursor + len(joiner) + at, "label": "object"})
        pieces.append(joiner + text)
        cursor += len(joiner) + len(text)
    ground = (f"on a {scene.background} and {scene.background2} background" if scene.background2
              else f"on a {scene.background} background")
    return "".join(pieces) + " " + ground, crops


def write_records(scenes: int, folder: Path = DATA_DIR) -> Path:
    """World scenes 0..scenes-1 as a MUMU records folder (training/mumu_data.py); rewritten when the count changes."""
    from PIL import Image
    if not 1 <= scenes <= TRAIN_SEEDS:
        raise ValueError(f"--scenes must be 1..{TRAIN_SEEDS}, got {scenes}")
    folder = folder / f"scenes_{scenes}"
    if (folder / "records.jsonl").is_file():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for seed in range(scenes):
        scene = sample_scene(seed)
        name = f"images/scene_{seed:06d}.png"
        Image.fromarray(render(scene)[0]).save(folder / name)
        text, crops = record_caption(scene, random.Random(seed))
        lines.append(json.dumps({"image": name, "caption": text, "crops": crops}))
    partial = folder / "records.jsonl.partial"
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(folder / "records.jsonl")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scenes", type=int, default=8192, help="training scenes 0..N-1")
    parser.add_argument("--lr", type=float, default=1e-3, help="the adapter's; the LoRAs get half")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(CACHE_DIR / "world" / "mumu-run"))
    parser.add_argument("--out", default=str(WEIGHTS_DIR))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from training import engine
    from training.recipe import TrainConfig
    from training.recipes import mumu

    data = write_records(args.scenes)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)  # a fresh run, never a stale resume
    recipe = mumu.RecipeConfig(
        sdxl=str(world_checkpoint()), vlm=str(VLM_DIR), data=str(data), stage=1, image_tokens=IMAGE_TOKENS,
        resolution=SIZE, control_probability=0.0, augment_probability=0.0, lr_adapter=args.lr,
        lr_unet=args.lr / 2, lr_vlm_language=args.lr / 2, lr_vlm_connector=args.lr / 2, bundle_name=BUNDLE_NAME,
        vlm_base="world-vlm", size_conditioning=HOST_ADM_SIZE, **SIZES)
    start = time.time()
    result = engine.run(mumu, recipe, TrainConfig(out_dir=str(work), steps=args.steps, batch_size=args.batch,
                                                  seed=args.seed, device="cpu", checkpoint_every=10 ** 9,
                                                  log_every=25))
    seconds = time.time() - start
    if not result.completed:
        log.error("training stopped at step %d of %d: nothing shipped", result.step, args.steps)
        return 1
    trained = result.out_dir / "export" / BUNDLE_NAME
    out = Path(args.out) / BUNDLE_NAME
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(trained, partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)
    manifest = {
        "command": f"python -m devtools.world.train_mumu --steps {args.steps} --batch {args.batch} "
                   f"--scenes {args.scenes} --lr {args.lr} --seed {args.seed} --threads {args.threads}",
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "train_seconds": round(seconds, 1),
        "final_loss": result.final_loss, "recipe": "mumu stage 1, control images and augmentation off",
        "data": f"world scenes 0..{args.scenes - 1}, captions dropping colour {DROP_COLOUR:.0%} and colour+shape "
                f"{DROP_BOTH:.0%} of objects", "sizes": SIZES, "image_tokens": IMAGE_TOKENS,
        "size_conditioning": HOST_ADM_SIZE, "trainer_git_commit": _git_commit(),
        "files": {f"{BUNDLE_NAME}/{p.name}": _sha256(p) for p in sorted(out.iterdir())},
    }
    (Path(args.out) / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s (%.1f s of training)", out, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
