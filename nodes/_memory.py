"""The pack's models under the host's memory manager, in every memory mode (--lowvram, --novram, --cpu, normal).

The host streams a model's weights to the GPU layer by layer under --lowvram/--novram only through its own
cast-weight layers (`comfy.ops`, modules with `comfy_cast_weights`). The pack's models (Hugging Face VLMs and
BLIP-2, the MUMU adapter, MMSM, DiffRIR) are plain torch modules: a partial load leaves some of their
weights and buffers on the CPU while their inputs go to the GPU, and they fail with a device mismatch (the
pinned 2024-03 host moves only modules that have a `weight`, so e.g. BLIP-2's `query_tokens` stays behind; the
newest one skips every module it cannot cast, and under --novram moves nothing). So the pack loads its models
whole: the host first offloads what it must to make room (its own free_memory, as for any model), then the
model goes to the device in one piece, and it is offloaded in one piece (never half). This is the pack's
deviation from the host's low-VRAM streaming, and the reason for it; the UNet and the host's own models keep
their streaming.

Host APIs used: the 2024-03 host's ModelPatcher.patch_model_lowvram (its low-VRAM path) and the newest host's
ModelPatcher.load(..., full_load) / partially_unload (0.8.0). Each override is only reached on the host that
has the method it overrides.
"""
from __future__ import annotations

import logging

log = logging.getLogger("ComfyUI-MMIG")
_PATCHER_CLASS = None


def _whole_model_patcher_class():
    """The host's ModelPatcher, loading and offloading the pack's model whole (built once, on first use)."""
    global _PATCHER_CLASS
    if _PATCHER_CLASS is not None:
        return _PATCHER_CLASS
    import comfy.model_patcher

    class PackModelPatcher(comfy.model_patcher.ModelPatcher):
        """A ModelPatcher whose model always loads whole (see the module docstring: no cast-weight layers)."""

        def clone(self):
            clone = super().clone()
            if type(clone) is not type(self):  # the 2024-03 host's clone() builds a plain ModelPatcher
                clone.__class__ = type(self)
            return clone

        # 2024-03 host: LoadedModel.model_load calls this under --lowvram (model larger than free memory) and
        # always under --novram. Load every weight, buffer and patch as the normal path does.
        def patch_model_lowvram(self, device_to=None, lowvram_model_memory=0, *args, **kwargs):
            log.info("MMIG: loading %s whole (%.0f MB) in low-VRAM mode: the pack's models cannot be streamed",
                     type(getattr(self.model, "inner", self.model)).__name__, self.model_size() / 2 ** 20)
            return self.patch_model(device_to)

        # Newer hosts (0.8.0): every load, partial or not, goes through load(); full_load moves every
        # parameter and buffer, including those of modules the partial path skips.
        def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
            return super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                                force_patch_weights=force_patch_weights, full_load=True)

        # Newer hosts ask a loaded model to give back part of its memory first; freeing nothing makes the
        # host offload it whole (LoadedModel.model_unload then detaches it) instead of leaving half of it.
        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            return 0

    _PATCHER_CLASS = PackModelPatcher
    return _PATCHER_CLASS


def whole_model_patcher(module, load_device, offload_device):
    """A host ModelPatcher for one of the pack's modules that loads and offloads it whole."""
    return _whole_model_patcher_class()(module, load_device=load_device, offload_device=offload_device)


def load_whole(patchers) -> None:
    """load_models_gpu for the pack's models, with an error a user can act on when the device is full."""
    import torch
    import comfy.model_management
    try:
        comfy.model_management.load_models_gpu(list(patchers))
    except torch.cuda.OutOfMemoryError as error:  # also what the host's OOM_EXCEPTION is on CUDA
        needed = sum(p.model_size() for p in patchers) / 2 ** 20
        names = ", ".join(type(getattr(p.model, "inner", p.model)).__name__ for p in patchers)
        raise RuntimeError(
            f"not enough GPU memory to load {names} ({needed:.0f} MB of weights): the pack's models load whole, "
            f"even under --lowvram/--novram. Load it in a smaller dtype (fp16/bf16 on its loader), close other "
            f"GPU programs, or start ComfyUI with --cpu to run everything on the CPU.") from error
