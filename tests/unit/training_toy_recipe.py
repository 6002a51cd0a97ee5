"""A test-only recipe for the training engine: a small residual MLP with a frozen input layer.

Importable as `training_toy_recipe` (tests/unit on the path), so `python -m training training_toy_recipe`
and torchrun can run it. Fast enough for many launched runs; `step_sleep` slows it down so a test can
send SIGTERM in the middle of a run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mmig_core.model_files import save_safetensors_atomic
from training.recipe import Recipe, RunContext, randn_per_sample, trainable_summary


@dataclass
class RecipeConfig:
    items: int = 24  # dataset size (not a multiple of the batch: epochs straddle steps)
    width: int = 16
    lr: float = 0.02
    step_sleep: float = 0.0


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.linear(x))


class Toy(torch.nn.Module):
    def __init__(self, width: int, step_sleep: float):
        super().__init__()
        self.embed = torch.nn.Linear(4, width).requires_grad_(False)  # frozen, as a base model would be
        self.blocks = torch.nn.Sequential(Block(width), Block(width))
        self.head = torch.nn.Linear(width, 2)
        self.step_sleep = step_sleep

    def forward(self, batch, step):
        if self.step_sleep:
            time.sleep(self.step_sleep)
        noise = randn_per_sample(batch, (4,), device=batch["x"].device)  # the per-sample draw a loss makes
        prediction = self.head(self.blocks(self.embed(batch["x"] + 0.05 * noise)))
        mse = F.mse_loss(prediction, batch["y"])
        l1 = F.l1_loss(prediction, batch["y"]).detach()
        return mse, {"mse": float(mse.detach()), "l1": float(l1)}


class Points(torch.utils.data.Dataset):
    def __init__(self, count: int):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(count, 4, generator=g)
        self.y = torch.stack([torch.sin(self.x[:, 0] + self.x[:, 1]), self.x[:, 2] * self.x[:, 3]], 1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "y": self.y[index]}


def build(config: RecipeConfig, ctx: RunContext) -> Recipe:
    module = Toy(config.width, config.step_sleep)

    def param_groups(m: Toy):
        return [{"name": "blocks", "params": list(m.blocks.parameters()), "lr": config.lr},
                {"name": "head", "params": list(m.head.parameters()), "lr": config.lr / 2}]

    def export(m: Toy, out_dir: Path) -> list[Path]:
        trained = {k: v for k, v in m.state_dict().items() if not k.startswith("embed.")}
        return [save_safetensors_atomic(trained, Path(out_dir) / "toy.safetensors")]

    return Recipe(module=module, param_groups=param_groups, dataset=Points(config.items), export=export,
                  describe=trainable_summary(module), fsdp_wrap=(Block,))
