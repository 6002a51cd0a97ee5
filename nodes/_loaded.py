"""The loaded-model values that cross node boundaries (MMIG_VLM, MMIG_ADAPTER) and the picker of pack model
files by their metadata format: one small module that the encoder, LoRA and MMSM nodes all import, so none of
them imports another."""
from __future__ import annotations

from dataclasses import dataclass

import folder_paths

from ..mmig_core import vlm as vlm_core
from ..mmig_core.model_files import ModelFilesError, check_safetensors_file


@dataclass
class LoadedVLM:
    """The MMIG_VLM value: the model and the host's memory-managed handle on it."""
    vlm: vlm_core.VLM
    patcher: object
    name: str


def managed_vlm(vlm: vlm_core.VLM):
    """The host's memory-managed handle on a loaded VLM (LoadedVLM.patcher).

    A plain model is the host's to load to the device and offload. A bitsandbytes-quantized one cannot move
    between devices (its packed weights would travel without their quantization state; transformers refuses
    `.to()` on it), so it is handed over pinned: load, offload and current device are the CUDA device it was
    loaded on, and its holder ignores `.to()` / `.cuda()` / `.half()`. The host counts its memory but never moves
    it; the way to free it is to unload it (the host's 'free model memory')."""
    from . import _host
    if vlm.quantization == "none":
        return _host.managed(vlm.model)
    return pinned_patcher(vlm.model)


def pinned_holder(model):
    """A torch module holding `model` that stays where it is: moves and casts of the holder are no-ops."""
    import torch

    class PinnedModule(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            first = next(inner.parameters(), None)
            self.device = first.device if first is not None else None

        def _apply(self, fn, recurse=True):  # nn.Module.to / cuda / cpu / half all go through here
            return self

    return PinnedModule(model)


def pinned_patcher(model):
    """A host ModelPatcher whose model never moves (see managed_vlm)."""
    import inspect

    import comfy.model_patcher
    holder = pinned_holder(model)
    device = holder.device
    extra = {"current_device": device} if "current_device" in inspect.signature(
        comfy.model_patcher.ModelPatcher.__init__).parameters else {}
    return comfy.model_patcher.ModelPatcher(holder, load_device=device, offload_device=device, **extra)


def require_unquantized(vlm: "LoadedVLM", what: str) -> None:
    """A ValueError naming the fix when `what` (a LoRA patch) meets a quantized VLM: the host patches weights by
    adding to them, and bitsandbytes weights are packed integers."""
    quantization = getattr(vlm.vlm, "quantization", "none")
    if quantization != "none":
        raise ValueError(f"{what} cannot patch the VLM '{vlm.name}', loaded with quantization '{quantization}': "
                         f"its bitsandbytes weights are packed integers that a LoRA cannot be added to. Load the "
                         f"VLM with quantization none (dtype bf16 or fp16 to save memory) to apply the LoRA.")


@dataclass
class LoadedAdapter:
    """The MMIG_ADAPTER value."""
    adapter: object
    patcher: object
    name: str


def adapter_files(file_format: str) -> list[str]:
    """The .safetensors files in models/mmig/ whose metadata says `file_format` (MUMU adapter, MM-Adapter, MMSM)."""
    names = []
    for name in folder_paths.get_filename_list("mmig"):
        if name.endswith(".safetensors"):
            try:  # reads the header only
                if check_safetensors_file(folder_paths.get_full_path("mmig", name)).get("format") == file_format:
                    names.append(name)
            except (ModelFilesError, OSError):
                continue  # a broken file is reported by the loader that reads it, not here
    return sorted(names)
