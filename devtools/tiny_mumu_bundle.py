"""Builds the tiny MUMU bundle (adapter + UNet LoRA + VLM LoRA + manifest) from the tiny SDXL, Idefics2 and
adapter, which must already sit in the same models folder: `python -m devtools.tiny_mumu_bundle OUT_FOLDER`."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from devtools.tiny_lora import random_lora, unet_weights, write_lora
from devtools.tiny_models import TINY_IDEFICS2, TINY_MUMU_ADAPTER, TINY_SDXL
from mmig_core.lora import save_lora_file
from mmig_core.mumu_bundle import write_manifest


def tiny_vlm_lora(vlm_folder: Path, rank: int = 4, seed: int = 2) -> dict:
    """A peft-layout LoRA on the attention projections of the VLM's first text layer."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    with safe_open(str(vlm_folder / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if "text_model.layers.0.self_attn" in key and key.endswith(".weight"):
                out_features, in_features = f.get_slice(key).get_shape()
                name = "base_model.model." + key[:-len(".weight")]
                state[name + ".lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
                state[name + ".lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
    return state


def build_bundle(folder: Path, models: Path, vlm_base: str | None = None, seed: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(models / TINY_MUMU_ADAPTER, folder / "adapter.safetensors")
    write_lora(random_lora(unet_weights(models / TINY_SDXL), seed=seed), "kohya", folder / "unet_lora.safetensors")
    save_lora_file(tiny_vlm_lora(models / TINY_IDEFICS2), folder / "vlm_lora.safetensors")
    return write_manifest(folder, vlm_base or TINY_IDEFICS2.split("/")[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the bundle folder, e.g. MODELS/mmig/mmig-tiny-mumu-bundle")
    out = parser.parse_args(argv).out.resolve()
    build_bundle(out, out.parent.parent)


if __name__ == "__main__":
    main()
