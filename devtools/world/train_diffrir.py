"""The world DiffRIR: LLMGA's restoration network trained on the world's inpainting/outpainting seams.

    python -m devtools.world.train_diffrir [--steps N] [--seed S]          # both stages, writes the weights
    python -m training devtools.world.train_diffrir --config run.yaml ...  # one stage on the engine, as any recipe

It trains through the pack's DiffRIR recipe (training/recipes/diffrir.py) on the training engine: the same
network, teacher CPEN, stage-1 loss (restorer + teacher prior, L1) and stage-2 loss (the shipped network, its
4-step diffusion prior distilled from the frozen teacher), the same exports. What differs is the data: instead
of photos degraded by Real-ESRGAN's D_1 and D_2 with random masks, each sample is a world scene (seeds
0..99_999; evaluation seeds 1_000_000 + i are never trained on) whose masked region was redrawn with a
colour/brightness shift, a feathered edge, and blur + noise along its boundary (`devtools/world/seams.py`);
the target is the clean scene. The network is a small config (see `world_config`), so both stages fit in
about 15 minutes on one CPU thread; the shipped file is stored in fp16 (about 1.5 MB) and loads through
`mmig_core.diffrir.load_diffrir`, the function MMIG DiffRIR Loader calls.

Deviation from the paper: the paper's DiffRIR trains on real photos at 256 px with the full 26-block network
for 400k+ iterations; this one is a ~0.8 M-parameter network on 128 px scenes for a few hundred steps, and
the seams are synthetic (the world has no generator good enough to make real ones on a CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmig_core.diffrir import DiffRIR, DiffRIRConfig, load_diffrir, save_diffrir, tiny_config
from training.config import ConfigError
from training.diffrir import make_teacher, stage1_loss, stage2_loss
from training.recipe import Recipe, RunContext, TrainConfig, sample_generators, trainable_summary
from training.recipes import diffrir as diffrir_recipe

from . import SIZE, render, sample_scene
from .seams import seam_sample

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "diffrir"
WEIGHTS_NAME = "world-diffrir.safetensors"
TRAIN_SEEDS = 100_000
DEFAULT_STEPS = 600  # both stages together
STAGE1_FRACTION = 0.6


def world_config(**sizes) -> DiffRIRConfig:
    """The world DiffRIR: the pack's tiny sizes (6-channel input, 256-d prior, 4 diffusion steps) with two
    refinement blocks; `sizes` override fields."""
    return dataclasses.replace(tiny_config(), num_refinement_blocks=2, **sizes)


def weights_path() -> Path:
    return WEIGHTS_DIR / WEIGHTS_NAME


@dataclass
class RecipeConfig:
    stage: int = 1  # 1: restorer + teacher CPEN; 2: the shipped network, prior distilled from the teacher
    seeds: int = TRAIN_SEEDS  # world training scenes 0..seeds-1
    lr: float = 2e-3
    kd_weight: float = 1.0
    stage1: str = ""  # stage 2: stage 1's exported <name>-stage1.safetensors (teacher beside it)
    name: str = "world-diffrir"
    sizes: dict = field(default_factory=dict)  # DiffRIRConfig overrides of world_config (stage 1)


class WorldScenes(torch.utils.data.Dataset):
    """Item i: world scene i rendered (image uint8 HxWx3 and its object masks)."""

    def __init__(self, count: int):
        if count < 1:
            raise ConfigError(f"recipe.seeds must be at least 1, not {count}")
        if count > TRAIN_SEEDS:
            raise ConfigError(f"recipe.seeds={count}: world training seeds end at {TRAIN_SEEDS - 1} "
                              f"(1_000_000 + i are evaluation scenes)")
        self.count = count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        image, masks = render(sample_scene(int(index)))
        return {"image": image, "masks": masks}


def collate(items):
    return {"images": [item["image"] for item in items], "masks": [item["masks"] for item in items]}


class WorldSeamTraining(diffrir_recipe.DiffRIRTraining):
    """The recipe's DiffRIRTraining (which parts train per stage, the same losses) on world seam pairs."""

    def forward(self, batch, step):
        generators = sample_generators(batch)
        device = next(self.model.parameters()).device
        samples = [seam_sample(image, masks, g) for image, masks, g in zip(batch["images"], batch["masks"], generators)]
        noise = torch.stack([torch.randn(self.model.config.prior_dim, generator=g) for g in generators])
        seamed = torch.stack([s[0] for s in samples])
        gt = torch.stack([s[1] for s in samples])
        mask = torch.stack([s[2] for s in samples])[:, None]
        x = DiffRIR.make_input(seamed, gt, mask).to(device)  # Eq. 7: concat(I_gen, (1 - M)·I_ref)
        gt = gt.to(device)
        if self.stage == 1:
            loss = stage1_loss(self.model, self.teacher, x, gt)
            return loss, {"l1": float(loss.detach())}
        loss, terms = stage2_loss(self.model, self.teacher, x, gt, noise.to(device), self.kd_weight)
        return loss, {name: float(value.detach()) for name, value in terms.items()}


def build(config: RecipeConfig, ctx: RunContext) -> Recipe:
    if config.stage not in (1, 2):
        raise ConfigError(f"recipe.stage must be 1 or 2, not {config.stage}")
    dataset = WorldScenes(config.seeds)
    if config.stage == 1:
        try:
            model_config = world_config(**config.sizes)
            model_config.check()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"recipe.sizes: {e}") from None
        model = DiffRIR(model_config)
        teacher = make_teacher(model.config)
    else:
        if not config.stage1:
            raise ConfigError("recipe.stage1 is not set: stage 2 starts from stage 1's exported .safetensors")
        stage1_file = Path(config.stage1)
        if not stage1_file.is_file():
            raise FileNotFoundError(f"recipe.stage1: {stage1_file} does not exist (run stage 1 first)")
        model = load_diffrir(stage1_file)
        model.requires_grad_(True)
        teacher = diffrir_recipe.load_teacher(diffrir_recipe.teacher_path(stage1_file), model.config)
    if SIZE % model.config.multiple:
        raise ConfigError(f"world images are {SIZE} px, not a multiple of the network's {model.config.multiple}")
    module = WorldSeamTraining(model.train(), teacher, config.stage, SIZE, config.kd_weight)

    def param_groups(m):
        betas = diffrir_recipe.ADAM_BETAS
        if m.stage == 1:
            return [{"name": "restorer", "params": list(m.model.restorer.parameters()), "lr": config.lr, "betas": betas},
                    {"name": "teacher_cpen", "params": list(m.teacher.parameters()), "lr": config.lr, "betas": betas}]
        return [{"name": "diffrir", "params": list(m.model.parameters()), "lr": config.lr, "betas": betas}]

    def export(m, out_dir: Path) -> list[Path]:
        model = m.model.eval()
        if m.stage == 1:
            file = Path(out_dir) / f"{config.name}-stage1.safetensors"
            return [save_diffrir(model, file),
                    diffrir_recipe.save_teacher(m.teacher, model.config, diffrir_recipe.teacher_path(file))]
        return [save_diffrir(model, Path(out_dir) / f"{config.name}.safetensors")]

    stage_line = ("stage 1: restorer + teacher CPEN (sees the ground truth), loss L1" if config.stage == 1 else
                  f"stage 2: the shipped network from {config.stage1}, loss L1 + {config.kd_weight} x L_kd")
    return Recipe(module=module, param_groups=param_groups, dataset=dataset, export=export, collate=collate,
                  describe=[stage_line, f"world seam scenes 0..{config.seeds - 1}, {SIZE} px"]
                  + trainable_summary(module))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_fp16(source: Path, target: Path) -> Path:
    """The trained file re-saved with fp16 tensors (the loader casts to the dtype asked for)."""
    model = load_diffrir(source)
    return save_diffrir(model.to(torch.float16), target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps, both stages together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=RecipeConfig.lr)
    parser.add_argument("--work", default=str(REPO / ".cache" / "world" / "diffrir"),
                        help="run folders (checkpoints, metrics) go here")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="folder of the shipped weights and MANIFEST.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    from training import engine

    stage1_steps = max(1, round(args.steps * STAGE1_FRACTION))
    stage2_steps = max(1, args.steps - stage1_steps)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)  # a fresh run: the engine would otherwise resume nothing but keep stale exports
    common = dict(batch_size=args.batch, seed=args.seed, device="cpu", checkpoint_every=10 ** 9, log_every=25)
    module = sys.modules[__name__]
    start = time.time()
    first = engine.run(module, RecipeConfig(stage=1, lr=args.lr),
                       TrainConfig(out_dir=str(work / "stage1"), steps=stage1_steps, **common))
    stage1_file = first.exports[0]
    second = engine.run(module, RecipeConfig(stage=2, lr=args.lr / 2, stage1=str(stage1_file)),
                        TrainConfig(out_dir=str(work / "stage2"), steps=stage2_steps, **common))
    seconds = time.time() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shipped = save_fp16(second.exports[0], out / WEIGHTS_NAME)
    manifest = {
        "command": f"python -m devtools.world.train_diffrir --steps {args.steps} --seed {args.seed} "
                   f"--batch {args.batch} --lr {args.lr}",
        "seed": args.seed, "steps": {"stage1": stage1_steps, "stage2": stage2_steps}, "batch": args.batch,
        "train_seconds": round(seconds, 1), "torch_threads": 1,
        "train_loss": {"stage1_final": first.final_loss, "stage2_final": second.final_loss},
        "trainer_git_commit": _git_commit(),
        "config": load_diffrir(shipped).config.to_json(),
        "data": f"world scenes 0..{TRAIN_SEEDS - 1} with synthetic seams (devtools/world/seams.py)",
        "files": {shipped.name: _sha256(shipped)},
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s (%.1f s of training)", shipped, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
