"""Tiny random LoRAs for the tiny SDXL UNet, written in the kohya, diffusers and peft layouts (tests only)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from mmig_core.lora import ldm_to_diffusers_module, save_lora_file

CHECKPOINT_UNET_PREFIX = "model.diffusion_model."
# Linear layers (attention, feed-forward, projections, time embedding) and conv layers (3x3 and 1x1), across
# down, middle and up blocks, the upsampler included (its ldm index is the easiest to get wrong).
LORA_TARGETS = (
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0", "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj",
    "input_blocks.4.1.proj_in", "middle_block.1.transformer_blocks.0.attn2.to_v", "input_blocks.4.0.emb_layers.1",
    "output_blocks.3.1.transformer_blocks.0.attn1.to_v",
    "input_blocks.4.0.in_layers.2", "input_blocks.4.0.skip_connection", "middle_block.2.out_layers.3",
    "output_blocks.2.2.conv", "output_blocks.1.0.skip_connection",
)


def unet_weights(checkpoint) -> dict:
    """{ldm module path: weight} of a checkpoint's UNet, read with safetensors."""
    with safe_open(str(checkpoint), "pt") as f:
        return {k[len(CHECKPOINT_UNET_PREFIX):-len(".weight")]: f.get_tensor(k) for k in f.keys()
                if k.startswith(CHECKPOINT_UNET_PREFIX) and k.endswith(".weight")}


def random_lora(weights: dict, targets=LORA_TARGETS, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """{ldm module path: (down A, up B, alpha)}: conv targets get a conv LoRA (kernel in A, 1x1 B)."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for module in targets:
        shape = weights[module].shape
        down_shape = (rank, *shape[1:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        lora[module] = (torch.randn(down_shape, generator=generator) * 0.1,
                        torch.randn(up_shape, generator=generator) * 0.1, alpha)
    return lora


def lora_state_dict(lora: dict, layout: str) -> dict:
    """The LoRA in one layout: kohya (ldm names), diffusers (`unet.…`, `.lora.down`/`.lora.up`, alpha) or peft
    (`base_model.model.…`, `lora_A`/`lora_B`; peft keeps alpha outside the file, so it is folded into B)."""
    state = {}
    for module, (down, up, alpha) in lora.items():
        rank = down.shape[0]
        if layout == "kohya":
            name = "lora_unet_" + module.replace(".", "_")
            state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                          f"{name}.alpha": torch.tensor(alpha)})
        elif layout == "diffusers":
            name = "unet." + ldm_to_diffusers_module(module)
            state.update({f"{name}.lora.down.weight": down, f"{name}.lora.up.weight": up,
                          f"{name}.alpha": torch.tensor(alpha)})
        elif layout == "peft":
            name = "base_model.model." + ldm_to_diffusers_module(module)
            state.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up * (alpha / rank)})
        else:
            raise ValueError(layout)
    return state


def write_lora(lora: dict, layout: str, path: Path) -> Path:
    save_lora_file(lora_state_dict(lora, layout), path)
    return path


def expected_merge(weights: dict, lora: dict, strength: float) -> dict:
    """W + s·(α/r)·B·A per module, computed in float64 without the pack's code."""
    merged = {}
    for module, (down, up, alpha) in lora.items():
        weight = weights[module].double()
        product = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
        merged[module] = weight + strength * (alpha / down.shape[0]) * product.reshape(weight.shape)
    return merged


def main(argv=None) -> None:
    """Builds the tiny kohya-layout LoRA for the tiny SDXL, which must already sit in the same models folder."""
    import argparse

    from devtools.tiny_models import TINY_SDXL

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path, help="where to write it, e.g. MODELS/loras/mmig-tiny-lora.safetensors")
    out = parser.parse_args(argv).out
    checkpoint = out.resolve().parent.parent / TINY_SDXL
    write_lora(random_lora(unet_weights(checkpoint), seed=1), "kohya", out)


if __name__ == "__main__":
    main()
