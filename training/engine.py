"""The training engine: runs any recipe (`training/recipe.py`) on one process or many.

One call, `run(recipe_module, recipe_config, train_config, resume=...)`:
- reads the launcher's environment (torchrun / accelerate launch) and joins the process group
  (gloo on CPU, nccl on CUDA); a plain `python -m training ...` is a single process;
- builds the recipe, wraps its module in DDP or FSDP (`train.strategy`), AdamW over its param groups;
- feeds every step the same global batch whatever the world size (`sampler.py`), with per-sample seeds;
- clips gradients, optional autocast (bf16, or fp16 with a grad scaler);
- progress bar and metrics.jsonl on rank 0 (`metrics.py`);
- checkpoints every `checkpoint_every` steps, at the end and on SIGTERM (finishes the step, saves,
  returns cleanly); `resume=True` continues from `latest` with the same data order (`checkpoint.py`);
- at the end, rank 0 exports the files the pack's loader nodes read (`Recipe.export`).
"""
from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, distributed
from .config import ConfigError, dump_yaml
from .metrics import MetricsLog, Progress
from .recipe import Recipe, RunContext, TrainConfig
from .sampler import GlobalBatchSampler, SeededItems, StepBatches, seeded_collate

log = logging.getLogger("training")


@dataclass
class RunResult:
    out_dir: Path
    step: int  # finished optimizer steps
    completed: bool  # False when a SIGTERM stopped the run early
    final_loss: float | None = None
    exports: list[Path] = field(default_factory=list)
    checkpoint: Path | None = None


def run(recipe_module: Any, recipe_config: Any, train: TrainConfig, resume: bool = False) -> RunResult:
    launch = distributed.launch_from_env()
    device = distributed.pick_device(train.device, launch)
    distributed.init_process_group(launch, device)
    trainer, clean = None, False
    try:
        trainer = Trainer(recipe_module, recipe_config, train, launch, device)
        result = trainer.train(resume)
        clean = True
        return result
    except (checkpoint.CheckpointError, ConfigError, FileNotFoundError, NotADirectoryError, FloatingPointError):
        clean = True  # raised alike on every rank: they can still meet at the barrier
        raise
    finally:
        if trainer is not None:
            trainer.release()
        del trainer
        distributed.teardown(launch, device, clean)


class StopSignal:
    """SIGTERM sets a flag; the loop finishes its step, saves and returns (a scheduler's pre-emption)."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2 ** 32)
    except ImportError:
        pass


def to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (0 where the platform does not say)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, OSError):
        return 0.0


def to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_cpu(v) for v in value]
    return value


class Trainer:
    def __init__(self, recipe_module, recipe_config, train: TrainConfig, launch: distributed.Launch,
                 device: torch.device):
        self.recipe_module, self.recipe_config, self.train_config = recipe_module, recipe_config, train
        self.launch, self.device, self.out_dir = launch, device, Path(train.out_dir)
        self.is_main = launch.rank == 0
        if train.steps < 1 or train.batch_size < 1 or train.checkpoint_every < 1:
            raise ConfigError("train.steps, train.batch_size and train.checkpoint_every must be at least 1")
        if train.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, not {train.mixed_precision!r}")
        seed_everything(train.seed)  # identical initial weights on every rank
        self.context = RunContext(device=device, rank=launch.rank, world_size=launch.world_size,
                                  local_rank=launch.local_rank, seed=train.seed, out_dir=self.out_dir)
        recipe: Recipe = recipe_module.build(recipe_config, self.context)
        self.recipe, self.module = recipe, recipe.module.to(device)
        self.trainable = [name for name, p in self.module.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ConfigError("the recipe leaves no parameter trainable: check the stage/trainable settings")
        self.sampler = GlobalBatchSampler(len(recipe.dataset), train.batch_size, train.seed, launch.rank,
                                          launch.world_size)
        find_unused = (launch.distributed and train.strategy == "ddp" and self._has_unused_parameters())
        self.wrapped = distributed.wrap(self.module, train.strategy, launch, device, tuple(recipe.fsdp_wrap),
                                        find_unused)
        self.optimizer = self._optimizer()
        self.scaler = None
        if train.mixed_precision == "fp16":
            if distributed.is_fsdp(self.wrapped):
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
                self.scaler = ShardedGradScaler(device.type)
            else:
                self.scaler = torch.amp.GradScaler(device.type)
        if self.is_main:
            self._describe(find_unused)

    # ---- set-up ------------------------------------------------------------------------------------

    def _local_batch(self, step: int) -> dict:
        items = SeededItems(self.recipe.dataset)
        collate = seeded_collate(self.recipe.collate or torch.utils.data.default_collate)
        return to_device(collate([items[key] for key in self.sampler.local(step)]), self.device)

    def _has_unused_parameters(self) -> bool:
        """DDP's find_unused_parameters costs a graph walk every step: turn it on only when one
        forward/backward of a local batch leaves some trainable parameter without a gradient."""
        rng = checkpoint.rng_state()
        loss, _ = self.module(self._local_batch(0), 0)
        loss.backward()
        unused = [name for name, p in self.module.named_parameters() if p.requires_grad and p.grad is None]
        self.module.zero_grad(set_to_none=True)
        checkpoint.set_rng_state(rng)
        anywhere = any(distributed.all_gather(bool(unused), self.launch))
        if anywhere and self.is_main:
            log.info("DDP: find_unused_parameters on (%s%s get no gradient)", ", ".join(unused[:3]),
                     "..." if len(unused) > 3 else "")
        return anywhere

    def _optimizer(self) -> torch.optim.Optimizer:
        groups, seen = [], set()
        for group in self.recipe.param_groups(self.module):
            params = [p for p in group["params"] if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({**group, "params": params})
        if not groups:
            raise ConfigError("the recipe's param_groups hold no trainable parameter")
        missing = [n for n, p in self.module.named_parameters() if p.requires_grad and id(p) not in seen]
        if missing and self.is_main:
            log.warning("trainable but in no optimizer group (never updated): %s", ", ".join(missing[:5]))
        return torch.optim.AdamW(groups, weight_decay=self.train_config.weight_decay)

    def _describe(self, find_unused: bool) -> None:
        t = self.train_config
        log.info("training %s: %d steps, global batch %d over %d process(es) (%s), device %s, out %s",
                 getattr(self.recipe_module, "__name__", "recipe"), t.steps, t.batch_size, self.launch.world_size,
                 t.strategy if self.launch.distributed else "single process", self.device, self.out_dir)
        for line in self.recipe.describe:
            log.info("  %s", line)
        shard = " (this rank's FSDP shard)" if distributed.is_fsdp(self.wrapped) else ""
        for group in self.optimizer.param_groups:
            count = sum(p.numel() for p in group["params"])
            log.info("  optimizer group %s: %s parameters%s, lr %g", group.get("name", "?"), f"{count:,}", shard,
                     group["lr"])

    # ---- the loop ----------------------------------------------------------------------------------

    def train(self, resume: bool) -> RunResult:
        t = self.train_config
        start, elapsed_before = 0, 0.0
        metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.is_main)
        if resume:
            start, elapsed_before = self._resume()
            metrics.truncate_after(start)
        elif self.is_main and checkpoint.latest_checkpoint(self.out_dir) is not None:
            log.warning("%s already holds checkpoints; this run starts over (pass --resume to continue)",
                        self.out_dir)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_yaml(self.recipe_config, t))
        loader = torch.utils.data.DataLoader(
            SeededItems(self.recipe.dataset), batch_sampler=StepBatches(self.sampler, start, t.steps),
            collate_fn=seeded_collate(self.recipe.collate or torch.utils.data.default_collate),
            num_workers=t.num_workers)
        progress = Progress(t.steps, start, self.is_main, t.log_every)
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.mixed_precision)
        finished, loss_value, saved_at = start, None, None
        interval_start, interval_steps = time.perf_counter(), 0
        run_start = time.perf_counter() - elapsed_before
        self.wrapped.train()
        with StopSignal() as stop_signal, progress:
            for step, batch in zip(range(start, t.steps), loader):
                batch = to_device(batch, self.device)
                with torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss, terms = self.wrapped(batch, step)
                self._backward_and_step(loss)
                finished, interval_steps = step + 1, interval_steps + 1
                names = sorted(terms)
                local = torch.tensor([float(loss.detach()), *(float(terms[n]) for n in names),
                                      peak_rss_mib(), float(stop_signal.requested)], dtype=torch.float64)
                reduced = distributed.all_reduce_mean(local, self.launch).tolist()
                loss_value, rss_mib, stop = reduced[0], reduced[-2], reduced[-1] > 0
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"the loss is {loss_value} at step {finished}: lower the learning "
                                             "rate or check the data; the last checkpoint is intact")
                now = time.perf_counter()
                samples_per_s = interval_steps * t.batch_size / max(now - interval_start, 1e-9)
                progress.update(finished, loss_value, samples_per_s)
                if finished % max(t.log_every, 1) == 0 or finished == t.steps or stop:
                    metrics.write({"step": finished, "loss": loss_value,
                                   "terms": dict(zip(names, reduced[1:-2])),
                                   "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)},
                                   "samples_per_s": samples_per_s, "elapsed": now - run_start,
                                   "peak_rss_mib": rss_mib, **self._cuda_memory()})
                    interval_start, interval_steps = now, 0
                if finished % t.checkpoint_every == 0 or finished == t.steps or stop:
                    saved_at = self.save(finished, time.perf_counter() - run_start)
                    interval_start, interval_steps = time.perf_counter(), 0
                if stop:
                    if self.is_main:
                        log.info("SIGTERM: stopped after step %d; checkpoint %s. Continue with --resume.",
                                 finished, saved_at)
                    break
        del loader
        completed = finished >= t.steps
        if finished == start and resume and completed:
            log.info("the checkpoint already reached train.steps=%d: nothing to train", t.steps)
        exports = self._export() if completed else []
        return RunResult(self.out_dir, finished, completed, loss_value, exports,
                         checkpoint.latest_checkpoint(self.out_dir) if self.is_main else None)

    def _cuda_memory(self) -> dict:
        if self.device.type != "cuda":
            return {}
        return {"cuda_peak_mib": torch.cuda.max_memory_allocated(self.device) / 2 ** 20}

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.train_config.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                distributed.clip_gradients(self.wrapped, params, self.train_config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.train_config.grad_clip > 0:
                distributed.clip_gradients(self.wrapped, params, self.train_config.grad_clip)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoints -------------------------------------------------------------------------------

    def _state_options(self, **extra):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, **extra)

    def _gather_trainable(self) -> dict[str, torch.Tensor]:
        """The full trainable weights on rank 0's CPU (a collective under FSDP; other ranks get {})."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        fsdp = distributed.is_fsdp(self.wrapped)
        # ignore_frozen_params breaks under FSDP with rank-0-only gathering (it pops keys the other
        # ranks never had), and FSDP gathers the frozen weights before dropping them anyway: filter here.
        # cpu_offload only from a GPU: on CPU FSDP tensors torch 2.11's offloading hook segfaulted.
        weights = get_model_state_dict(self.wrapped, options=self._state_options(
            cpu_offload=self.device.type != "cpu", ignore_frozen_params=not fsdp))
        return {k: to_cpu(weights[k]) for k in self.trainable} if self.is_main else {}

    def save(self, step: int, elapsed: float) -> Path | None:
        """Every rank calls this (gathering FSDP shards is collective); rank 0 writes."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        weights = self._gather_trainable()
        # Not cpu_offload: with it, FSDP's rank-0 gather returned exp_avg_sq in place of exp_avg
        # (torch 2.14, use_orig_params); every rank gathers the full state, rank 0 copies it out.
        gathered = get_optimizer_state_dict(self.wrapped, self.optimizer, options=self._state_options())
        optimizer_state = {"optimizer": to_cpu(gathered) if self.is_main else {}}
        del gathered
        if self.scaler is not None:
            optimizer_state["scaler"] = self.scaler.state_dict()
        rng = distributed.all_gather(checkpoint.rng_state(), self.launch)
        error, path = None, None
        if self.is_main:
            t = self.train_config
            state = {"step": step, "elapsed": elapsed, "seed": t.seed, "batch_size": t.batch_size,
                     "dataset_size": self.sampler.size, "world_size": self.launch.world_size,
                     "strategy": t.strategy, "rng": rng}
            try:
                path = checkpoint.save(self.out_dir, step, weights, optimizer_state, state, t.keep_checkpoints)
            except checkpoint.CheckpointError as e:
                error = str(e)
        error = distributed.broadcast_from_main(error, self.launch)
        if error:
            raise checkpoint.CheckpointError(error)
        return path

    def _resume(self) -> tuple[int, float]:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        found = checkpoint.latest_checkpoint(self.out_dir)
        if found is None:
            if self.is_main:
                log.info("--resume: no checkpoint under %s yet; starting at step 0", self.out_dir)
            return 0, 0.0
        weights, optimizer_state, state = checkpoint.load(found)
        missing = sorted(set(self.trainable) - set(weights))
        unexpected = sorted(set(weights) - set(self.trainable))
        if missing or unexpected:
            raise checkpoint.CheckpointError(
                f"{found} does not match this recipe's trainable parameters (missing: {missing[:3]}, "
                f"unexpected: {unexpected[:3]}): same recipe and stage as the interrupted run?")
        set_model_state_dict(self.wrapped, weights, options=self._state_options(strict=False))
        set_optimizer_state_dict(self.wrapped, self.optimizer, optimizer_state["optimizer"],
                                 options=self._state_options())
        if self.scaler is not None and "scaler" in optimizer_state:
            self.scaler.load_state_dict(optimizer_state["scaler"])
        rng = state["rng"]
        if self.launch.rank < len(rng):
            checkpoint.set_rng_state(rng[self.launch.rank])
        t = self.train_config
        changed = [f"{key} {state[key]} -> {now}" for key, now in
                   (("seed", t.seed), ("batch_size", t.batch_size), ("dataset_size", self.sampler.size))
                   if state.get(key) != now]
        if self.is_main:
            log.info("resumed from %s at step %d", found, state["step"])
            if changed:
                log.warning("the data order differs from the interrupted run (%s)", ", ".join(changed))
        return int(state["step"]), float(state.get("elapsed", 0.0))

    # ---- export and teardown -----------------------------------------------------------------------

    def _export(self) -> list[Path]:
        export_dir = self.out_dir / "export"
        if not distributed.is_fsdp(self.wrapped):
            paths = list(self.recipe.export(self.module, export_dir)) if self.is_main else []
        else:
            # Gather the trained weights, free the shards, and let rank 0 export from a plain copy
            # built the same way (frozen parts are rebuilt identically from the seed and the config).
            weights = self._gather_trainable()
            self.release()
            paths = []
            if self.is_main:
                seed_everything(self.train_config.seed)
                context = RunContext(device=torch.device("cpu"), seed=self.train_config.seed, out_dir=self.out_dir)
                recipe = self.recipe_module.build(self.recipe_config, context)
                recipe.module.load_state_dict(weights, strict=False)
                paths = list(recipe.export(recipe.module, export_dir))
                del recipe
        if self.is_main:
            for path in paths:
                log.info("wrote %s", path)
        return paths

    def release(self) -> None:
        """Drop models, optimizer and data before the process group goes (see distributed.teardown)."""
        for name in ("wrapped", "module", "optimizer", "scaler", "recipe"):
            if hasattr(self, name):
                setattr(self, name, None)
