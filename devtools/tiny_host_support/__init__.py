"""Test-only ComfyUI custom node: teaches the host the tiny SDXL and SD1.x checkpoints of
devtools/tiny_sdxl.py and devtools/tiny_sd15.py.

Importing it inserts `TinySDXL` and `TinySD15` at the front of comfy.supported_models.models, the list the host's
checkpoint detection walks, so CheckpointLoaderSimple and comfy.sd.load_checkpoint_guess_config
load the tiny checkpoint like any SDXL one. No host file is edited and no node is added. The
architecture is read from the JSON files beside this module, which the builder reads too.
"""
import inspect
import json
import os

import torch

import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

_HERE = os.path.dirname(os.path.realpath(__file__))
CLIP_L_CONFIG = os.path.join(_HERE, "clip_l_config.json")
CLIP_G_CONFIG = os.path.join(_HERE, "clip_g_config.json")


def _load_json(name):
    with open(os.path.join(_HERE, name)) as f:
        return json.load(f)


# Exactly what comfy.model_detection.detect_unet_config reports for the tiny UNet; no real model has
# 32 model channels, so this matches nothing else.
TINY_UNET_CONFIG = _load_json("unet_config.json")
CLIP_G_WIDTH = _load_json("clip_g_config.json")["hidden_size"]


def _accepted(fn, kwargs):
    """The keyword arguments `fn` takes: hosts differ (newer ones add model_options=..., etc.)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _text_encoder(name, config_path, device, dtype, extra, **choices):
    # SDXL's layer choices for both encoders: penultimate hidden state, no final layer norm on it.
    # (SDClipModel asserts abs(layer_idx) < num_layers, hence 3 layers in the JSON files, not 2.)
    kwargs = dict(extra, device=device, dtype=dtype, layer="hidden", layer_idx=-2,
                  layer_norm_hidden_state=False, textmodel_json_config=config_path, **choices)
    # Hosts that pass model_options key per-encoder settings (clip_g_model_config, ...) by its
    # model_name, which they set for their own CLIP-L / CLIP-G but not for a custom config file.
    kwargs["model_options"] = {**extra.get("model_options", {}), "model_name": name}
    return comfy.sd1_clip.SDClipModel(**_accepted(comfy.sd1_clip.SDClipModel.__init__, kwargs))


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    """The host's SDXL dual text encoder with tiny CLIP-L / CLIP-G inside."""

    def __init__(self, device="cpu", dtype=None, **kwargs):
        # Skip SDXLClipModel.__init__: it would first build the full-size 32-layer CLIP-G.
        torch.nn.Module.__init__(self)
        self.clip_l = _text_encoder("clip_l", CLIP_L_CONFIG, device, dtype, kwargs)
        self.clip_g = _text_encoder("clip_g", CLIP_G_CONFIG, device, dtype, kwargs,
                                    special_tokens={"start": 49406, "end": 49407, "pad": 0})
        self.dtypes = {dtype}  # newer hosts read this; harmless on older ones

    def load_sd(self, sd):
        # The host routes by "layers.30" keys, which a 3-layer CLIP-G lacks; route by width instead.
        width = sd["text_model.final_layer_norm.weight"].shape[0]
        return (self.clip_g if width == CLIP_G_WIDTH else self.clip_l).load_sd(sd)


class TinySDXL(comfy.supported_models.SDXL):
    """The host's SDXL model config (latent format, adm, key layout), matched to the tiny UNet."""

    MMIG_TINY = True
    unet_config = dict(TINY_UNET_CONFIG)

    def clip_target(self, *args, **kwargs):  # newer hosts pass the state dict
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClipModel)


class TinySD1ClipModel(comfy.sd1_clip.SD1ClipModel):
    """The host's SD1.x text encoder with the tiny CLIP-L (768 wide) inside; SD1.x takes its last layer."""

    def __init__(self, device="cpu", dtype=None, **kwargs):
        torch.nn.Module.__init__(self)  # SD1ClipModel.__init__ would build the full-size CLIP-L
        self.clip_name, self.clip = "l", "clip_l"
        kwargs = dict(kwargs, device=device, dtype=dtype, textmodel_json_config=CLIP_L_CONFIG)
        kwargs["model_options"] = {**kwargs.get("model_options", {}), "model_name": "clip_l"}
        self.clip_l = comfy.sd1_clip.SDClipModel(**_accepted(comfy.sd1_clip.SDClipModel.__init__, kwargs))
        self.dtypes = {dtype}


class TinySD15(comfy.supported_models.SD15):
    """The host's SD1.x model config (latent format, key layout, 8 heads) for the 32-channel tiny UNet."""

    MMIG_TINY_SD15 = True
    unet_config = {**comfy.supported_models.SD15.unet_config, "model_channels": 32}

    def clip_target(self, *args, **kwargs):
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinySD1ClipModel)


def register():
    """Put TinySDXL and TinySD15 first in the host's model list, once even if imported under two module names."""
    models = comfy.supported_models.models
    if not any(getattr(m, "MMIG_TINY", False) for m in models):
        models.insert(0, TinySDXL)
    if not any(getattr(m, "MMIG_TINY_SD15", False) for m in models):
        models.insert(0, TinySD15)


register()
