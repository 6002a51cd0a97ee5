"""Multimodal prompt encoder: MUMU conditioning from interleaved text and images, and the multimodal LLM
that writes descriptions (MMIG Eq. 1) and LLMGA generation prompts."""
from __future__ import annotations

import logging

import folder_paths

from . import _host
from ._loaded import LoadedAdapter, LoadedVLM, adapter_files, managed_vlm
from ..mmig_core import llmga_tags, mm_prompt as prompts, vlm as core
from ..mmig_core.generation import GenerationStopped
from ..mmig_core.low_vram import QUANTIZATIONS, QuantizationUnavailable, require_quantization
from ..mmig_core.mm_adapter import FORMAT as MM_ADAPTER_FORMAT
from ..mmig_core.model_files import ModelFilesError
from ..mmig_core.mumu_adapter import FORMAT as MUMU_ADAPTER_FORMAT, check_sdxl_widths

log = logging.getLogger("ComfyUI-MMIG")
VLM_EXPECTED = "config.json, the processor files (tokenizer, image processor) and *.safetensors weights"
ADAPTER_SOURCE = ("MUMU adapters are .safetensors files written by the pack's training (config in the file's "
                  "metadata); put them in ComfyUI/models/mmig/.")
MAX_IMAGES = 4
DTYPES = (["auto", "fp32", "fp16", "bf16"], {
    "default": "auto", "tooltip": "Weight precision. auto: fp16 where the device runs it well, else fp32 (always fp32 on CPU)."})


class MMIG_VLMLoader:
    DESCRIPTION = ("Loads a vision-language model from a Hugging Face folder in ComfyUI/models/vlm/ or "
                   "ComfyUI/models/LLM/ (the folder other VLM packs use), under the host's memory manager: Idefics2/3, "
                   "SmolVLM, LLaVA 1.5/NeXT/OneVision, Qwen2/2.5/3-VL, Gemma3, PaliGemma, Mllama, InternVL (-hf), "
                   "Mistral3 and other transformers image-text-to-text models (remote-code checkpoints such as "
                   "Florence-2 or moondream2 are refused: remote code stays off). For MUMU, drop_perceiver removes "
                   "Idefics2's perceiver so each image gives one token per patch (1024 at 448 px) instead of 64.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MMIG_VLM",)
    RETURN_NAMES = ("vlm",)
    OUTPUT_TOOLTIPS = ("The loaded vision-language model, for MMIG MUMU Encode and MMIG MLLM Describe.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (_host.list_hf_model_folders("vlm"), {
                "tooltip": "A folder in ComfyUI/models/vlm/ or ComfyUI/models/LLM/ saved with save_pretrained "
                           "(config.json, processor files, *.safetensors), e.g. HuggingFaceM4/idefics2-8b or "
                           "Qwen/Qwen2-VL-2B-Instruct."}),
            "dtype": DTYPES,
            "drop_perceiver": ("BOOLEAN", {
                "default": False,
                "tooltip": "MUMU: replace the perceiver resampler by an identity, so every image patch becomes a "
                           "token (more detail kept). Turn on for MUMU adapters; keep off to chat or describe."}),
            "image_resolution": ("INT", {
                "default": core.MUMU_RESOLUTION, "min": 0, "max": 4096, "step": 1,
                "tooltip": "Every image is padded to a square with black and sized to this many px (0: the "
                           "vision tower's own size), as far as the family allows: Idefics2 up to its native size; "
                           "Qwen-VL as its pixel budget; Idefics3/SmolVLM in whole tiles; LLaVA-NeXT/OneVision through "
                           "their tile grid; towers with fixed position embeddings (LLaVA 1.5, Gemma3, PaliGemma, "
                           "Mllama, InternVL) take their native size only (logged). 448 gives MUMU's ~1000 tokens per "
                           "image on Idefics2."}),
        }, "optional": {
            "mm_adapter_name": (["none"] + adapter_files(MM_ADAPTER_FORMAT), {
                "default": "none",
                "tooltip": "Optional MM-Adapter (MMIG Eq. 6, laid out as LaVIN's) from ComfyUI/models/mmig/, as MMIG "
                           "training stage 2 writes it: on each decoder layer's attention input, routed by whether the "
                           "prompt holds an image. An untrained MM-Adapter changes nothing; a file in the pack's "
                           "older layout is refused with the command that retrains it."}),
            "lora_name": (["none"] + folder_paths.get_filename_list("loras"), {
                "default": "none",
                "tooltip": "Optional LoRA for the VLM from ComfyUI/models/loras/ (peft `base_model.model.…`, "
                           "diffusers or kohya keys), e.g. MUMU's rank-8 LoRA on the language model and connector. "
                           "Applied as a patch on a copy; fails if fewer than 90 % of its modules match."}),
            "lora_strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                        "tooltip": "How strongly the LoRA applies (0: not at all)."}),
            "quantization": (list(QUANTIZATIONS), {
                "default": "none",
                "tooltip": "Low VRAM: load the language model's weights in 8-bit (LLM.int8) or 4-bit NF4 (double "
                           "quantization) through bitsandbytes, about 1/2 or 1/4 of fp16's memory; the vision tower, "
                           "projector and LM head keep dtype, which is also the 4-bit compute dtype. Needs a CUDA GPU "
                           "and `pip install bitsandbytes`. A quantized VLM stays on its GPU (bitsandbytes weights "
                           "cannot move between devices: the host does not offload it) and takes no LoRA."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name, mm_adapter_name="none", lora_name="none", quantization="none"):
        try:  # before the graph runs: a quantization this machine cannot run says what to install or change
            require_quantization(quantization or "none")
        except (QuantizationUnavailable, ValueError) as e:
            return str(e)
        if _host.resolve_model_folder("vlm", model_name) is None:
            return _host.missing_model_message("vlm", "Vision-language", model_name, VLM_EXPECTED, core.SOURCE_HINT)
        if mm_adapter_name not in (None, "none") and folder_paths.get_full_path("mmig", mm_adapter_name) is None:
            return f"MM-Adapter '{mm_adapter_name}' not found in {', '.join(_host.model_search_paths('mmig'))}"
        if lora_name not in (None, "none") and folder_paths.get_full_path("loras", lora_name) is None:
            return f"LoRA '{lora_name}' not found in {', '.join(_host.model_search_paths('loras'))}"
        return True

    def load(self, model_name, dtype, drop_perceiver, image_resolution, mm_adapter_name="none", lora_name="none",
             lora_strength=1.0, quantization="none"):
        folder = _host.resolve_model_folder("vlm", model_name)
        if folder is None:
            raise ModelFilesError(_host.missing_model_message("vlm", "Vision-language", model_name, VLM_EXPECTED,
                                                              core.SOURCE_HINT))
        mm_adapter = None if mm_adapter_name in (None, "none") else folder_paths.get_full_path("mmig", mm_adapter_name)
        quantization = quantization or "none"
        if quantization != "none" and lora_name not in (None, "none") and lora_strength != 0:
            raise ValueError(f"lora_name '{lora_name}' cannot be applied with quantization '{quantization}': the "
                             f"LoRA patches the weights, and bitsandbytes weights are packed integers. Set "
                             f"quantization to none (dtype bf16 or fp16 to save memory), or lora_name to none.")
        vlm = core.load_vlm(folder, dtype=_host.pick_dtype(dtype), drop_perceiver=drop_perceiver,
                            image_resolution=image_resolution, mm_adapter_path=mm_adapter,
                            searched=_host.model_search_paths("vlm"), quantization=quantization)
        loaded = LoadedVLM(vlm, managed_vlm(vlm), model_name)
        if lora_name not in (None, "none") and lora_strength != 0:
            from ..mmig_core.lora import load_lora_file
            from .lora import merge_vlm_lora
            state_dict, _ = load_lora_file(folder_paths.get_full_path("loras", lora_name))
            loaded, report = merge_vlm_lora(loaded, state_dict, lora_strength, min_matched_fraction=0.9)
            logging.info("MMIG VLM Loader: LoRA %s\n%s", lora_name, report)
        return (loaded,)


def split_batches(images: dict, masks: dict) -> list[tuple[dict, dict]]:
    """IMAGE [B, H, W, C] and MASK [B, H, W] batches -> one ({n: image}, {n: mask}) per batch item, in order; a
    single image or mask is shared by all of them."""
    def batch(t, dims):
        return int(t.shape[0]) if t.dim() == dims and t.shape[0] > 1 else 1
    sizes = {**{f"image{n}": batch(t, 4) for n, t in images.items()}, **{f"mask{n}": batch(t, 3) for n, t in masks.items()}}
    sizes = {name: b for name, b in sizes.items() if b > 1}
    if not sizes:
        return [(images, masks)]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {b}" for name, b in sorted(sizes.items()))
        raise prompts.PromptError(f"the connected batches differ in size ({listed}): give every batched image and "
                                  f"mask the same batch size, or connect single ones")
    count = next(iter(sizes.values()))

    def pick(t, dims, i):
        return t[i:i + 1] if batch(t, dims) > 1 else t
    return [({n: pick(t, 4, i) for n, t in images.items()}, {n: pick(t, 3, i) for n, t in masks.items()})
            for i in range(count)]


class MMIG_MultimodalPrompt:
    DESCRIPTION = ("An interleaved text-and-image prompt (MUMU), e.g. 'a <image1> man and his <image2> dog'. "
                   "<imageN> places input imageN; bare <image> placeholders take the connected images in order. "
                   "An IMAGE batch gives one prompt per image (single images are shared by all of them). "
                   "A mask cuts its object out of the background (background details otherwise leak into the "
                   "image). Chain nodes through 'previous' to batch several prompts; their order is kept.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MMIG_MM_PROMPT",)
    RETURN_NAMES = ("mm_prompt",)
    OUTPUT_TOOLTIPS = ("The prompt(s), for MMIG MUMU Encode or MMIG MLLM Describe.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        optional = {}
        for i in range(1, MAX_IMAGES + 1):
            optional[f"image{i}"] = ("IMAGE", {"tooltip": f"The image placed at <image{i}> (any size: it is padded "
                                                          f"to a square and resized). A batch gives one prompt per "
                                                          f"image, in order."})
        for i in range(1, MAX_IMAGES + 1):
            optional[f"mask{i}"] = ("MASK", {"tooltip": f"Optional: keeps the masked object of image{i} and "
                                                        f"blackens its background."})
        optional["previous"] = ("MMIG_MM_PROMPT", {"tooltip": "Prompts that come before this one in the batch."})
        return {"required": {"text": ("STRING", {
            "multiline": True, "default": "a <image1> man and his <image2> dog",
            "tooltip": "The prompt; <image1>...<image4> (or bare <image>) mark where each image goes. "
                       "Text only is fine too."})},
            "optional": optional}

    def build(self, text, previous=None, **inputs):
        images = {i: inputs[f"image{i}"] for i in range(1, MAX_IMAGES + 1) if inputs.get(f"image{i}") is not None}
        masks = {i: inputs[f"mask{i}"] for i in range(1, MAX_IMAGES + 1) if inputs.get(f"mask{i}") is not None}
        built = tuple(prompts.build_prompt(text, one_images, one_masks)
                      for one_images, one_masks in split_batches(images, masks))
        return (tuple(previous or ()) + built,)


class MMIG_AdapterLoader:
    DESCRIPTION = ("Loads a MUMU adapter from ComfyUI/models/mmig/: a non-causal transformer from the VLM's hidden "
                   "states to SDXL's cross-attention context (2048-d tokens and a 1280-d pooled vector).")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MMIG_ADAPTER",)
    RETURN_NAMES = ("adapter",)
    OUTPUT_TOOLTIPS = ("The adapter, for MMIG MUMU Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "adapter_name": (adapter_files(MUMU_ADAPTER_FORMAT), {
                "tooltip": "A MUMU adapter .safetensors in ComfyUI/models/mmig/ (its config is in the file's metadata)."}),
            "dtype": DTYPES,
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, adapter_name):
        if folder_paths.get_full_path("mmig", adapter_name) is None:
            return (f"MUMU adapter '{adapter_name}' not found. Searched: {', '.join(_host.model_search_paths('mmig'))}. "
                    f"{ADAPTER_SOURCE}")
        return True

    def load(self, adapter_name, dtype):
        from ..mmig_core.mumu_adapter import load_adapter
        path = folder_paths.get_full_path("mmig", adapter_name)
        if path is None:
            raise ModelFilesError(f"MUMU adapter '{adapter_name}' not found. {ADAPTER_SOURCE}")
        adapter = load_adapter(path, dtype=_host.pick_dtype(dtype))
        return (LoadedAdapter(adapter, _host.managed(adapter), adapter_name),)


def sdxl_conditioning(context, pooled, width: int, height: int) -> list:
    """The host's SDXL CONDITIONING: tokens [B, N, 2048] with pooled [B, 1280] and size conditioning."""
    return [[context, {"pooled_output": pooled, "width": width, "height": height, "crop_w": 0, "crop_h": 0,
                       "target_width": width, "target_height": height}]]


class MMIG_MUMUEncode:
    DESCRIPTION = ("MUMU: encodes interleaved text-and-image prompts with the VLM and the adapter into SDXL "
                   "conditioning, for the host's KSampler with any SDXL model. The token count is a multiple of 77, "
                   "so it batches with a CLIP Text Encode negative.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("CONDITIONING", "MMIG_LLM_EMBEDS")
    RETURN_NAMES = ("conditioning", "llm_embeds")
    OUTPUT_TOOLTIPS = ("SDXL conditioning, one entry per prompt in order.",
                       "e_llm: the VLM's hidden states of each prompt (for MMSM).")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": 64, "max": 8192, "step": 8}
        return {"required": {
            "vlm": ("MMIG_VLM", {"tooltip": "From MMIG VLM Loader (drop_perceiver on for MUMU adapters)."}),
            "adapter": ("MMIG_ADAPTER", {"tooltip": "From MMIG Adapter Loader; its input width must be the VLM's hidden size."}),
            "mm_prompt": ("MMIG_MM_PROMPT", {"tooltip": "From MMIG Multimodal Prompt."}),
            "width": ("INT", {**size, "tooltip": "SDXL size conditioning: the width of the image to generate."}),
            "height": ("INT", {**size, "tooltip": "SDXL size conditioning: the height of the image to generate."}),
        }}

    def encode(self, vlm, adapter, mm_prompt, width, height):
        import torch
        config = adapter.adapter.config
        if config.input_dim != vlm.vlm.hidden_size:
            raise ValueError(f"the adapter '{adapter.name}' takes hidden states of width {config.input_dim}, but the "
                             f"VLM '{vlm.name}' has hidden size {vlm.vlm.hidden_size}: load the adapter trained for "
                             f"this VLM")
        check_sdxl_widths(config, adapter.name)  # before the VLM runs, not as a matmul error in the sampler
        if not vlm.vlm.perceiver_dropped and getattr(vlm.vlm.model.config, "perceiver_config", None) is not None:
            log.warning("MMIG MUMU Encode: the VLM keeps its perceiver (%d tokens per image); MUMU adapters are "
                        "trained without it (turn drop_perceiver on in MMIG VLM Loader)", vlm.vlm.tokens_per_image)
        _host.load_to_device(vlm.patcher, adapter.patcher)
        progress = _host.progress_bar(len(mm_prompt) + 1)
        embeds = core.encode_prompts(vlm.vlm, list(mm_prompt), on_prompt_done=lambda _i: progress.update(1),
                                     check_interrupt=_host.throw_if_interrupted)
        _host.throw_if_interrupted()
        device = next(adapter.adapter.parameters()).device
        with torch.no_grad():
            context, pooled = adapter.adapter(embeds.hidden_states.to(device), embeds.attention_mask.to(device))
        progress.update(1)
        return (sdxl_conditioning(context.float().cpu(), pooled.float().cpu(), width, height), embeds)


class MMIG_MLLMDescribe:
    DESCRIPTION = ("The multimodal LLM answers an image + instruction (MMIG Eq. 1: z_d = f_mllm(x, w)). In LLMGA mode "
                   "it writes a detailed generation prompt between <gen_image> tags (or <gen_img>), which is "
                   "extracted. "
                   "An LLMGA checkpoint is asked in its released format (its system prompt asks for the tags, the user "
                   "turn is a task template); other VLMs get the pack's own request sentence. Long descriptions are "
                   "fine: CLIP Text Encode encodes them in 77-token chunks.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("STRING", "STRING", "MMIG_LLM_EMBEDS")
    RETURN_NAMES = ("description", "response", "llm_embeds")
    OUTPUT_TOOLTIPS = ("z_d: the description (in LLMGA mode, the prompt between the tags). A list: one per prompt "
                       "(an IMAGE batch in MMIG Multimodal Prompt gives one prompt per image), in order; a single "
                       "prompt gives a list of one, which every node takes like a plain value.",
                       "The model's full response, one per prompt (edit task: both turns, as 'User:'/'Assistant:' "
                       "lines that history reads).",
                       "e_llm: the language model's last hidden state for each response token (from the generation "
                       "itself), one per prompt (for MMSM).")
    OUTPUT_IS_LIST = (True, True, True)
    OUTPUT_NODE = True
    FUNCTION = "describe"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vlm": ("MMIG_VLM", {"tooltip": "From MMIG VLM Loader (drop_perceiver off for a stock Idefics2)."}),
                "mm_prompt": ("MMIG_MM_PROMPT", {"tooltip": "The image(s) and the instruction, e.g. '<image1> make "
                                                            "it winter'. Several prompts (an IMAGE batch, or prompts "
                                                            "chained through 'previous') are described one after "
                                                            "the other, in order."}),
                "mode": (["describe", "llmga prompt"], {
                    "default": "describe",
                    "tooltip": "describe: the response is the description. llmga prompt: the generation prompt "
                               "between <gen_image>...</gen_image> (or <gen_img>) tags is extracted (the pack's "
                               "prompt style also asks for the tags in the user's turn)."}),
                "when_tags_missing": (["use whole response", "error"], {
                    "default": "use whole response",
                    "tooltip": "LLMGA mode, when the response has no complete tag pair: use the whole response "
                               "(with a warning) or stop with an error."}),
                "max_new_tokens": ("INT", {"default": 200, "min": 1, "max": 2048,
                                           "tooltip": "The longest response, in tokens; lowered (with a log line) "
                                                      "to the model's positions left after the prompt."}),
            },
            "optional": {
                "history": ("STRING", {"multiline": True, "default": "",
                                       "tooltip": "Earlier turns of the conversation, one per line starting with "
                                                  "'User:' or 'Assistant:' (text before the first of them is read "
                                                  "as a user turn)."}),
                "filename_prefix": ("STRING", {"default": "",
                                               "tooltip": "If set, the description is saved to the output folder as "
                                                          "<prefix>_00001_.txt (subfolders allowed)."}),
                "prompt_style": (list(llmga_tags.PROMPT_STYLES), {
                    "default": "auto",
                    "tooltip": "llmga: the released LLMGA format: the system prompt its checkpoint was trained "
                               "with (LLMGA's asks for <gen_image> tags) and nothing appended to your turn. pack: no "
                               "system prompt; in llmga prompt mode the pack's own request for tags is appended. "
                               "auto: llmga when the model's config is LLaVA-style (the released LLMGA layout) or "
                               "its folder name says llmga, else pack."}),
                "task": (list(llmga_tags.TASKS), {
                    "default": "as written",
                    "tooltip": "as written: your prompt is the user's turn. similar image / inpaint / outpaint: "
                               "LLMGA's template ('Generate a similar image.', 'Inpaint this image.', 'Extend this "
                               "image.') follows the prompt's images (leave the prompt's text empty for the exact "
                               "released turn). edit: a first turn 'Generate a similar image' with the images, then "
                               "the prompt's text as the edit instruction (LLMGA's instruction editing)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "The random seed of sampling (do_sample on); the same seed gives the same "
                                            "response."}),
                "do_sample": ("BOOLEAN", {"default": False,
                                          "tooltip": "Off: greedy decoding (the same response every run). On: sample "
                                                     "with temperature and top_p."}),
                "temperature": ("FLOAT", {"default": 0.7, "min": 0.01, "max": 5.0, "step": 0.01,
                                          "tooltip": "Sampling only: lower is more predictable, higher more varied."}),
                "top_p": ("FLOAT", {"default": 0.9, "min": 0.01, "max": 1.0, "step": 0.01,
                                    "tooltip": "Sampling only: sample among the most likely tokens whose "
                                               "probabilities sum to this."}),
                "repetition_penalty": ("FLOAT", {"default": 1.0, "min": 0.5, "max": 3.0, "step": 0.01,
                                                 "tooltip": "Above 1 discourages repeating tokens (1: off); applies "
                                                            "to greedy decoding too."}),
            },
        }

    def describe(self, vlm, mm_prompt, mode, when_tags_missing, max_new_tokens, history="", filename_prefix="",
                 prompt_style="auto", task="as written", seed=0, do_sample=False, temperature=0.7, top_p=0.9,
                 repetition_penalty=1.0):
        if not mm_prompt:
            raise ValueError("MMIG MLLM Describe got no prompt: connect an MMIG Multimodal Prompt")
        if task not in llmga_tags.TASKS:
            raise ValueError(f"task must be one of {', '.join(llmga_tags.TASKS)}, got {task!r}")
        settings = core.GenerationSettings(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                           top_p=top_p, repetition_penalty=repetition_penalty, seed=seed)
        llmga = mode == "llmga prompt"
        style = llmga_tags.resolve_prompt_style(prompt_style, vlm.vlm.model.config.to_dict(), vlm.name)
        system = llmga_tags.system_prompt(vlm.name) if style == "llmga" else ""
        suffix = llmga_tags.GENERATION_REQUEST if llmga and style == "pack" else ""
        _host.load_to_device(vlm.patcher)
        steps = 2 if task == "edit" else 1
        progress = _host.progress_bar(steps * len(mm_prompt))
        descriptions, exchanges, all_embeds = [], [], []
        for prompt in mm_prompt:
            _host.throw_if_interrupted()
            response, exchange, embeds = self._one(vlm, prompt, task, history, suffix, system, settings)
            progress.update(steps)
            descriptions.append(self._description(response, llmga, when_tags_missing))
            exchanges.append(exchange)
            all_embeds.append(embeds)
        ui = {"text": descriptions}
        if filename_prefix:
            ui["description_files"] = [_host.save_text_file(d, filename_prefix) for d in descriptions]
        return {"ui": ui, "result": (descriptions, exchanges, all_embeds)}

    @staticmethod
    def _one(vlm, prompt, task, history, suffix, system, settings):
        try:
            if task == "edit":
                first, response, embeds = core.describe_edit(
                    vlm.vlm, prompt, llmga_tags.EDIT_FIRST_TURN, history=history, suffix=suffix,
                    max_new_tokens=settings, system=system, stop_requested=_host.interrupted)
                exchange = (f"User: {llmga_tags.EDIT_FIRST_TURN}\nAssistant: {first}\n"
                            f"User: {core.edit_instruction(prompt)}\nAssistant: {response}")
            else:
                response, embeds = core.describe(vlm.vlm, prompt, history=history, max_new_tokens=settings,
                                                 suffix=suffix, system=system,
                                                 template=llmga_tags.TASK_TEMPLATES.get(task, ""),
                                                 stop_requested=_host.interrupted)
                exchange = response
        except GenerationStopped:
            _host.throw_if_interrupted()  # the host's own interruption, so the prompt ends as interrupted
            raise
        return response, exchange, embeds

    @staticmethod
    def _description(response, llmga, when_tags_missing):
        if not llmga:
            return response
        description = llmga_tags.extract_generation_prompt(response)
        if not description:
            if when_tags_missing == "error":
                raise ValueError("the response has no generation prompt between <gen_image>...</gen_image> (or "
                                 f"<gen_img>) tags: {response[:200]!r}. Use an LLMGA-trained model, raise "
                                 "max_new_tokens, or set when_tags_missing to 'use whole response'")
            log.warning("MMIG MLLM Describe: no <gen_image> tags in the response; using the whole response")
            description = llmga_tags.strip_tags(response)
        return description


NODE_CLASS_MAPPINGS = {
    "MMIG_VLMLoader": MMIG_VLMLoader,
    "MMIG_MultimodalPrompt": MMIG_MultimodalPrompt,
    "MMIG_AdapterLoader": MMIG_AdapterLoader,
    "MMIG_MUMUEncode": MMIG_MUMUEncode,
    "MMIG_MLLMDescribe": MMIG_MLLMDescribe,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MMIG_VLMLoader": "MMIG VLM Loader",
    "MMIG_MultimodalPrompt": "MMIG Multimodal Prompt",
    "MMIG_AdapterLoader": "MMIG Adapter Loader",
    "MMIG_MUMUEncode": "MMIG MUMU Encode",
    "MMIG_MLLMDescribe": "MMIG MLLM Describe",
}
