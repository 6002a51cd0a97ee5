"""A bench-only recipe: an SDXL-style UNet learning noise prediction (L_SDM), every UNet weight trainable.

`recipe.sdxl` set: the pack's tiny SDXL UNet (5.7 M parameters, SDXL's 2048-d context and micro-conditioning),
loaded and conditioned through training/sdxl.py as the mmig and mumu recipes do. Empty: a UNet2DConditionModel
of the same shape built from a config (where the tiny models cannot be built). Run by bench/training.py through `python -m training bench._training_unet`.
FSDP shards each ResNet and transformer block as its own unit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training.recipe import Recipe, RunContext, trainable_summary


@dataclass
class RecipeConfig:
    sdxl: str = ""  # the tiny SDXL checkpoint; empty: the diffusers toy UNet below
    latent: int = 8  # latent side (pixels / 8)
    items: int = 64
    lr: float = 1e-4


class NoisePrediction(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        from training.sdxl import noise_scheduler
        self.unet, self.scheduler = unet, noise_scheduler()

    def forward(self, batch, step):
        from training.sdxl import add_noise, added_conditioning, denoising_loss, empty_text_conditioning
        latents = batch["latents"]
        noisy, noise, timesteps = add_noise(self.scheduler, latents, batch)
        cond = empty_text_conditioning(latents.shape[0], self.unet, latents.device, latents.dtype)
        side = latents.shape[-1] * 8
        eps = self.unet(noisy, timesteps, cond.context,
                        added_cond_kwargs=added_conditioning(cond.pooled, side, side)).sample
        loss = denoising_loss(eps, noise)
        return loss, {"sdm": float(loss.detach())}


class RandomLatents(torch.utils.data.Dataset):
    def __init__(self, config: RecipeConfig):
        g = torch.Generator().manual_seed(7)
        self.latents = torch.randn(config.items, 4, config.latent, config.latent, generator=g)

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i]}


def toy_unet():
    """The tiny SDXL's UNet shape built from a config (no checkpoint): SDXL's 2048-d context, 1280-d pooled
    vector and micro-conditioning, 32/64/64 channels, one transformer layer at the two lower levels."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        cross_attention_dim=2048, attention_head_dim=(1, 1, 1), transformer_layers_per_block=(1, 1, 1),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        use_linear_projection=True)


def build(config: RecipeConfig, ctx: RunContext) -> Recipe:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    if config.sdxl:
        from training.sdxl import load_unet
        unet = load_unet(config.sdxl)
    else:
        unet = toy_unet()
    module = NoisePrediction(unet.requires_grad_(True))
    return Recipe(module=module, dataset=RandomLatents(config), export=lambda m, out_dir: [],
                  param_groups=lambda m: [{"name": "unet", "params": list(m.unet.parameters()), "lr": config.lr}],
                  describe=trainable_summary(module), fsdp_wrap=(ResnetBlock2D, BasicTransformerBlock))
