"""The contract between the training engine (`training/engine.py`) and a recipe (`training/recipes/<name>.py`).

A run is configured by one YAML file with two sections, each a dataclass (unknown keys are an error):

    recipe:   the recipe's own `RecipeConfig`  (models, data, loss weights, learning rates, stage, ...)
    train:    `TrainConfig` below, shared by every recipe (steps, global batch, checkpoints, strategy, ...)

A recipe module defines:

    RecipeConfig                                   a dataclass
    build(config: RecipeConfig, ctx: RunContext) -> Recipe

The engine owns everything distributed: process group, DDP/FSDP wrapping, the sampler that splits each
global batch across ranks, optimizer, checkpoints, resume, progress and metrics. A recipe only says what
the model is, what trains at which learning rate, what one sample is, what the loss is and what to export.

Determinism (for resume and for 1-process == N-process equivalence): dataset item i is the same on every
run and rank, and every random draw the loss makes for a sample (noise, timestep, augmentation) comes from
that sample's own seed, `batch["sample_seed"]`, which the engine adds: a function of (train.seed, step,
global index of the sample in the global batch). Use `sample_generators(batch)` for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"  # checkpoints/, metrics.jsonl, export/ go here
    steps: int = 1000
    batch_size: int = 8  # the global batch: split evenly across ranks (must divide by the world size)
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    strategy: str = "ddp"  # ddp | fsdp; a single process runs the plain module either way
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; fp16 uses a grad scaler)
    grad_clip: float = 1.0  # 0 disables it
    weight_decay: float = 0.0
    checkpoint_every: int = 100  # steps; a checkpoint is also written on SIGTERM and at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    num_workers: int = 0


@dataclass
class RunContext:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    seed: int = 0
    out_dir: Path = Path("runs/train")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Recipe:
    """What the engine trains.

    module:  every part the loss needs, trainable and frozen (frozen parts have requires_grad False and are
             never handed to the optimizer). `module(batch, step)` returns (loss, {term name: float}); the
             loss is the mean over the local batch, so DDP's gradient average is the global-batch mean.
    param_groups(module) -> [{"params": [...], "lr": float, "name": str}, ...], on the unwrapped module.
    dataset: a map-style dataset of dicts.
    collate: list of items -> batch dict (tensors batched); the engine adds "sample_seed".
    export(module, out_dir) -> paths written: the files the pack's loader nodes read. Called on rank 0 at the
             end of the run with the unwrapped module (FSDP's full state gathered first).
    describe: lines printed at start, e.g. which parameters train in this stage.
    fsdp_wrap: module classes FSDP shards as separate units (the big transformer blocks); empty = one unit.
    """

    module: torch.nn.Module
    param_groups: Callable[[torch.nn.Module], list[dict[str, Any]]]
    dataset: torch.utils.data.Dataset
    export: Callable[[torch.nn.Module, Path], list[Path]]
    collate: Callable[[list[Any]], dict[str, Any]] | None = None
    describe: list[str] = field(default_factory=list)
    fsdp_wrap: tuple[type, ...] = ()


class RecipeModule(Protocol):
    RecipeConfig: type

    def build(self, config: Any, ctx: RunContext) -> Recipe: ...


def sample_generators(batch: dict[str, Any]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by the engine's per-sample seed."""
    return [torch.Generator().manual_seed(int(seed)) for seed in batch["sample_seed"]]


def randn_per_sample(batch: dict[str, Any], shape: tuple[int, ...], device=None, dtype=None) -> torch.Tensor:
    """A [B, *shape] normal draw where row i depends only on sample i's seed."""
    rows = [torch.randn(shape, generator=g) for g in sample_generators(batch)]
    return torch.stack(rows).to(device=device, dtype=dtype)


def trainable_summary(module: torch.nn.Module) -> list[str]:
    """'<top-level child>: N trainable / M parameters' for each child, for `Recipe.describe`."""
    lines = []
    for name, child in module.named_children():
        total = sum(p.numel() for p in child.parameters())
        trainable = sum(p.numel() for p in child.parameters() if p.requires_grad)
        lines.append(f"{name}: {trainable:,} trainable / {total:,} parameters"
                     + ("" if trainable else " (frozen)"))
    return lines
