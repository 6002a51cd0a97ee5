"""Real-shape helpers: the host's own SD1.5 and SDXL UNets on the meta device (every weight the published shape,
no memory behind it), and a meta-device forward that drives the host's own patch lookup.

The UNet configs are the host's: `comfy.model_detection.unet_config_from_diffusers_unet` picks its SD15 / SDXL
config from the published diffusers layout (which down blocks hold how many transformer blocks, the context width,
the `add_embedding` input), `model_config_from_unet_config` picks the supported model class, and that class builds
its BaseModel on the meta device, exactly as a checkpoint load would before the weights arrive."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
META = torch.device("meta")

# The published diffusers UNet layouts (unet/config.json of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0): per down block (resnets, transformer blocks of each attention).
PUBLISHED_UNETS = {
    "SD15": dict(down=[(2, [1, 1]), (2, [1, 1]), (2, [1, 1]), (2, [])], context=768, adm=None, side_px=512),
    "SDXL": dict(down=[(2, []), (2, [2, 2]), (2, [10, 10])], context=2048, adm=2816, side_px=1024),
}


def load_json(name: str):
    return json.loads((DATA / name).read_text())


def _diffusers_skeleton(down, context, adm) -> dict:
    """Just the keys and shapes the host's diffusers-layout detection reads, as meta tensors."""
    sd = {"conv_in.weight": torch.empty(320, 4, 3, 3, device=META)}
    for i, (resnets, attentions) in enumerate(down):
        for r in range(resnets):
            sd[f"down_blocks.{i}.resnets.{r}.conv1.weight"] = torch.empty(1, device=META)
        for a, depth in enumerate(attentions):
            for t in range(depth):
                key = f"down_blocks.{i}.attentions.{a}.transformer_blocks.{t}.attn2.to_k.weight"
                sd[key] = torch.empty(1, context, device=META)
    if adm:
        sd["add_embedding.linear_1.weight"] = torch.empty(1280, adm, device=META)
    return sd


class RealUNet:
    """One host-built UNet on the meta device, wrapped in the host's ModelPatcher."""

    def __init__(self, name: str):
        import comfy.model_detection
        import comfy.model_patcher

        self.name = name
        facts = PUBLISHED_UNETS[name]
        self.side_px = facts["side_px"]
        self.context_dim = facts["context"]
        unet_config = comfy.model_detection.unet_config_from_diffusers_unet(
            _diffusers_skeleton(facts["down"], facts["context"], facts["adm"]))
        assert unet_config is not None, f"the host has no config for the published {name} layout"
        self.unet_config = unet_config
        self.model_config = comfy.model_detection.model_config_from_unet_config(unet_config)
        self.base = self.model_config.get_model({}, "", device=META)
        self.diffusion_model = self.base.diffusion_model
        self.patcher = comfy.model_patcher.ModelPatcher(self.base, load_device=torch.device("cpu"),
                                                        offload_device=torch.device("cpu"))

    def inputs(self, batch: int = 2, tokens: int = 77):
        side = self.side_px // 8
        x = torch.empty(batch, 4, side, side, device=META)
        context = torch.empty(batch, tokens, self.context_dim, device=META)
        y = None
        if self.unet_config.get("adm_in_channels"):
            y = torch.empty(batch, self.unet_config["adm_in_channels"], device=META)
        return x, context, y

    def forward(self, transformer_options: dict, batch: int = 2, cond_or_uncond=(1, 0)):
        """One UNet forward on the meta device with these transformer_options (the host's lookup of
        patches_replace / output_block_patch runs as in sampling). Every block without a replacement of its own gets
        a plain SDPA one (attn1 everywhere, attn2 where the pack patches nothing): the host's own sub-quadratic
        attention asks the device for its free memory, which the meta device cannot answer. Blocks the pack
        patches keep its replacement, so which of them the host's lookup calls is the host's own choice."""
        x, context, y = self.inputs(batch)
        options = _with_meta_attention(transformer_options, len(self.diffusion_model.output_blocks))
        options["cond_or_uncond"] = list(cond_or_uncond)
        with torch.no_grad():
            return self.diffusion_model(x, torch.empty(batch, device=META), context=context, y=y,
                                        transformer_options=options)

    def apply_model(self, attn2_log: list | None = None):
        """apply_model(x, sigma, **c) as the host's model function wrapper hands it on, on the meta device;
        attn2 calls at blocks the pack does not patch are logged into `attn2_log`."""
        def apply_model(x, sigma, **c):
            options = _with_meta_attention(c["transformer_options"], len(self.diffusion_model.output_blocks),
                                           attn2_log)
            return self.diffusion_model(x, torch.empty(x.shape[0], device=META), context=c["c_crossattn"],
                                        y=c.get("y"), transformer_options=options)
        return apply_model


def sdpa_replacement(q, k, v, extra_options):
    heads = extra_options["n_heads"]
    b = q.shape[0]
    qh, kh, vh = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, q.shape[1], -1)


def logging_sdpa(log: list):
    """An SDPA replacement that logs (block, transformer index, queries) of each call."""
    def replacement(q, k, v, extra_options):
        log.append((tuple(extra_options["block"]), extra_options["block_index"], q.shape[1]))
        return sdpa_replacement(q, k, v, extra_options)
    return replacement


def _with_meta_attention(transformer_options: dict, blocks: int, attn2_log: list | None = None) -> dict:
    options = dict(transformer_options)
    replace = {kind: dict(patches) for kind, patches in options.get("patches_replace", {}).items()}
    for kind in ("attn1", "attn2"):  # the pack's own replacements stay; the other blocks get plain SDPA
        patches = replace.setdefault(kind, {})
        default = logging_sdpa(attn2_log) if kind == "attn2" and attn2_log is not None else sdpa_replacement
        for key in [("input", i) for i in range(blocks)] + [("middle", 0)] + [("output", i) for i in range(blocks)]:
            patches.setdefault(key, default)
    options["patches_replace"] = replace
    return options
