"""torch.distributed for the engine: the launcher's environment, the process group, DDP/FSDP, teardown.

`torchrun` and `accelerate launch` (which runs torchrun underneath) both set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or with WORLD_SIZE=1) the run is a single
process and nothing distributed is touched.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("training")


@dataclass
class Launch:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_from_env(env=os.environ) -> Launch:
    world_size = int(env.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Launch()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in env]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: launch with "
                           "`torchrun --nproc_per_node=N -m training ...` or `accelerate launch -m training ...`")
    rank = int(env["RANK"])
    return Launch(rank=rank, world_size=world_size, local_rank=int(env.get("LOCAL_RANK", rank)))


def pick_device(setting: str, launch: Launch) -> torch.device:
    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, not {setting!r}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no CUDA device")
    device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_process_group(launch: Launch, device: torch.device) -> None:
    if launch.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)


def wrap(module: torch.nn.Module, strategy: str, launch: Launch, device: torch.device,
         fsdp_wrap: tuple[type, ...], find_unused_parameters: bool) -> torch.nn.Module:
    """The module as the training loop calls it: plain (1 process), DDP or FSDP."""
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"train.strategy must be ddp or fsdp, not {strategy!r}")
    if not launch.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # gradient_as_bucket_view: gradients live in the all-reduce buckets (no copy in, no copy out)
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=find_unused_parameters, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    # use_orig_params: frozen and trainable parameters share FSDP units, and the optimizer and the
    # recipe's param_groups keep seeing the module's own parameters. Every rank built the same weights
    # from the same seed; on CUDA they are broadcast from rank 0 anyway (FSDP can only do that on GPU).
    return FSDP(module, use_orig_params=True, device_id=device,
                auto_wrap_policy=ModuleWrapPolicy(set(fsdp_wrap)) if fsdp_wrap else None,
                sync_module_states=device.type == "cuda")


def is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    return isinstance(module, FSDP)


def clip_gradients(wrapped: torch.nn.Module, params: list[torch.nn.Parameter], max_norm: float) -> None:
    if is_fsdp(wrapped):
        wrapped.clip_grad_norm_(max_norm)  # the norm over every rank's shard
    else:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def all_reduce_mean(values: torch.Tensor, launch: Launch) -> torch.Tensor:
    if launch.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= launch.world_size
    return values


def broadcast_from_main(value, launch: Launch):
    if not launch.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value, launch: Launch) -> list:
    if not launch.distributed:
        return [value]
    out = [None] * launch.world_size
    dist.all_gather_object(out, value)
    return out


def teardown(launch: Launch, device: torch.device, clean: bool) -> None:
    """Leave the process group without hanging.

    A bare destroy_process_group() after a 2-rank gloo run hung about one time in eight here, with a
    rank still holding models and collective outputs: the caller frees those first, then every rank
    meets at a barrier, then the group goes. After an uncoordinated failure (`clean` False) the other
    ranks may never reach the barrier, so the group is left to die with the process.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not (launch.distributed and dist.is_initialized()):
        return
    if clean:
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
        dist.destroy_process_group()
