"""Recipe `diffrir`: LLMGA's DiffRIR restoration network (§3.4), one stage per run, on the engine.

    python -m training diffrir --config diffrir.yaml recipe.stage=1 recipe.images=photos/
    python -m training diffrir --config diffrir.yaml recipe.stage=2 recipe.images=photos/ \
        recipe.stage1=runs/diffrir-s1/export/diffrir-stage1.safetensors

- Stage 1 trains the restorer and a teacher CPEN that also sees the ground truth (loss L1). It exports
  `<name>-stage1.safetensors` (a DiffRIR file whose restorer is trained) and `<name>-stage1.teacher.safetensors`.
- Stage 2 starts from stage 1's file and trains the whole shipped network, its diffusion prior distilled
  from the frozen teacher (L1 + kd_weight · L_kd). It exports `<name>.safetensors`, the file
  `MMIG DiffRIR Loader` reads from `models/diffrir/`.

The losses, crops, degradations and masks are `training/diffrir.py`'s (the same as
`python -m training.diffrir`); each sample's crop, degradation, mask and noise come from its own seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mmig_core.diffrir import DiffRIR, load_diffrir, paper_config, save_diffrir, tiny_config
from mmig_core.diffrir.network import PriorModulatedBlock
from mmig_core.diffrir.weights import CONFIG_KEY
from mmig_core.model_files import save_safetensors_atomic
from training.config import ConfigError
from training.diffrir import (fit_to_crop, image_paths, load_image, make_teacher, stage1_loss, stage2_loss,
                              training_pair)
from training.recipe import Recipe, RunContext, sample_generators, trainable_summary

TEACHER_FORMAT = "diffrir-teacher-v1"
ADAM_BETAS = (0.9, 0.99)  # DiffIR's


@dataclass
class RecipeConfig:
    images: str = ""  # folder of ground-truth images, searched recursively (.png .jpg .jpeg .webp .bmp)
    stage: int = 1  # 1: restorer + teacher CPEN; 2: the shipped network, prior distilled from the teacher
    preset: str = "paper"  # paper | tiny network sizes (stage 2 takes them from the stage-1 file)
    crop: int = 256  # training crop, a multiple of 32
    lr: float = 2e-4
    kd_weight: float = 1.0  # stage 2: weight of L1(predicted prior, teacher prior)
    stage1: str = ""  # stage 2: stage 1's exported <name>-stage1.safetensors (teacher file beside it)
    name: str = "diffrir"  # export file name (without .safetensors)


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, folder: str, crop: int):
        self.paths, self.crop = image_paths(folder), crop

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return {"image": fit_to_crop(load_image(self.paths[index]), self.crop)}


def collate(items):
    return {"images": [item["image"] for item in items]}  # sizes differ: cropped per sample in the loss


class DiffRIRTraining(torch.nn.Module):
    def __init__(self, model: DiffRIR, teacher: torch.nn.Module, stage: int, crop: int, kd_weight: float):
        super().__init__()
        self.model, self.teacher = model, teacher
        self.stage, self.crop, self.kd_weight = stage, crop, kd_weight
        if stage == 1:  # the input-only CPEN and the diffusion prior learn in stage 2
            model.requires_grad_(False)
            model.restorer.requires_grad_(True)
            teacher.requires_grad_(True)
        else:
            model.requires_grad_(True)
            teacher.requires_grad_(False).eval()

    def forward(self, batch, step):
        generators = sample_generators(batch)
        device = next(self.model.parameters()).device
        with torch.autocast("cpu", enabled=False):  # data draws stay float32, on the CPU generators
            pairs = [training_pair(image.float().cpu(), self.crop, g) for image, g in zip(batch["images"], generators)]
            noise = torch.stack([torch.randn(self.model.config.prior_dim, generator=g) for g in generators])
        x = torch.stack([p[0] for p in pairs]).to(device)
        gt = torch.stack([p[1] for p in pairs]).to(device)
        if self.stage == 1:
            loss = stage1_loss(self.model, self.teacher, x, gt)
            return loss, {"l1": float(loss.detach())}
        loss, terms = stage2_loss(self.model, self.teacher, x, gt, noise.to(device), self.kd_weight)
        return loss, {name: float(value.detach()) for name, value in terms.items()}


def teacher_path(stage1_file: Path) -> Path:
    return stage1_file.with_name(stage1_file.name.removesuffix(".safetensors") + ".teacher.safetensors")


def save_teacher(teacher: torch.nn.Module, config, path: Path) -> Path:
    return save_safetensors_atomic(teacher.state_dict(), path,
                                   metadata={"mmig.format": TEACHER_FORMAT, CONFIG_KEY: config.to_json()})


def load_teacher(path: Path, config) -> torch.nn.Module:
    from safetensors import safe_open
    from safetensors.torch import load_file
    if not path.is_file():
        raise FileNotFoundError(f"recipe.stage1: the teacher file {path} is missing (stage 1 writes it beside "
                                "its .safetensors)")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("mmig.format") != TEACHER_FORMAT or metadata.get(CONFIG_KEY) != config.to_json():
        raise ConfigError(f"{path} is not the teacher of this stage-1 network (format or sizes differ)")
    teacher = make_teacher(config)
    teacher.load_state_dict(load_file(str(path)))
    return teacher


def build(config: RecipeConfig, ctx: RunContext) -> Recipe:
    if config.stage not in (1, 2):
        raise ConfigError(f"recipe.stage must be 1 or 2, not {config.stage}")
    if not config.images:
        raise FileNotFoundError("recipe.images is not set: give a folder of training images")
    dataset = ImageFolder(config.images, config.crop)
    if config.stage == 1:
        if config.preset not in ("paper", "tiny"):
            raise ConfigError(f"recipe.preset must be paper or tiny, not {config.preset!r}")
        model = DiffRIR(paper_config() if config.preset == "paper" else tiny_config())
        teacher = make_teacher(model.config)
    else:
        if not config.stage1:
            raise ConfigError("recipe.stage1 is not set: stage 2 starts from stage 1's exported .safetensors")
        stage1_file = Path(config.stage1)
        if not stage1_file.is_file():
            raise FileNotFoundError(f"recipe.stage1: {stage1_file} does not exist (run stage 1 first)")
        model = load_diffrir(stage1_file)
        teacher = load_teacher(teacher_path(stage1_file), model.config)
    if config.crop % model.config.multiple:
        raise ConfigError(f"recipe.crop={config.crop} must be a multiple of {model.config.multiple}")
    module = DiffRIRTraining(model.train(), teacher, config.stage, config.crop, config.kd_weight)

    def param_groups(m: DiffRIRTraining):
        if m.stage == 1:
            return [{"name": "restorer", "params": list(m.model.restorer.parameters()), "lr": config.lr,
                     "betas": ADAM_BETAS},
                    {"name": "teacher_cpen", "params": list(m.teacher.parameters()), "lr": config.lr,
                     "betas": ADAM_BETAS}]
        return [{"name": "diffrir", "params": list(m.model.parameters()), "lr": config.lr, "betas": ADAM_BETAS}]

    def export(m: DiffRIRTraining, out_dir: Path) -> list[Path]:
        model = m.model.eval()
        if m.stage == 1:
            file = Path(out_dir) / f"{config.name}-stage1.safetensors"
            return [save_diffrir(model, file), save_teacher(m.teacher, model.config, teacher_path(file))]
        return [save_diffrir(model, Path(out_dir) / f"{config.name}.safetensors")]

    stage_line = ("stage 1: restorer + teacher CPEN (sees the ground truth), loss L1" if config.stage == 1 else
                  f"stage 2: the shipped network from {config.stage1}, loss L1 + {config.kd_weight} x L_kd")
    return Recipe(module=module, param_groups=param_groups, dataset=dataset, export=export, collate=collate,
                  describe=[stage_line, f"{len(dataset)} images, {config.crop} px crops"] + trainable_summary(module),
                  fsdp_wrap=(PriorModulatedBlock,))
