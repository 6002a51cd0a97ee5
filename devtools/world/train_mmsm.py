"""The world MMSM: MMIG stage 1 (MMSM alone, L_SDM + L_MMSM) on the world SDXL and the world VLM.

    python -m devtools.world.train_mmsm [--steps N] [--batch B] [--seed S]   # writes weights/mmsm/

It runs the pack's own `mmig` recipe (training/recipes/mmig.py, stage 1) on the training engine, unchanged: the
world VLM (devtools/world/weights/vlm) reads each training scene with "Describe the image." teacher-forced on
its caption, its last hidden states over the caption are e_0, the world SDXL's CLIP (the tiny SDXL text encoders
the checkpoint ships, with the host's real CLIP tokenizer) encodes the caption, and MMSM is fused at the UNet's
mid block, with the size conditioning the world UNet was trained with and the host gives it (768 px, the host's
plain CLIP Text Encode default). The checkpoint is v-prediction (its `v_pred` key), so L_SDM is the velocity error, as the host
samples it. The data is world scenes 0..N-1 (`--scenes`, evaluation seeds 1_000_000 + i are never trained on),
written once as PNG + caption JSON lines under .cache/world/mmsm-data.

The shipped file is `weights/mmsm/mmsm.safetensors` (what MMIG MMSM Loader reads), with MANIFEST.json
(command, seed, steps, losses, sha256). Deviation from the paper: MMIG trains a 512-wide MMSM on SDXL +
Idefics2-8b for 10k steps at batch 64; this one is 64 wide, on 128 px world scenes, for a few hundred steps.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from devtools.paths import CACHE_DIR
from devtools.world import SIZE, caption, render, sample_scene
from devtools.world.train_diffrir import _git_commit, _sha256  # the world trainers' manifest helpers
from devtools.world.train_sdxl import HOST_ADM_SIZE, tokenizer_folder, world_checkpoint

log = logging.getLogger(__name__)
WORLD_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = WORLD_DIR / "weights" / "mmsm"
WEIGHTS_NAME = "mmsm.safetensors"
VLM_DIR = WORLD_DIR / "weights" / "vlm"
DATA_DIR = CACHE_DIR / "world" / "mmsm-data"
TRAIN_SEEDS = 100_000
MMSM_SIZES = {"mmsm_width": 64, "mmsm_heads": 4, "mmsm_mlp_hidden": 128}


def write_dataset(scenes: int, folder: Path = DATA_DIR) -> Path:
    """World scenes 0..scenes-1 as PNG files and a train.jsonl manifest (rewritten only when the count changes)."""
    from PIL import Image
    if not 1 <= scenes <= TRAIN_SEEDS:
        raise ValueError(f"--scenes must be 1..{TRAIN_SEEDS}, got {scenes}")
    manifest = folder / f"train_{scenes}.jsonl"
    if manifest.is_file():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for seed in range(scenes):
        scene = sample_scene(seed)
        image, _masks = render(scene)
        name = f"scene_{seed:06d}.png"
        if not (folder / name).is_file():
            Image.fromarray(image).save(folder / name)
        lines.append(json.dumps({"image": name, "caption": caption(scene)}))
    partial = manifest.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scenes", type=int, default=8192, help="training scenes 0..N-1")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(CACHE_DIR / "world" / "mmsm-run"))
    parser.add_argument("--out", default=str(WEIGHTS_DIR))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from mmig_core.mmsm import load_mmsm, save_mmsm
    from training import engine
    from training.recipe import TrainConfig
    from training.recipes import mmig

    data = write_dataset(args.scenes)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)  # a fresh run, never a stale resume
    recipe = mmig.RecipeConfig(stage=1, sdxl=str(world_checkpoint()), vlm=str(VLM_DIR), data=str(data),
                               resolution=SIZE, text_conditioning="clip", clip_tokenizer=str(tokenizer_folder()),
                               lr_mmsm=args.lr, size_conditioning=HOST_ADM_SIZE, **MMSM_SIZES)
    start = time.time()
    result = engine.run(mmig, recipe, TrainConfig(out_dir=str(work), steps=args.steps, batch_size=args.batch,
                                                  seed=args.seed, device="cpu", checkpoint_every=10 ** 9,
                                                  log_every=25))
    seconds = time.time() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not result.completed:
        log.error("training stopped at step %d of %d: nothing shipped", result.step, args.steps)
        return 1
    trained = next(p for p in result.exports if p.name == WEIGHTS_NAME)
    shipped = save_mmsm(load_mmsm(trained), out / WEIGHTS_NAME)  # atomic; the loader's own check runs on it
    manifest = {
        "command": f"python -m devtools.world.train_mmsm --steps {args.steps} --batch {args.batch} "
                   f"--scenes {args.scenes} --lr {args.lr} --seed {args.seed} --threads {args.threads}",
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "train_seconds": round(seconds, 1),
        "final_loss": result.final_loss, "recipe": "mmig stage 1 (L_SDM + L_MMSM), text_conditioning clip",
        "data": f"world scenes 0..{args.scenes - 1}", "mmsm": MMSM_SIZES, "trainer_git_commit": _git_commit(),
        "files": {shipped.name: _sha256(shipped)},
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s (%.1f s of training)", shipped, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
