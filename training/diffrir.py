"""Headless DiffRIR training (LLMGA §3.4): two stages, as DiffIR trains, with LLMGA's reference input.

    python -m training.diffrir --images DIR --out models/diffrir/my-diffrir.safetensors \
        [--preset paper|tiny] [--stage1-steps N] [--stage2-steps N] [--crop 256] [--batch 8]

Each step: GT crops -> I_LQ = D_2(D_1(GT)) (Eq. 9) and a random mask M (irregular, box or outpainting
border) -> input concat(I_LQ, (1 - M)·GT) (Eq. 7). D_1 is the official second-order degradation with the
ranges of Zj-BinXia/DiffRIR's options/train_DiffRIRS2_x1.yml, then D_2, clipping and 8-bit rounding
(`mmig_core.diffrir.degradations`).
- Stage 1 trains the restorer with a teacher CPEN that also sees GT (the ground-truth prior); loss L1.
- Stage 2 trains the shipped network: its CPEN sees the input only and conditions the 4-step
  diffusion chain, which starts from the teacher prior noised to the last step; loss
  L1(output, GT) + kd_weight · L1(predicted prior, teacher prior).
The result is written (atomically) as the safetensors file MMIG DiffRIR Loader reads.

This script runs both stages in one process; `python -m training diffrir --config ...` runs the same
losses (the functions below) on the training engine: one stage per run, torchrun/accelerate, DDP/FSDP,
checkpoints and --resume (training/recipes/diffrir.py).

Perceptual loss: left out. Its usual weights (VGG-19 on ImageNet) cannot be had offline here, and the
pack downloads nothing; L1 is the paper's pixel loss.
"""
from __future__ import annotations

import argparse
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from mmig_core.diffrir import DiffRIR, DiffRIRConfig, paper_config, save_diffrir, tiny_config
from mmig_core.diffrir.degradations import degrade, random_masks
from mmig_core.diffrir.network import PriorEncoder

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class TrainSettings:
    model: DiffRIRConfig = field(default_factory=paper_config)
    crop: int = 256
    batch: int = 8
    stage1_steps: int = 1000
    stage2_steps: int = 1000
    lr: float = 2e-4
    kd_weight: float = 1.0
    seed: int = 0
    device: str = "cpu"


class CropSampler:
    """Random crops (with flips) from a list of [3, H, W] images in 0..1; small images are upscaled."""

    def __init__(self, images: list[torch.Tensor], crop: int, seed: int):
        if not images:
            raise ValueError("no training images")
        self.images, self.crop = images, crop
        self.rng = random.Random(seed)

    def batch(self, size: int) -> torch.Tensor:
        crops = []
        for _ in range(size):
            image = fit_to_crop(self.rng.choice(self.images), self.crop)
            h, w = image.shape[-2:]
            top, left = self.rng.randint(0, h - self.crop), self.rng.randint(0, w - self.crop)
            crop = image[:, top:top + self.crop, left:left + self.crop]
            crops.append(crop.flip(-1) if self.rng.random() < 0.5 else crop)
        return torch.stack(crops)


def fit_to_crop(image: torch.Tensor, crop: int) -> torch.Tensor:
    """Upscale (bicubic) an image whose shorter side is below the crop size; others pass unchanged."""
    h, w = image.shape[-2:]
    if min(h, w) >= crop:
        return image
    s = crop / min(h, w)
    return F.interpolate(image[None], size=(max(crop, round(h * s)), max(crop, round(w * s))),
                         mode="bicubic", align_corners=False)[0].clamp(0, 1)


def image_paths(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def load_image(path: str | Path) -> torch.Tensor:
    """[3, H, W] float in 0..1."""
    from PIL import Image
    with Image.open(path) as im:
        data = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        return data.view(im.height, im.width, 3).permute(2, 0, 1).float() / 255


def load_image_folder(folder: str | Path) -> list[torch.Tensor]:
    return [load_image(path) for path in image_paths(folder)]


def training_pair(image: torch.Tensor, crop: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample drawn with its own generator: (input x [6, crop, crop], ground truth [3, crop, crop]).
    A random crop (flipped half the time) of the image, degraded (Eq. 9) and masked (Eq. 7)."""
    image = fit_to_crop(image, crop)
    h, w = image.shape[-2:]
    top = int(torch.randint(h - crop + 1, (1,), generator=generator))
    left = int(torch.randint(w - crop + 1, (1,), generator=generator))
    gt = image[:, top:top + crop, left:left + crop]
    if float(torch.rand(1, generator=generator)) < 0.5:
        gt = gt.flip(-1)
    gt = gt[None]
    lq = degrade(gt, generator)
    mask = random_masks(1, crop, crop, generator)
    return DiffRIR.make_input(lq, gt, mask)[0], gt[0]


def make_teacher(config: DiffRIRConfig) -> PriorEncoder:
    """The stage-one CPEN: it sees the input and the ground truth (the ground-truth prior)."""
    return PriorEncoder(config.input_channels + config.image_channels, config)


def stage1_loss(model: DiffRIR, teacher: PriorEncoder, x: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The restorer conditioned on the teacher's prior; L1 to the ground truth."""
    return F.l1_loss(model.restorer(x, teacher(torch.cat([x, gt], 1))), gt)


def stage2_loss(model: DiffRIR, teacher: PriorEncoder, x: torch.Tensor, gt: torch.Tensor, noise: torch.Tensor,
                kd_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The shipped network: its CPEN sees the input only and conditions the diffusion chain, which starts
    from the (frozen) teacher prior noised to the last step; L1(output, GT) + kd_weight · L1(prior, teacher's)."""
    with torch.no_grad():
        target_prior = teacher(torch.cat([x, gt], 1))
    start = model.diffusion.add_noise(target_prior, noise.to(target_prior))
    prior = model.diffusion.sample(model.denoiser, model.prior_encoder(x), start)
    pixel, kd = F.l1_loss(model.restorer(x, prior), gt), F.l1_loss(prior, target_prior)
    return pixel + kd_weight * kd, {"l1": pixel, "kd": kd}


def make_batch(sampler: CropSampler, size: int, generator: torch.Generator, device):
    gt = sampler.batch(size)
    lq = degrade(gt, generator)
    mask = random_masks(size, gt.shape[-2], gt.shape[-1], generator)
    x = DiffRIR.make_input(lq, gt, mask)
    return x.to(device), gt.to(device)


def train(images: list[torch.Tensor], settings: TrainSettings, out_path: str | Path | None = None,
          on_step: Callable[[str, int, float], None] | None = None) -> tuple[DiffRIR, dict[str, list[float]]]:
    """Run both stages; returns the stage-two model and the per-step losses of each stage."""
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    config, device = settings.model, torch.device(settings.device)
    sampler = CropSampler(images, settings.crop, settings.seed)
    model = DiffRIR(config).to(device).train()
    # The teacher CPEN sees the input and the ground truth.
    teacher = make_teacher(config).to(device).train()
    losses = {"stage1": [], "stage2": []}

    optimizer = torch.optim.Adam([*model.restorer.parameters(), *teacher.parameters()], lr=settings.lr,
                                 betas=(0.9, 0.99))
    for step in range(settings.stage1_steps):
        x, gt = make_batch(sampler, settings.batch, generator, device)
        loss = stage1_loss(model, teacher, x, gt)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses["stage1"].append(loss.item())
        if on_step:
            on_step("stage1", step, loss.item())

    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.99))
    for step in range(settings.stage2_steps):
        x, gt = make_batch(sampler, settings.batch, generator, device)
        noise = torch.randn((x.shape[0], config.prior_dim), generator=generator)
        loss, _ = stage2_loss(model, teacher, x, gt, noise, settings.kd_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses["stage2"].append(loss.item())
        if on_step:
            on_step("stage2", step, loss.item())

    model.eval()
    if out_path is not None:
        save_diffrir(model, out_path)
    return model, losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="folder of ground-truth images (searched recursively)")
    parser.add_argument("--out", required=True, help="the .safetensors to write (e.g. ComfyUI/models/diffrir/x.safetensors)")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--stage1-steps", type=int, default=1000)
    parser.add_argument("--stage2-steps", type=int, default=1000)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = TrainSettings(model=paper_config() if args.preset == "paper" else tiny_config(), crop=args.crop,
                             batch=args.batch, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
                             lr=args.lr, seed=args.seed, device=args.device)

    def report(stage, step, loss):
        if step % 50 == 0:
            log.info("%s step %d: loss %.4f", stage, step, loss)

    train(load_image_folder(args.images), settings, args.out, on_step=report)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
