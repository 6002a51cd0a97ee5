"""LoRA fixtures from the newest ComfyUI (v0.8.0): its LoRA key map on the real SDXL UNet, and the weights its own
LoRA loader gives on the tiny SDXL for each LoRA format (where the pinned 2024-03 host differs, e.g. DoRA, this
is what the pack must match).

    python -m devtools.conformance lora --reference <checkout of pollockjj/ComfyUI>

Writes tests/conformance/lora/:
- `sdxl_unet_lora_keys.json`: the host's `model_lora_keys_unet` on the real SDXL base UNet config, built on the
  meta device (no weights): every kohya name `lora_unet_<ldm>` with its weight's shape, and every diffusers
  module name the host maps (`lora_unet_<diffusers>`) with its ldm module.
- `formats.json`: per format of devtools/tiny_lora.FORMATS (same seeds), per target weight of the tiny SDXL,
  the weight the host's `load_lora` + `calculate_weight` give at strengths 1.0 and 0.7: sums and the values at
  fixed sample positions (KB, not the full tensors), and a checksum of the base weight it started from.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

REFERENCE = "pollockjj/ComfyUI"

# The SDXL base 1.0 UNet as the host detects it from the checkpoint (comfy/model_detection.py's output).
SDXL_UNET_CONFIG = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "channel_mult": [1, 2, 4],
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
    "context_dim": 2048, "adm_in_channels": 2816, "use_linear_in_transformer": True, "num_head_channels": 64,
    "num_heads": -1, "use_temporal_attention": False, "use_temporal_resblock": False, "image_size": 32,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential", "use_checkpoint": False,
}
STRENGTHS = (1.0, 0.7)
SAMPLES = 12
FORMAT_SEED = 5


def sample_positions(numel: int, count: int = SAMPLES) -> list[int]:
    """Fixed positions in a flattened weight (the same in the fixture and the test), first and last included."""
    import torch
    generator = torch.Generator().manual_seed(numel)
    picked = torch.randperm(numel, generator=generator)[:count - 2].tolist()
    return sorted({0, numel - 1, *picked})


def summary(tensor) -> dict:
    flat = tensor.double().flatten()
    positions = sample_positions(flat.numel())
    return {"shape": list(tensor.shape), "sum": flat.sum().item(), "abs_sum": flat.abs().sum().item(),
            "positions": positions, "values": flat[positions].tolist()}


def _import_host(root: Path):
    import sys
    sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401  (argument parsing stays off)
    import comfy.cli_args
    import torch
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_detection
    return comfy


def _key_manifest(comfy) -> dict:
    config = comfy.model_detection.model_config_from_unet_config(SDXL_UNET_CONFIG)
    model = config.get_model({}, device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    ldm, diffusers = {}, {}
    for name, target in key_map.items():
        if not name.startswith("lora_unet_") or not target.startswith("diffusion_model."):
            continue
        module = target[len("diffusion_model."):-len(".weight")]
        if name == "lora_unet_" + module.replace(".", "_"):
            ldm[module] = shapes[target]
    for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(config.unet_config).items():
        if (diffusers_key.endswith(".weight") and "lora_unet_" + diffusers_key[:-7].replace(".", "_") in key_map
                and "diffusion_model." + ldm_key in shapes):  # the host's table also names weights SDXL lacks
            diffusers[diffusers_key[:-len(".weight")]] = ldm_key[:-len(".weight")]
    return {"unet_config": SDXL_UNET_CONFIG, "model_class": type(config).__name__,
            "parameters": sum(math.prod(s) for k, s in shapes.items() if k.startswith("diffusion_model.")),
            "ldm_modules": dict(sorted(ldm.items())), "diffusers_modules": dict(sorted(diffusers.items()))}


def _formats(comfy) -> dict:
    import torch

    from devtools.tiny_lora import FORMATS, format_state_dict, unet_tensors
    from devtools.tiny_models import TINY_MODELS_DIR, TINY_SDXL

    checkpoint = TINY_MODELS_DIR / TINY_SDXL
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint} is missing: run `python -m devtools.tiny_models` first")
    tensors = unet_tensors(checkpoint)
    out = {}
    for fmt in FORMATS:
        state = format_state_dict(tensors, fmt, seed=FORMAT_SEED)
        modules = {k.split(".", 1)[0] for k in state}
        # The host's kohya rule for ldm names (the key manifest checks it on the real SDXL).
        to_load = {m: "diffusion_model." + _ldm(m, tensors) + ".weight" for m in modules}
        patches = comfy.lora.load_lora(state, to_load, log_missing=False)
        targets = {}
        for key, patch in sorted(patches.items()):
            if fmt in ("locon", "tucker_locon") and not _kept(key[len("diffusion_model."):-len(".weight")], tensors):
                continue
            base = tensors[key[len("diffusion_model."):]].float()
            entry = {"base": summary(base)}
            for strength in STRENGTHS:
                weight = comfy.lora.calculate_weight([(strength, patch, 1.0, None, None)], base.clone(), key,
                                                     intermediate_dtype=torch.float32)
                entry[str(strength)] = summary(weight)
            targets[key] = entry
        out[fmt] = {"seed": FORMAT_SEED, "targets": targets}
    return out


def _kept(module: str, tensors: dict) -> bool:
    """For the files on every layer: the 3x3 convs (where Tucker differs) and the usual LoRA targets."""
    from devtools.tiny_lora import LORA_TARGETS
    weight = tensors.get(module + ".weight")
    return module in LORA_TARGETS or (weight is not None and weight.ndim == 4 and weight.shape[-1] == 3)


def _ldm(kohya: str, tensors: dict) -> str:
    flat = kohya[len("lora_unet_"):]
    return next(k[:-len(".weight")] for k in tensors if k.endswith(".weight") and
                k[:-len(".weight")].replace(".", "_") == flat)


def regenerate(reference: Path, out: Path) -> None:
    comfy = _import_host(reference)
    version = (reference / "comfyui_version.py").read_text().split('"')[1]
    manifest = _key_manifest(comfy)
    manifest["host_version"] = version
    (out / "sdxl_unet_lora_keys.json").write_text(json.dumps(manifest, separators=(",", ":")) + "\n")
    formats = {"host_version": version, "strengths": list(STRENGTHS), "formats": _formats(comfy)}
    (out / "formats.json").write_text(json.dumps(formats, separators=(",", ":")) + "\n")
