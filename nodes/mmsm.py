"""MMSM (MMIG §3.2): the multi-modality mutual support module, patched into a MODEL's UNet."""
from __future__ import annotations

from dataclasses import dataclass

import folder_paths
import torch

from . import _host
from ._loaded import adapter_files
from ..mmig_core.mmsm import FORMAT as MMSM_FORMAT, OutputBlockPatch, check_insertion_point
from ..mmig_core.model_files import ModelFilesError

MMSM_SOURCE = ("MMSM files are .safetensors written by the pack's MMSM training (config in the file's metadata); "
               "put them in ComfyUI/models/mmig/.")


@dataclass
class LoadedMMSM:
    """The MMIG_MMSM value: the module and, for hosts that load extra models with a MODEL, its ModelPatcher."""
    mmsm: object
    name: str
    patcher: object = None


class HostManagedPatch(OutputBlockPatch):
    """The MMSM output-block patch, moved with the UNet by the host's memory manager.

    When the host loads a MODEL for sampling it calls `.to(device)` and then `.to(unet dtype)` on every
    patch in its model_options, and `.to(offload device)` when it offloads it (ModelPatcher.model_patches_to,
    in the 2024-03 host and the newest alike); the MMSM follows. Hosts with ModelPatcher.set_additional_models
    also load the MMSM's own ModelPatcher with the UNet, so its memory is counted (see MMIG_MMSMApply).
    """

    def to(self, device_or_dtype):
        if isinstance(device_or_dtype, (torch.device, torch.dtype, str)):
            self.mmsm.to(device_or_dtype)
        return self


def mid_block_channels(model) -> int | None:
    """The UNet's mid-block width (model_channels x the last channel_mult), when the host's UNet tells it."""
    unet = getattr(model.model, "diffusion_model", None)
    channels, mults = getattr(unet, "model_channels", None), getattr(unet, "channel_mult", None)
    return channels * mults[-1] if channels and mults else None


class MMIG_MMSMLoader:
    DESCRIPTION = ("Loads an MMSM from ComfyUI/models/mmig/ (MMIG paper §3.2): MLP on the LLM embedding, domain "
                   "encoder on the UNet features, cross-attention between them, and a domain decoder added back to "
                   "the features. Its widths and insertion point are in the file's metadata.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MMIG_MMSM",)
    RETURN_NAMES = ("mmsm",)
    OUTPUT_TOOLTIPS = ("The MMSM, for MMIG MMSM Apply.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mmsm_name": (adapter_files(MMSM_FORMAT), {
                "tooltip": "An MMSM .safetensors in ComfyUI/models/mmig/ (files whose metadata marks them as MMSM)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, mmsm_name):
        if folder_paths.get_full_path("mmig", mmsm_name) is None:
            return (f"MMSM '{mmsm_name}' not found. Searched: {', '.join(_host.model_search_paths('mmig'))}. "
                    f"{MMSM_SOURCE}")
        return True

    def load(self, mmsm_name):
        from ..mmig_core.mmsm import load_mmsm
        path = folder_paths.get_full_path("mmig", mmsm_name)
        if path is None:
            raise ModelFilesError(f"MMSM '{mmsm_name}' not found. {MMSM_SOURCE}")
        mmsm = load_mmsm(path)
        return (LoadedMMSM(mmsm, mmsm_name, _host.managed(mmsm)),)


class MMIG_MMSMApply:
    DESCRIPTION = ("Patches MMSM into a copy of the MODEL at its insertion point (by default output block 0, where "
                   "the UNet's mid-block output enters the decoder): e_6 = e_1 + strength x DomainDecoder(...). "
                   "The positive (cond) batch gets the LLM embedding; the negative (uncond) batch gets a zero "
                   "embedding, as for an empty prompt. An untrained MMSM changes nothing. The host's memory "
                   "manager loads and offloads the MMSM together with the UNet, in the UNet's dtype.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A patched copy of the model; the input model is unchanged.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The SDXL model to patch (it is cloned, never changed)."}),
            "mmsm": ("MMIG_MMSM", {"tooltip": "From MMIG MMSM Loader; built for this UNet's width."}),
            "llm_embeds": ("MMIG_LLM_EMBEDS", {"tooltip": "e_llm from MMIG MLLM Describe or MMIG MUMU Encode: one "
                                                          "prompt, or one per latent in the batch."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Scales MMSM's correction to the features; 0 leaves the model as is."}),
        }}

    def apply(self, model, mmsm, llm_embeds, strength):
        config = mmsm.mmsm.config
        output_blocks = getattr(getattr(model.model, "diffusion_model", None), "output_blocks", None)
        if output_blocks is not None:
            check_insertion_point(config, len(output_blocks), mmsm.name)
        expected = mid_block_channels(model)
        if config.insertion_index == 0 and expected is not None and expected != config.feature_channels:
            raise ValueError(f"the MMSM '{mmsm.name}' was built for a UNet with {config.feature_channels} mid-block "
                             f"channels, but this model has {expected}: use an MMSM trained for this model")
        patch = HostManagedPatch(mmsm.mmsm, llm_embeds.hidden_states, llm_embeds.attention_mask, strength)
        patched = model.clone()
        patched.set_model_output_block_patch(patch)
        if mmsm.patcher is not None and hasattr(patched, "set_additional_models"):  # newer hosts only
            patched.set_additional_models("mmig_mmsm", [mmsm.patcher])
        return (patched,)


NODE_CLASS_MAPPINGS = {"MMIG_MMSMLoader": MMIG_MMSMLoader, "MMIG_MMSMApply": MMIG_MMSMApply}
NODE_DISPLAY_NAME_MAPPINGS = {"MMIG_MMSMLoader": "MMIG MMSM Loader", "MMIG_MMSMApply": "MMIG MMSM Apply"}
