"""DiffRIR: restores the texture, brightness and contrast seams of inpainting/outpainting (LLMGA §3.4).

Official code and checkpoints: Zj-BinXia/DiffRIR (`inference_diffrir.py` is what the restore node follows).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths

from . import _host
from ..mmig_core import diffrir as core
from ..mmig_core.model_files import ModelFilesError

DIFFRIR_SOURCE = ("Train one with `python -m training.diffrir` (it writes the .safetensors this node reads), or use "
                  "the official x1 DiffRIR checkpoint from Zj-BinXia/DiffRIR (github.com/Zj-BinXia/DiffRIR) as a "
                  ".pth file, or converted with `python -m mmig_core.diffrir.convert`.")
DIFFRIR_EXPECTED = "a DiffRIR .safetensors file (or the official x1 .pth checkpoint)"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


def list_diffrir_files() -> list[str]:
    return sorted(f for f in folder_paths.get_filename_list("diffrir") if f.lower().endswith(WEIGHT_SUFFIXES))


def missing_message(name: str) -> str:
    searched = ", ".join(_host.model_search_paths("diffrir"))
    return (f"DiffRIR model '{name}' not found. Searched: {searched}. Expected {DIFFRIR_EXPECTED} there. "
            f"{DIFFRIR_SOURCE}")


@dataclass
class LoadedDiffRIR:
    """The MMIG_DIFFRIR value: the network and the host's memory-managed handle on it."""
    model: core.DiffRIR
    patcher: object
    name: str


class MMIG_DiffRIRLoader:
    DESCRIPTION = ("Loads a DiffRIR restoration network from ComfyUI/models/diffrir/: the pack's .safetensors "
                   "(sizes in its metadata) or the official x1 checkpoint of Zj-BinXia/DiffRIR (.pth with "
                   "params_ema or params, read as tensors only; sizes read from its shapes).")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MMIG_DIFFRIR",)
    RETURN_NAMES = ("diffrir",)
    OUTPUT_TOOLTIPS = ("The loaded DiffRIR network, for MMIG DiffRIR Restore.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (list_diffrir_files(), {
                "tooltip": "A file in ComfyUI/models/diffrir/: a .safetensors written by the pack's DiffRIR "
                           "training, or the official x1 DiffRIR .pth (Zj-BinXia/DiffRIR). The official x2/x4 "
                           "super-resolution variants are refused: this node restores at the image's own size."}),
            "dtype": (["auto", "fp32", "fp16", "bf16"], {
                "default": "auto",
                "tooltip": "Weight precision. auto: fp16 where the device runs it well, else fp32 (always fp32 on CPU)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        if folder_paths.get_full_path("diffrir", model_name) is None:
            return missing_message(model_name)
        return True

    def load(self, model_name, dtype):
        path = folder_paths.get_full_path("diffrir", model_name)
        if path is None or not os.path.isfile(path):
            raise ModelFilesError(missing_message(model_name))
        model = core.load_diffrir(path, dtype=_host.pick_dtype(dtype))
        return (LoadedDiffRIR(model, _host.managed(model), model_name),)


class MMIG_DiffRIRRestore:
    DESCRIPTION = ("Restores an inpainted or outpainted image with DiffRIR, using the original as a reference for "
                   "texture, brightness and contrast (LLMGA Eq. 7: F_R(concat(I_gen, (1 - M)·I_ref))), as the "
                   "official inference script does: mask binarised at 0.5, image reflect-padded to a multiple of 32. "
                   "Large images are processed in overlapping tiles, so memory stays flat as images grow "
                   "(tile_size 0 is exactly the official, untiled computation).")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The restored images, the same size as the generated ones.",)
    FUNCTION = "restore"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "diffrir": ("MMIG_DIFFRIR", {"tooltip": "From MMIG DiffRIR Loader."}),
            "image": ("IMAGE", {"tooltip": "The inpainted/outpainted result (e.g. from VAE Decode). Grey images "
                                           "are converted to RGB; an alpha channel is ignored."}),
            "reference": ("IMAGE", {"tooltip": "The image before generation, at the same size: for outpainting the "
                                               "output of Pad Image for Outpainting. Only its unmasked part is used."}),
            "mask": ("MASK", {"tooltip": "1 where content was generated, 0 where the reference was kept: the mask "
                                         "the inpainting used. One mask for the batch, or one per image. "
                                         "Binarised at 0.5 as the official script does, unless soft_mask is on."}),
            "paste_back": ("BOOLEAN", {"default": True,
                                       "tooltip": "Paste the reference back where the mask is 0 "
                                                  "(output·M + reference·(1 − M)), so kept pixels stay exact."}),
            "tile_size": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 32,
                                  "tooltip": "Tile side in pixels; larger is a little more faithful and needs more "
                                             "memory. 0 processes each image whole; otherwise at least 32 (the "
                                             "network's padding multiple), smaller is an error."}),
            "tile_overlap": ("INT", {"default": 64, "min": 0, "max": 1024, "step": 8,
                                     "tooltip": "Pixels shared by neighbouring tiles, blended to hide tile seams "
                                                "(at most half the tile size)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                             "tooltip": "Seed of the 4-step diffusion that predicts the restoration prior; image i "
                                        "of the batch uses seed + i."}),
        }, "optional": {
            "soft_mask": ("BOOLEAN", {"default": False,
                                      "tooltip": "Off (the official DiffRIR script): the mask is binarised at 0.5. "
                                                 "On (the pack's own option, not DiffRIR's): its values are used as "
                                                 "they are, in the network's input and in the paste-back blend, "
                                                 "e.g. for a feathered mask."}),
        }}

    def restore(self, diffrir, image, reference, mask, paste_back, tile_size, tile_overlap, seed, soft_mask=False):
        generated, reference, mask = core.check_inputs(image, reference, mask)
        _host.load_to_device(diffrir.patcher)
        # Progress in restoration tiles, so one large image moves the bar too; Cancel is checked per tile.
        height, width = generated.shape[1:3]
        progress = _host.progress_bar(generated.shape[0] * core.restoration_tiles(height, width, tile_size,
                                                                                  tile_overlap))
        restored = core.restore_images(
            diffrir.model, generated, reference, mask, tile=tile_size, overlap=tile_overlap,
            paste_back=paste_back, seed=seed % 2 ** 63, soft_mask=soft_mask,
            on_tile_done=lambda: progress.update(1), check_interrupt=_host.throw_if_interrupted)
        # A preview on the node, as the host's own image nodes show; the IMAGE output is unchanged.
        return {"ui": {"images": _host.preview_images(restored)}, "result": (restored,)}


NODE_CLASS_MAPPINGS = {
    "MMIG_DiffRIRLoader": MMIG_DiffRIRLoader,
    "MMIG_DiffRIRRestore": MMIG_DiffRIRRestore,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMIG_DiffRIRLoader": "MMIG DiffRIR Loader",
    "MMIG_DiffRIRRestore": "MMIG DiffRIR Restore",
}
