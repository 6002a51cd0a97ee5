"""BLIP-2 captioner: d_new = f_BLIP2(I_new), MMIG Eq. 4."""
from __future__ import annotations

from dataclasses import dataclass

from . import _host
from ..mmig_core import blip2 as core
from ..mmig_core.generation import GenerationStopped
from ..mmig_core.model_files import ModelFilesError

BLIP2_SOURCE = ("BLIP-2 weights come from Hugging Face, e.g. Salesforce/blip2-opt-2.7b: "
                "`huggingface-cli download Salesforce/blip2-opt-2.7b --local-dir ComfyUI/models/blip2/blip2-opt-2.7b`.")
BLIP2_EXPECTED = "config.json, the processor files and *.safetensors weights"


@dataclass
class LoadedBLIP2:
    """The MMIG_BLIP2 value: the captioner and the host's memory-managed handle on its model."""
    captioner: core.Blip2Captioner
    patcher: object
    name: str


class MMIG_BLIP2Loader:
    DESCRIPTION = ("Loads a BLIP-2 captioning model from a Hugging Face folder in ComfyUI/models/blip2/. "
                   "The host's memory manager moves it to the device when it runs and offloads it after.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MMIG_BLIP2",)
    RETURN_NAMES = ("blip2",)
    OUTPUT_TOOLTIPS = ("The loaded BLIP-2 model, for MMIG BLIP-2 Caption.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_host.list_hf_model_folders("blip2"), {
                "tooltip": "A folder in ComfyUI/models/blip2/ saved with save_pretrained (config.json, processor "
                           "files, *.safetensors), e.g. blip2-opt-2.7b from Salesforce on Hugging Face."}),
            "dtype": (["auto", "fp32", "fp16", "bf16"], {
                "default": "auto",
                "tooltip": "Weight precision. auto: fp16 where the device runs it well, else fp32 (always fp32 on CPU)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        # Replaces the host's bare "value not in list" with where to put the model.
        if _host.resolve_model_folder("blip2", model_name) is None:
            return _host.missing_model_message("blip2", "BLIP-2", model_name, BLIP2_EXPECTED, BLIP2_SOURCE)
        return True

    def load(self, model_name, dtype):
        folder = _host.resolve_model_folder("blip2", model_name)
        if folder is None:
            raise ModelFilesError(_host.missing_model_message("blip2", "BLIP-2", model_name, BLIP2_EXPECTED,
                                                              BLIP2_SOURCE))
        captioner = core.load_blip2(folder, dtype=_host.pick_dtype(dtype),
                                    searched=_host.model_search_paths("blip2"), source_hint=BLIP2_SOURCE)
        return (LoadedBLIP2(captioner, _host.managed(captioner.model), model_name),)


class MMIG_BLIP2Caption:
    DESCRIPTION = ("Writes a caption for each image of the batch with BLIP-2 (MMIG Eq. 4: d_new = f_BLIP2(I_new)). "
                   "The captions show on the node and, with a filename prefix, are saved as a .txt file in the "
                   "output folder.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("captions",)
    OUTPUT_TOOLTIPS = ("One caption per image, joined by newlines.",)
    OUTPUT_NODE = True
    FUNCTION = "caption"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "blip2": ("MMIG_BLIP2", {"tooltip": "From MMIG BLIP-2 Loader."}),
                "images": ("IMAGE", {"tooltip": "The images to caption; each image of the batch gets its own caption."}),
                "max_new_tokens": ("INT", {"default": 30, "min": 1, "max": 512,
                                           "tooltip": "The longest caption, in tokens; lowered (with a log line) "
                                                      "to what the model's positions leave after the prompt."}),
                "num_beams": ("INT", {"default": 3, "min": 1, "max": 16,
                                      "tooltip": "Beam search width; 1 is greedy decoding. Ignored when sampling."}),
                "sampling": ("BOOLEAN", {"default": False,
                                         "tooltip": "Sample tokens instead of searching: more varied captions, "
                                                    "repeatable for a given seed."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seed for sampling."}),
            },
            "optional": {
                "prompt": ("STRING", {"default": "", "multiline": False,
                                      "tooltip": "Optional prefix the caption continues, e.g. 'a photo of'. A "
                                                 "prefix past half the model's positions is cut (with a log "
                                                 "line), as CLIP Text Encode cuts a long prompt."}),
                "filename_prefix": ("STRING", {"default": "",
                                               "tooltip": "If set, the captions are also saved to the output folder "
                                                          "as <prefix>_00001_.txt (subfolders allowed, as in Save Image)."}),
            },
        }

    def caption(self, blip2, images, max_new_tokens, num_beams, sampling, seed, prompt="", filename_prefix=""):
        if images is None or images.ndim != 4 or images.shape[0] == 0:
            raise ValueError("MMIG BLIP-2 Caption got an empty IMAGE batch: connect a node that outputs at "
                             "least one image (e.g. VAE Decode or Load Image).")
        _host.load_to_device(blip2.patcher)
        progress = _host.progress_bar(images.shape[0])
        try:
            captions = core.caption_images(
                blip2.captioner, images, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=sampling,
                seed=seed, prompt=prompt, on_image_done=lambda _i: progress.update(1),
                check_interrupt=_host.throw_if_interrupted, stop_requested=_host.interrupted)
        except GenerationStopped:
            _host.throw_if_interrupted()  # the host's own interruption, so the prompt ends as interrupted
            raise
        text = "\n".join(captions)
        ui = {"text": captions}
        if filename_prefix:
            ui["caption_files"] = [_host.save_text_file(text, filename_prefix)]
        return {"ui": ui, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "MMIG_BLIP2Loader": MMIG_BLIP2Loader,
    "MMIG_BLIP2Caption": MMIG_BLIP2Caption,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMIG_BLIP2Loader": "MMIG BLIP-2 Loader",
    "MMIG_BLIP2Caption": "MMIG BLIP-2 Caption",
}
