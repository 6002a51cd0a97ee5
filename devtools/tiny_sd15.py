"""A tiny random-weight checkpoint in the real SD1.x single-file layout, for tests.

SD1.x's block layout (four levels with channel_mult 1, 2, 4, 4, two res blocks each, cross-attention
at the first three levels and in the middle, 8 heads, conv proj_in/proj_out) and its interface widths
(768-d cross-attention context, 4 latent channels, 8x VAE downscale, 49408 x 77 CLIP-L tokens) with
32 model channels instead of 320. The keys are the original LDM ones (model.diffusion_model.*,
cond_stage_model.transformer.*, first_stage_model.*), so the host's checkpoint loader reads it (once
devtools/tiny_host_support has registered the 32-channel config) and diffusers' single-file
converter turns the same UNet weights into a UNet2DConditionModel (see `diffusers_unet`).

    python -m devtools.tiny_sd15 OUT_FILE [--seed N]
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from devtools import tiny_sdxl
from devtools.tiny_builder_cli import run_builder

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."
SD15_VAE_SCALE = 0.18215  # SD1.x's latent scale, as the host's TAESD loader sets it for SD1 latents

# v1-inference.yaml's model.params.unet_config.params with the channels shrunk: the form diffusers'
# single-file loader reads (create_unet_diffusers_config_from_ldm).
LDM_UNET_PARAMS = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
    "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768, "use_checkpoint": False,
    "legacy": False,
}
LDM_VAE_DDCONFIG = {"ch_mult": [1, 2, 4, 4]}  # only the downscale (8x) is read by the converter
# The cross-attention query/key weights are drawn wider than the rest (std 0.02): with 0.02 every pixel
# attends to the 77 context tokens almost uniformly, and attention guidance has nothing to act on.
CROSS_ATTENTION_QK_STD = 0.08


def unet_build_config() -> dict:
    """The host's UNetModel arguments for LDM_UNET_PARAMS (per-block transformer depths, as the host detects)."""
    p = LDM_UNET_PARAMS
    levels = len(p["channel_mult"])
    with_attention = [2 ** level in p["attention_resolutions"] for level in range(levels)]
    n = p["num_res_blocks"]
    return dict(image_size=p["image_size"], in_channels=p["in_channels"], out_channels=p["out_channels"],
                model_channels=p["model_channels"], num_res_blocks=[n] * levels, channel_mult=p["channel_mult"],
                transformer_depth=[int(a) for a in with_attention for _ in range(n)],
                transformer_depth_output=[int(a) for a in with_attention for _ in range(n + 1)],  # popped from the end
                transformer_depth_middle=1, context_dim=p["context_dim"], use_linear_in_transformer=False,
                adm_in_channels=None, use_temporal_attention=False, use_spatial_transformer=True, legacy=False,
                num_classes=None, use_checkpoint=False, use_temporal_resblock=False, num_heads=p["num_heads"],
                num_head_channels=-1)


@torch.no_grad()
def _unet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**unet_build_config(), dtype=torch.float32, device="cpu",
                     operations=comfy.ops.disable_weight_init)
    tiny_sdxl._initialise(unet, tiny_sdxl._generator(seed, "sd15-unet"))
    gen = tiny_sdxl._generator(seed, "sd15-cross-attention")
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_q", "attn2.to_k")):
            module.weight.copy_(torch.empty(module.weight.shape).normal_(0.0, CROSS_ATTENTION_QK_STD, generator=gen))
    return {UNET_PREFIX + k: v.float().contiguous() for k, v in unet.state_dict().items()}


@torch.no_grad()
def _vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from comfy.taesd.taesd import TAESD

    vae = TAESD()
    tiny_sdxl._initialise(vae, tiny_sdxl._generator(seed, "sd15-vae"))
    vae.vae_scale.fill_(SD15_VAE_SCALE)
    vae.taesd_decoder[-1].bias.fill_(0.5)  # mid-grey images
    return {VAE_PREFIX + k: v.float().contiguous() for k, v in vae.state_dict().items()}


def _clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """SD1.x's CLIP-L (the tiny CLIP-L of the SDXL support files: 768 wide, 3 layers), no projection."""
    hf = tiny_sdxl._text_model(tiny_sdxl.load_support_config("clip_l"), seed, "sd15-clip_l")
    hf.pop("text_projection.weight")
    out = {CLIP_PREFIX + k: v for k, v in hf.items()}
    out[CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return out


def build_tiny_sd15(path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    tiny_sdxl.import_host()
    path = Path(path)
    state_dict = {}
    for part in (_unet_state_dict, _clip_state_dict, _vae_state_dict):
        state_dict.update(part(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(state_dict, str(partial), metadata={"format": "pt"})
    partial.replace(path)
    return path


def diffusers_unet(path: Path):
    """The UNet of the checkpoint at `path` as a diffusers UNet2DConditionModel, converted by diffusers'
    own single-file code from the LDM config above (not by the host's key map)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from safetensors.torch import load_file

    checkpoint = {k: v for k, v in load_file(str(path)).items() if k.startswith(UNET_PREFIX)}
    original = {"model": {"params": {"unet_config": {"params": LDM_UNET_PARAMS},
                                     "first_stage_config": {"params": {"ddconfig": LDM_VAE_DDCONFIG}}}}}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    unet = UNet2DConditionModel(**config)
    state = convert_ldm_unet_checkpoint(checkpoint, config)
    unet.load_state_dict(state, strict=True)
    return unet.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    run_builder(build_tiny_sd15, "tiny SD1.x checkpoint", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    main()
