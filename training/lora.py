"""peft LoRA on the VLM and the diffusers UNet for the `mumu` and `mmig` recipes: inject, write in the pack's LoRA
formats, and read a written LoRA back in (a later stage continues an earlier one).

Files use the pack's LoRA layouts (`mmig_core.lora`): the UNet LoRA in the kohya layout with ldm names (what
MMIG MUMU Loader, MMIG LoRA Merge and the host's Load LoRA read), the VLM LoRA with peft names of the VLM's
own weights. Each module carries its `.alpha`: peft keeps alpha in a config, the files keep it per module.
"""
from __future__ import annotations

import torch

from mmig_core.lora import LoRAError, build_key_table, build_name_table, match_lora, to_kohya_state_dict

ADAPTER_NAME = "default"  # peft's adapter name


def inject_lora(model: torch.nn.Module, rank: int, alpha: float, targets) -> None:
    """Rank-`rank` LoRA (B = 0: the model is unchanged until trained) on the modules `targets` names."""
    from peft import LoraConfig, inject_adapter_in_model
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), model)


def lora_state(model: torch.nn.Module, alpha: float, prefix: str = "") -> dict[str, torch.Tensor]:
    """peft's LoRA tensors under `prefix`, with an explicit `.alpha` per module."""
    from peft import get_peft_model_state_dict
    state = {prefix + k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        state[key[:-len(".lora_A.weight")] + ".alpha"] = torch.tensor(float(alpha))
    return state


def unet_lora_file_state(unet, alpha: float) -> dict[str, torch.Tensor]:
    """The diffusers UNet's LoRA in the kohya layout, ldm names."""
    up_with_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    return to_kohya_state_dict(lora_state(unet, alpha, prefix="unet."), up_with_attention)


def vlm_lora_file_state(vlm_model, alpha: float) -> dict[str, torch.Tensor]:
    return lora_state(vlm_model, alpha, prefix="base_model.model.")


def _base_shapes(model: torch.nn.Module) -> dict[str, tuple]:
    """The model's weights under their names before LoRA injection (peft moves them to `.base_layer`)."""
    return {name.replace(".base_layer.", "."): tuple(p.shape) for name, p in model.named_parameters()
            if "lora_" not in name}


@torch.no_grad()
def load_lora_into(model: torch.nn.Module, state_dict: dict, *, unet: bool, label: str) -> int:
    """Set the injected LoRA layers from a LoRA file's tensors (any layout the pack reads); returns how many.

    ΔW is kept: B is rescaled by (file alpha / file rank) / (this run's alpha / rank). Every module must match
    a layer that has a LoRA of the same rank, else nothing would continue what was trained."""
    shapes = _base_shapes(model)
    match = match_lora(state_dict, shapes, build_key_table(shapes) if unet else build_name_table(shapes))
    if match.unmatched or not match.matched:
        raise LoRAError(f"{label}: {len(match.unmatched)} of {len(match.matched) + len(match.unmatched)} LoRA "
                        f"modules match no layer of this model\n{match.report()}")
    for module, key, _shape in match.matched_modules:
        layer = model.get_submodule(key[:-len(".weight")])
        if not hasattr(layer, "lora_A") or ADAPTER_NAME not in layer.lora_A:
            raise LoRAError(f"{label}: {module.name} targets {key}, which this run trains without a LoRA: add it "
                            f"to the LoRA targets")
        down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        if module.down.shape[0] != down.shape[0]:
            raise LoRAError(f"{label}: {module.name} has rank {module.down.shape[0]}, this run's LoRA rank "
                            f"{down.shape[0]}: set the rank to match")
        file_scale = (module.alpha if module.alpha is not None else module.down.shape[0]) / module.down.shape[0]
        down.copy_(module.down.reshape(down.shape))
        up.copy_(module.up.reshape(up.shape) * (file_scale / layer.scaling[ADAPTER_NAME]))
    return len(match.matched_modules)
