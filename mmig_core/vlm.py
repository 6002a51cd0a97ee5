"""Vision-language models (any transformers image-text-to-text family) as prompt encoders and describers,
independent of any host.

`load_vlm(folder)` reads a Hugging Face image-text-to-text folder (safetensors only, no remote code, no
network): Idefics2/3, SmolVLM, LLaVA 1.5/NeXT/OneVision, Qwen2/2.5/3-VL, Gemma3, PaliGemma, Mllama, InternVL (-hf),
Mistral3 and the others `AutoModelForImageTextToText` maps. Nothing is family-specific where the processor can say
it: the image placeholder is what the chat template renders for one image, `tokens_per_image` is counted in the
processor's real output, and processor kwargs are passed only where the image processor has that setting.
With `drop_perceiver` (MUMU) Idefics2's perceiver resampler becomes an identity: every vision
patch becomes one token (1024 at 448 px) instead of 64 per image, and the processor is told so.
`encode_prompt` returns the language model's last hidden states for an interleaved prompt (MUMU's input
to the adapter); `describe` generates a response (MMIG Eq. 1: z_d = f_mllm(x, w)) and its hidden states.
transformers is imported inside the functions: importing this module stays cheap.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .generation import (cap_new_tokens, max_positions, raise_if_stopped, repetition_penalty_processor,
                         stopping_criteria)
from .hf_compat import (folder_family_requirement, images_kwargs, no_legacy_image_expansion, prompt_images,
                        require_transformers, text_only_by_tokenizer)
from .mm_prompt import MMPrompt
from .model_files import ModelFilesError, from_pretrained_strict, require_hf_folder

SOURCE_HINT = ("Idefics2 weights come from Hugging Face, e.g. HuggingFaceM4/idefics2-8b: `huggingface-cli download "
               "HuggingFaceM4/idefics2-8b --local-dir ComfyUI/models/vlm/idefics2-8b`.")
MUMU_RESOLUTION = 448  # MUMU's ~1000 tokens per image: (448 / 14)^2 = 1024 patches
# Image-to-text families that caption but do not chat: they have their own loader in the pack.
CAPTIONER_FAMILIES = {"blip-2": "BLIP-2", "instructblip": "InstructBLIP", "blip": "BLIP"}
# Checkpoints published as remote code only (config.json's auto_map names the code to run): refused, never run.
REMOTE_CODE_FAMILIES = {"florence2": "Florence-2", "florence_2": "Florence-2", "moondream1": "moondream2",
                        "moondream": "moondream2", "internvl_chat": "InternVL (original layout)",
                        "minicpmv": "MiniCPM-V", "phi3_v": "Phi-3-vision", "deepseek_vl_v2": "DeepSeek-VL2"}
REMOTE_CODE_HINTS = {"Florence-2": "a converted transformers checkpoint (florence-community/Florence-2-large) loads natively",
                     "InternVL (original layout)": "use the -hf conversion, e.g. OpenGVLab/InternVL3-1B-hf"}
# Families whose processors need an optional package that requirements.txt lists.
OPTIONAL_PACKAGES = {"num2words": "SmolVLM / SmolVLM2"}
log = logging.getLogger("ComfyUI-MMIG")


@dataclass
class LLMEmbeds:
    """e_llm: hidden states [B, L, H] (float32, CPU) of the language model and which positions are real [B, L]."""
    hidden_states: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def hidden_size(self) -> int:
        return self.hidden_states.shape[-1]


class PerceiverBypass(torch.nn.Module):
    """Stands in for Idefics2's perceiver resampler: each projected patch embedding passes through (MUMU)."""

    def forward(self, context, attention_mask=None, **kwargs):
        return context


@dataclass
class VLM:
    """A loaded vision-language model: `model` (eval mode), `processor` and how images are fed to it."""
    model: Any
    processor: Any
    model_type: str
    image_resolution: int
    tokens_per_image: int
    perceiver_dropped: bool
    images: "ImagePlan | None" = None  # how images reach the processor (None: as the processor defaults)
    placeholder: str = ""              # what stands for one image in the processor's text
    prompt_format: str = "chat template"  # or a known format for folders without a template: idefics2, paligemma
    quantization: str = "none"         # low_vram.QUANTIZATIONS: a quantized model stays on its CUDA device
    compute_dtype: torch.dtype | None = None  # the dtype inputs are cast to (quantized weights are integers)

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _as_dict(value) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    if hasattr(value, "__dict__"):  # transformers 5's SizeDict
        return {k: v for k, v in vars(value).items() if v is not None and not k.startswith("_")}
    return {"height": int(value), "width": int(value)} if isinstance(value, int) else {}


def _vision_geometry(config) -> tuple[int | None, int]:
    """(native image size or None for dynamic-resolution towers, patch size) from the vision config."""
    vision = config.vision_config
    size = _first(getattr(vision, "image_size", None))
    patch = _first(getattr(vision, "patch_size", None)) or 14
    if isinstance(patch, dict):
        patch = patch.get("height", 14)
    return (int(size) if size else None), int(patch)


@dataclass
class ImagePlan:
    """How square images are sized for one loaded model: `mode` (what the processor lets the pack set),
    `resolution` (px side chosen; 0: the processor's own sizing), the processor `kwargs` per call and
    `pre_resize` (px the squared image is resized to before the processor, for tilers that pick a grid from it)."""
    mode: str
    resolution: int
    kwargs: dict
    pre_resize: int | None = None
    note: str = ""

    @property
    def honoured(self) -> bool:
        return self.mode != "native"


def image_plan(config, image_processor, requested: int) -> ImagePlan:
    """The image sizing `requested` px (0: native) maps to, from the image processor's own settings:
    - pixel budget (Qwen2/2.5/3-VL: `merge_size`, sizes as pixel counts): the budget is set to R x R, R a whole
      number of merged patches inside the processor's default budget;
    - longest edge (Pixtral/Mistral3): `size.longest_edge` = R in whole patches, at most the default;
    - tiles (Idefics3/SmolVLM: `max_image_size`): R in whole tiles, split when over one tile;
    - square resize (Idefics2: `do_image_splitting` without tiles): R x R in whole patches, at most native;
    - grid (LLaVA-NeXT/OneVision: `image_grid_pinpoints`): the square is resized to R (native .. the largest
      pinpoint) and the processor picks its tile grid from it;
    - native (towers with fixed position embeddings: CLIP/SigLIP in LLaVA 1.5, Gemma3, PaliGemma, Mllama,
      InternVL): the processor's own size; another R is logged and not applied (below native such towers fail).
    """
    native, patch = _vision_geometry(config)
    size = _as_dict(getattr(image_processor, "size", None))
    vision = config.vision_config
    merge = getattr(image_processor, "merge_size", None) or getattr(vision, "spatial_merge_size", None)
    if getattr(image_processor, "merge_size", None) and "longest_edge" in size and "shortest_edge" in size:
        factor = int(getattr(image_processor, "patch_size", patch) or patch) * int(merge)
        low = max(factor, int(math.ceil(math.sqrt(size["shortest_edge"]) / factor)) * factor)
        high = max(low, int(math.sqrt(size["longest_edge"])) // factor * factor)
        if requested <= 0:
            return ImagePlan("pixel budget", 0, {}, note=f"the processor's budget ({low}..{high} px squares)")
        side = min(max(requested // factor * factor, low), high)
        return ImagePlan("pixel budget", side, {"size": {"shortest_edge": side * side, "longest_edge": side * side}},
                         pre_resize=side, note=f"{side}x{side} px ({(side // factor) ** 2} tokens), budget {low}..{high}")
    if getattr(image_processor, "max_image_size", None) is not None and "longest_edge" in size:
        tile = int(_as_dict(image_processor.max_image_size).get("longest_edge", native or 364))
        if requested <= 0:
            return ImagePlan("tiles", 0, {}, note=f"the processor's own tiling ({tile} px tiles)")
        side = min(max(requested // tile * tile, tile), max(tile, size["longest_edge"] // tile * tile))
        return ImagePlan("tiles", side, {"size": {"longest_edge": side}, "do_image_splitting": side > tile},
                         note=f"{side} px: {(side // tile) ** 2} tile(s) of {tile} px")
    if "longest_edge" in size and "shortest_edge" not in size and getattr(image_processor, "patch_size", None):
        step = patch * int(getattr(vision, "spatial_merge_size", None) or getattr(config, "spatial_merge_size", 1) or 1)
        largest = min(size["longest_edge"], native or size["longest_edge"])
        if requested <= 0:
            return ImagePlan("longest edge", 0, {}, note=f"the processor's own size (up to {largest} px)")
        side = min(max(requested // step * step, step), largest // step * step)
        return ImagePlan("longest edge", side, {"size": {"longest_edge": side}}, note=f"{side} px")
    if getattr(image_processor, "max_patches", None) and hasattr(image_processor, "crop_to_patches") and native:
        # InternVL: fixed tiles of the tower's size; R chooses how many (a k x k grid plus a thumbnail)
        most = int(image_processor.max_patches)
        if requested <= 0:
            return ImagePlan("tiles", 0, {}, note=f"the processor's own tiling ({native} px tiles, up to {most})")
        k = max(1, min(requested // native, int(math.sqrt(most))))
        return ImagePlan("tiles", k * native, {"crop_to_patches": k > 1, "max_patches": max(1, k * k)},
                         pre_resize=k * native, note=f"{k * native} px: {k}x{k} tile(s) of {native} px")
    if hasattr(image_processor, "do_image_splitting") and native:
        side = native if requested <= 0 else min(requested, native)
        side = max(patch, side // patch * patch)
        return ImagePlan("square", side, {"size": {"height": side, "width": side}, "do_image_splitting": False},
                         note=f"{side}x{side} px")
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None) or getattr(config, "image_grid_pinpoints", None)
    if pinpoints and native:
        largest = max(max(p) for p in pinpoints)
        side = native if requested <= 0 else min(max(requested, native), largest)
        return ImagePlan("grid", side, {}, pre_resize=side, note=f"{side} px square into the processor's tile grid")
    note = f"native size only ({native} px: fixed position embeddings)" if native else "the processor's own size"
    return ImagePlan("native", native or 0, {}, note=note)


def text_decoder(model):
    """The language model's decoder stack (the module holding `.layers`), wherever the family keeps it."""
    # 5.x / >= 4.52 layouts first, then 4.x's (LLaVA's language_model was a CausalLM there)
    for path in ("model.text_model", "model.language_model", "language_model", "model", "language_model.model"):
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None and hasattr(module, "layers"):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def decoder_layers(model) -> list:
    """The language model's decoder layers, wherever the family keeps them."""
    return list(text_decoder(model).layers)


def attach_vlm_mm_adapters(model, adapters) -> list:
    """Attach an MM-Adapter set to a VLM's decoder stack; the image token marks the inputs that hold an image."""
    from .mm_adapter import attach_mm_adapters
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    return attach_mm_adapters(text_decoder(model), adapters, image_token_id)


def _raw_config(path) -> dict:
    import json
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
        return raw if isinstance(raw, dict) else {}
    except (OSError, ValueError):
        return {}  # AutoConfig reports it below, naming the folder


def _refuse_remote_code(path, raw: dict, source_hint: str) -> None:
    """A checkpoint that only runs as remote code: named, and refused before anything is imported for it."""
    from transformers import CONFIG_MAPPING
    model_type = str(raw.get("model_type", ""))
    family = REMOTE_CODE_FAMILIES.get(model_type.lower())
    if not raw.get("auto_map") or (family is None and model_type in CONFIG_MAPPING):
        return  # transformers' own code (a converted checkpoint may keep a stale auto_map)
    family = family or model_type or "unknown"
    hint = REMOTE_CODE_HINTS.get(family, "pick a model that transformers supports natively (no auto_map in config.json)")
    raise ModelFilesError(f"The model in {path} is {family} (model_type '{model_type}'), published as remote code "
                          f"(config.json's auto_map names Python files to run). The pack keeps remote code off "
                          f"(trust_remote_code=False), so it cannot load it: {hint}. {source_hint}")


def _missing_package(e: BaseException) -> str | None:
    text = str(e)
    return next((name for name in OPTIONAL_PACKAGES if name in text), None)


def _inserted(before: str, after: str) -> str:
    """The text `after` has where `before` has none (common prefix and suffix removed)."""
    start = 0
    while start < min(len(before), len(after)) and before[start] == after[start]:
        start += 1
    end = 0
    while end < min(len(before), len(after)) - start and before[-1 - end] == after[-1 - end]:
        end += 1
    return after[start:len(after) - end]


def image_placeholder(processor, fallback: str) -> str:
    """What the chat template writes for one image (e.g. Qwen's "<|vision_start|><|image_pad|><|vision_end|>",
    LLaVA's "<image>\n"): what a turn with two images has more than the same turn with one (a turn without any
    image may differ elsewhere too: Mllama writes a dated system block then)."""
    if not getattr(processor, "chat_template", None):
        return fallback

    def render(images: int) -> str:
        content = [{"type": "image"}] * images + [{"type": "text", "text": "MMIGTEXTMARK"}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=False)
    for fewer, more in ((1, 2), (0, 1)):
        try:
            found = _inserted(render(fewer), render(more))
        except Exception:  # noqa: BLE001 - a template that refuses this turn: try the next pair, else the bare token
            continue
        if found.strip():
            return found
    return fallback


def image_token_id(model, processor) -> int | None:
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    value = getattr(processor, "image_token_id", None)
    if isinstance(value, int):
        return value
    token = str(getattr(processor, "image_token", None) or "<image>")
    value = processor.tokenizer.convert_tokens_to_ids(token)
    return value if isinstance(value, int) and value != processor.tokenizer.unk_token_id else None


def load_vlm(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, drop_perceiver: bool = False,
             image_resolution: int = MUMU_RESOLUTION, mm_adapter_path: str | os.PathLike | None = None,
             searched: list[str] | None = None, source_hint: str = SOURCE_HINT, quantization: str = "none") -> VLM:
    """Load an image-text-to-text model and its processor from a local folder; any failure is a ModelFilesError.

    Every image is padded to a square with black; `image_resolution` px (0: the tower's own size) is then applied
    as far as the family's processor lets it (`image_plan`: clamped to what the tower supports, logged), so each
    image gives the same number of tokens whatever its size. `tokens_per_image` is counted in the processor's
    output for one such image. `mm_adapter_path` attaches MM-Adapters (MMIG Eq. 6) to the language model's
    decoder layers. `quantization` (low_vram.QUANTIZATIONS) loads the language model in 8-bit or 4-bit NF4
    through bitsandbytes, on the CUDA device (QuantizationUnavailable where it cannot run); `dtype` is then the
    dtype of the modules kept unquantized and of the 4-bit compute.
    """
    from .low_vram import quantized_load_kwargs, require_quantization
    require_quantization(quantization)  # before anything heavy: a choice that cannot run here says so at once
    path = require_hf_folder(folder, kind="vision-language", searched=searched, source_hint=source_hint)
    require_transformers("The MMIG vision-language nodes")
    _refuse_remote_code(path, _raw_config(path), source_hint)  # before the version check: no version runs it
    from .llava_layout import original_layout_message
    if (message := original_layout_message(path)) is not None:  # LLMGA's releases: convert them first
        raise ModelFilesError(message)
    needs = folder_family_requirement(path)
    if needs:
        raise ModelFilesError(f"Cannot load the model in {path}: {needs}")
    try:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except ModelFilesError:
        raise
    except Exception as e:  # noqa: BLE001 - every cause becomes an error naming the folder
        raise ModelFilesError(f"Could not read the config of the model in {path}: {type(e).__name__}: {e}. "
                              f"{source_hint}") from e
    family = CAPTIONER_FAMILIES.get(getattr(config, "model_type", ""))
    if family is not None:
        raise ModelFilesError(f"The model in {path} is a {family} captioner (model_type '{config.model_type}'), not a "
                              f"vision-language chat model: load it with MMIG BLIP-2 Loader (from "
                              f"ComfyUI/models/blip2/) and caption with MMIG BLIP-2 Caption, and pick another "
                              f"model_name here: an image-text-to-text model such as Idefics2. {source_hint}")
    if getattr(config, "vision_config", None) is None:
        raise ModelFilesError(f"The model in {path} (model_type '{config.model_type}') has no vision tower: it "
                              f"cannot read images. Put an image-text-to-text model there, e.g. Idefics2. {source_hint}")
    if drop_perceiver and getattr(config, "perceiver_config", None) is None:
        raise ModelFilesError(f"drop_perceiver needs an Idefics2-family model with a perceiver resampler; the model "
                              f"in {path} is '{config.model_type}'. Turn drop_perceiver off for it.")
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        quantized = quantized_load_kwargs(quantization, AutoModelForImageTextToText, config, dtype, text_decoder)
        model = from_pretrained_strict(AutoModelForImageTextToText, path, dtype, **quantized)
    except Exception as e:  # noqa: BLE001
        package = _missing_package(e)
        if package:
            raise ModelFilesError(f"The {OPTIONAL_PACKAGES[package]} processor of the model in {path} needs the "
                                  f"`{package}` package: `pip install {package}` (it is in the pack's "
                                  f"requirements.txt), then restart ComfyUI.") from e
        raise ModelFilesError(f"Could not load the vision-language model in {path} (model_type "
                              f"'{config.model_type}'): {type(e).__name__}: {e}. {source_hint}") from e
    if getattr(processor, "image_processor", None) is None:
        raise ModelFilesError(f"The processor in {path} has no image processor: the folder lacks its "
                              f"preprocessor/processor config. {source_hint}")
    tokenizer = processor.tokenizer
    ids = tokenizer("a photo of", add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise ModelFilesError(f"The tokenizer in {path} is empty ({len(tokenizer)} tokens): its files are missing "
                              f"or corrupt. {source_hint}")
    prompt_format = "chat template" if getattr(processor, "chat_template", None) else KNOWN_FORMATS.get(
        config.model_type)
    if prompt_format is None:
        raise ModelFilesError(f"The model in {path} (model_type '{config.model_type}') has no chat template "
                              f"(chat_template.jinja, or chat_template in tokenizer_config.json / "
                              f"processor_config.json) and the pack knows no prompt format for it: restore the "
                              f"template the model was released with. {source_hint}")

    no_legacy_image_expansion(model)
    plan = image_plan(model.config, processor.image_processor, image_resolution)
    if plan.mode == "square" and getattr(processor.image_processor, "do_image_splitting", False):
        # Idefics2 (idefics2-8b ships do_image_splitting: true): its processor writes 5x the image tokens when the
        # image processor's *setting* is on, whatever the call passes, while the pack feeds one image per
        # placeholder at image_resolution; off at load, so tokens_per_image is what each image really gets.
        processor.image_processor.do_image_splitting = False
        log.info("MMIG VLM: %s image splitting turned off (one %d px image per placeholder)", config.model_type,
                 plan.resolution)
    if drop_perceiver:
        model.model.connector.perceiver_resampler = PerceiverBypass()
        processor.image_seq_len = (plan.resolution // _vision_geometry(model.config)[1]) ** 2
    if mm_adapter_path:
        from .mm_adapter import load_mm_adapters
        adapters = load_mm_adapters(mm_adapter_path)
        if adapters.config.dim != model.config.get_text_config().hidden_size:
            raise ModelFilesError(f"the MM-Adapter {mm_adapter_path} is for hidden size {adapters.config.dim}, the VLM "
                                  f"in {path} has {model.config.get_text_config().hidden_size}")
        # a submodule: it moves with the model between devices (a quantized one stays where it was loaded)
        model.mm_adapters = adapters.to(device=next(model.parameters()).device, dtype=dtype)
        try:
            attach_vlm_mm_adapters(model, adapters)
        except ValueError as e:
            raise ModelFilesError(str(e)) from None
    placeholder = image_placeholder(processor, str(getattr(processor, "image_token", None) or "<image>"))
    vlm = VLM(model=model.eval(), processor=processor, model_type=model.config.model_type,
              image_resolution=plan.resolution, tokens_per_image=0, perceiver_dropped=drop_perceiver, images=plan,
              placeholder=placeholder, prompt_format=prompt_format, quantization=quantization, compute_dtype=dtype)
    vlm.tokens_per_image = measure_tokens_per_image(vlm)
    if image_resolution and not plan.honoured and image_resolution != plan.resolution:
        log.info("MMIG VLM: %s takes images at its %s; image_resolution %d is not applied", config.model_type,
                 plan.note, image_resolution)
    else:
        log.info("MMIG VLM: %s images: %s (%s), %d tokens per image", config.model_type, plan.mode, plan.note,
                 vlm.tokens_per_image)
    return vlm


KNOWN_FORMATS = {"idefics2": "idefics2", "paligemma": "paligemma"}  # for folders that lack a chat template


def measure_tokens_per_image(vlm: VLM) -> int:
    """The image tokens one square image becomes in the language model's input, counted in the processor's
    output (tiling processors add a grid's worth; the count is for a MUMU_RESOLUTION px square where the
    processor sizes images itself)."""
    token_id = image_token_id(vlm.model, vlm.processor)
    side = vlm.image_resolution or MUMU_RESOLUTION
    try:  # the path a prompt's image takes (squared, resized where the plan says so)
        image = _prepare_image(vlm, torch.zeros(side, side, 3))
        inputs = _processor_inputs(vlm, vlm.placeholder or "", [image], to_device=False)
    except Exception as e:  # noqa: BLE001 - the count is informative; a real prompt reports its own error
        log.warning("MMIG VLM: could not count the tokens per image of %s: %s", vlm.model_type, e)
        return 0
    if token_id is None:
        return 0
    return int((inputs["input_ids"] == token_id).sum())


def square_image(image: torch.Tensor):
    """[H, W, 3] float 0..1 -> a PIL image padded to a square with black, as MUMU trains.

    The processor then resizes it to the VLM's image resolution (one resize, in its own resampling).
    """
    from PIL import Image
    h, w = image.shape[:2]
    side = max(h, w)
    canvas = torch.zeros(side, side, 3, dtype=torch.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(canvas.numpy(), "RGB")


def _image_token(vlm: VLM) -> str:
    return str(getattr(vlm.processor, "image_token", None) or "<image>")  # some processors hold an AddedToken


def _strip_image_markers(vlm: VLM, text: str) -> str:
    """User text cannot smuggle in image tokens: the processor would count them as images."""
    for marker in {_image_token(vlm), getattr(vlm, "placeholder", "").strip()} - {""}:
        text = text.replace(marker, "")
    return text


def _prepare_image(vlm: VLM, image: torch.Tensor):
    square = square_image(image)
    plan = getattr(vlm, "images", None)  # chat_messages also serves stand-ins that carry only a processor
    side = plan.pre_resize if plan is not None else None
    if side and square.size != (side, side):
        from PIL import Image
        square = square.resize((side, side), Image.BICUBIC)
    return square


def prompt_text_and_images(vlm: VLM, prompt: MMPrompt) -> tuple[str, list]:
    """The processor's text (each image as the chat template writes one, which the processor expands) and its
    images, in the prompt's order."""
    text, images = [], []
    for segment in prompt.segments:
        if isinstance(segment, int):
            text.append(vlm.placeholder)
            images.append(_prepare_image(vlm, prompt.images[segment]))
        else:
            text.append(_strip_image_markers(vlm, segment))
    if vlm.prompt_format == "paligemma":  # its format has the images first, then the text
        return vlm.placeholder * len(images) + "".join(t for t in text if t != vlm.placeholder), images
    return "".join(text), images


class VLMInputError(ValueError):
    """A prompt the loaded model cannot take (too many images, an image size its tower refuses)."""


class VLMNumericsError(ValueError):
    """The language model's hidden states hold NaN or inf (fp16 overflow, broken weights): never passed on."""


def require_finite(states: torch.Tensor, vlm: VLM, what: str) -> torch.Tensor:
    """`states` when every value is finite, else a VLMNumericsError naming the fix (fp16 overflows: bf16/fp32)."""
    finite = torch.isfinite(states)
    if bool(finite.all()):
        return states
    bad, total = int((~finite).sum()), finite.numel()
    dtype = str(vlm.dtype).removeprefix("torch.")
    if vlm.dtype == torch.float16:
        fix = ("fp16's range (up to 65504) overflows in some models' activations (Gemma-based ones, for one): load "
               "the VLM with dtype bf16 (same memory) or fp32 in MMIG VLM Loader")
    else:
        fix = ("the weights or the LoRA/MM-Adapter applied to them are broken: re-download the model, or load it "
               "without the LoRA / MM-Adapter")
    raise VLMNumericsError(f"{what}: the {vlm.model_type} model's hidden states hold {bad} NaN/inf value(s) of "
                           f"{total} in {dtype}: {fix}.")


def _processor_inputs(vlm: VLM, text: str, images: list, *, to_device: bool = True) -> dict:
    kwargs = images_kwargs(**vlm.images.kwargs) if (images and vlm.images is not None) else {}
    if images:
        kwargs["images"] = prompt_images(images)
    bos = vlm.processor.tokenizer.bos_token
    if bos and text.startswith(str(bos)):
        kwargs["add_special_tokens"] = False  # the chat template wrote the BOS: no second one
    try:
        if not images and vlm.prompt_format == "paligemma":
            # PaliGemma's processor refuses text without images: its format for a text-only prefix
            bos = str(vlm.processor.tokenizer.bos_token or "")
            inputs = vlm.processor.tokenizer([bos + text + "\n"], add_special_tokens=False, return_tensors="pt")
        elif not images and text_only_by_tokenizer(vlm.model_type):
            inputs = vlm.processor.tokenizer([text], return_tensors="pt", **kwargs)
        else:
            inputs = vlm.processor(text=[text], return_tensors="pt", **kwargs)
    except (ValueError, IndexError, RuntimeError) as e:
        sizes = ", ".join(f"{im.size[0]}x{im.size[1]}" for im in images) or "none"
        raise VLMInputError(f"the {vlm.model_type} model's processor refused this prompt ({len(images)} image(s), "
                            f"sized {sizes} px after squaring): {e}. Use fewer images in one prompt, or another "
                            f"image_resolution in MMIG VLM Loader") from e
    positions = max_positions(vlm.model.config)
    length = inputs["input_ids"].shape[-1]
    if images and positions is not None and length > positions:
        raise VLMInputError(f"the prompt is {length} tokens with its {len(images)} image(s) (about "
                            f"{vlm.tokens_per_image} tokens each), more than the {positions} positions the "
                            f"{vlm.model_type} model takes: use fewer images in one prompt, or a lower "
                            f"image_resolution in MMIG VLM Loader")
    if not to_device:
        return dict(inputs)
    out = {}
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor) or key == "labels":  # PaliGemma's processor adds training labels
            continue
        value = value.to(vlm.device)
        out[key] = value.to(vlm.dtype) if value.is_floating_point() and key.startswith("pixel_values") else value
    return out


def prompt_inputs(vlm: VLM, prompt: MMPrompt) -> dict:
    """The model's input tensors for one interleaved prompt, on the model's device."""
    return _processor_inputs(vlm, *prompt_text_and_images(vlm, prompt))


def _one_logit(model) -> dict:
    """Ask for the last position's logits only, where the forward can (the hidden states are what is wanted)."""
    import inspect
    names = inspect.signature(model.forward).parameters
    return next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in names), {})


def trainable_hidden_states(vlm: VLM, inputs: dict) -> torch.Tensor:
    """`hidden_states` with gradients (MUMU training back-propagates into the VLM's LoRA).

    The full model runs (every family and transformers version wires its vision tower in its own forward); the
    language model's decoder output (after its final norm) is taken as it passes, by a forward hook."""
    captured = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)
    handle = text_decoder(vlm.model).register_forward_hook(keep)
    forget_rope_deltas(vlm.model)
    try:
        vlm.model(**inputs, use_cache=False, **_one_logit(vlm.model))
    finally:
        handle.remove()
    return captured[-1]


def forget_rope_deltas(model: torch.nn.Module) -> None:
    """Qwen2/2.5/3-VL cache the multimodal RoPE offsets of the last generation (`rope_deltas`) and, on releases
    before ~4.57, a forward without `cache_position` reuses them: after a describe, an encode of another prompt
    on the same model got plain 1-D positions. Clearing them makes every plain forward compute its own."""
    for module in (model, getattr(model, "model", None)):
        if module is not None and getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None


@torch.no_grad()
def hidden_states(vlm: VLM, inputs: dict) -> torch.Tensor:
    """The language model's last hidden states [1, L, H] for prepared inputs."""
    return trainable_hidden_states(vlm, inputs)


def encode_prompts(vlm: VLM, prompts: list[MMPrompt], *, on_prompt_done: Callable[[int], None] | None = None,
                   check_interrupt: Callable[[], None] | None = None) -> LLMEmbeds:
    """Hidden states of each prompt, right-padded into one batch [B, L_max, H] with its mask; order kept."""
    states = []
    for i, prompt in enumerate(prompts):
        if check_interrupt is not None:
            check_interrupt()
        states.append(require_finite(hidden_states(vlm, prompt_inputs(vlm, prompt))[0].float().cpu(), vlm,
                                     f"MMIG MUMU Encode, prompt {i + 1}"))
        if on_prompt_done is not None:
            on_prompt_done(i)
    return pad_batch(states)


def pad_batch(states: list[torch.Tensor]) -> LLMEmbeds:
    longest = max(s.shape[0] for s in states)
    # on the states' own device and dtype: training pads [L, H] states that carry gradients
    batch = states[0].new_zeros(len(states), longest, states[0].shape[-1])
    mask = torch.zeros(len(states), longest, dtype=torch.bool, device=states[0].device)
    for i, s in enumerate(states):
        batch[i, :s.shape[0]] = s
        mask[i, :s.shape[0]] = True
    return LLMEmbeds(hidden_states=batch, attention_mask=mask)


def parse_history(history: str) -> list[tuple[str, str]]:
    """"User: ...\\nAssistant: ..." text -> [(role, text)]; a line without a role continues the turn before, and
    text before the first role is the user's turn (a pasted question without 'User:')."""
    turns: list[tuple[str, str]] = []
    for line in (history or "").splitlines():
        role = next((r for r in ("user", "assistant") if line.lower().startswith(r + ":")), None)
        if role:
            turns.append((role, line[len(role) + 1:].strip()))
        elif turns and line.strip():
            turns[-1] = (turns[-1][0], f"{turns[-1][1]}\n{line.strip()}")
        elif line.strip():
            turns.append(("user", line.strip()))
    return turns


def _user_content(vlm: VLM, prompt: MMPrompt, *, with_text: bool = True, after: str = "") -> tuple[list, list]:
    """(chat content, PIL images) of a user turn: the prompt's images and text in order, then `after`."""
    content, images = [], []
    for segment in prompt.segments:
        if isinstance(segment, int):
            content.append({"type": "image"})
            images.append(_prepare_image(vlm, prompt.images[segment]))
        elif with_text and segment.strip():
            content.append({"type": "text", "text": _strip_image_markers(vlm, segment)})
    if after:
        content.append({"type": "text", "text": after})
    return content, images


def _text_message(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _fold_system(messages: list[dict]) -> list[dict] | None:
    """The system prompt moved into the first user turn, for templates that refuse a system turn beside an image
    (Mllama's); None when there is none to move."""
    if not messages or messages[0]["role"] != "system" or len(messages) < 2:
        return None
    system, rest = messages[0], [dict(m) for m in messages[1:]]
    first = next((m for m in rest if m["role"] == "user"), None)
    if first is None:
        return None
    first["content"] = [*system["content"], {"type": "text", "text": "\n"}, *first["content"]]
    return rest


def _render(vlm: VLM, messages: list[dict]) -> str:
    if getattr(vlm.processor, "chat_template", None):
        try:
            return vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja's SecurityError/TemplateError: the file is at fault
            if not type(e).__module__.startswith("jinja2"):
                raise
            folded = _fold_system(messages)
            if folded is not None and "Security" not in type(e).__name__:
                log.info("MMIG VLM: the %s chat template refuses a system turn here (%s); the system prompt "
                         "opens the user's turn instead", vlm.model_type, e)
                return _render(vlm, folded)
            folder = getattr(vlm.model.config, "_name_or_path", "") or "the VLM's folder"
            raise ModelFilesError(f"The chat template of the model in {folder} (chat_template.jinja, or "
                                  f"chat_template in tokenizer_config.json / processor_config.json) cannot be "
                                  f"rendered: {type(e).__name__}: {str(e).rstrip('.')}. The sandbox refuses "
                                  f"templates that call "
                                  f"unsafe code; restore the template the model was released with.") from None
    if vlm.prompt_format == "paligemma":
        # PaliGemma takes no chat: its processor puts the image tokens and BOS first and ends the prefix with a
        # newline; turns are joined as plain lines (the system prompt, history, then the request).
        count = sum(c["type"] == "image" for m in messages for c in m["content"])
        text = "\n".join(c["text"] for m in messages for c in m["content"] if c["type"] == "text").strip()
        return vlm.placeholder * count + text
    token, parts = _image_token(vlm), []  # Idefics2's own chat format
    for m in messages:
        body = "".join(token if c["type"] == "image" else c["text"] for c in m["content"])
        parts.append(f"{m['role'].capitalize()}:{body}<end_of_utterance>\n")
    return "".join(parts) + "Assistant:"


def _after_images(prompt: MMPrompt, text: str) -> str:
    """A template sentence as the released LLMGA code writes it: "<image>\nInpaint this image."."""
    return ("\n" + text) if text and prompt.image_count() else text


def chat_messages(vlm: VLM, prompt: MMPrompt, history: str = "", suffix: str = "", *, system: str = "",
                  template: str = "") -> tuple[list[dict], list]:
    """(messages, images) of one chat turn: an optional system prompt, the history, then the user's message:
    the interleaved prompt, then `template` (a task's fixed sentence, on its own line after the images as
    LLMGA writes it), then `suffix`."""
    messages = [_text_message("system", system)] if system else []
    messages += [_text_message(role, text) for role, text in parse_history(history)]
    content, images = _user_content(vlm, prompt, after=_after_images(prompt, template) + suffix)
    messages.append({"role": "user", "content": content})
    return messages, images


def chat_inputs(vlm: VLM, prompt: MMPrompt, history: str = "", suffix: str = "", *, system: str = "",
                template: str = "") -> dict:
    """The model's inputs for one chat turn (`chat_messages`), on the model's device."""
    messages, images = chat_messages(vlm, prompt, history, suffix, system=system, template=template)
    return _processor_inputs(vlm, _render(vlm, messages), images)


@dataclass
class GenerationSettings:
    """Decoding controls of MMIG MLLM Describe: greedy unless `do_sample`; `seed` makes sampling repeatable."""
    max_new_tokens: int = 200
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        kwargs = dict(do_sample=self.do_sample, repetition_penalty=1.0,  # applied by our own processor (why: there)
                      logits_processor=repetition_penalty_processor(self.repetition_penalty))
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # not the model's generation_config sampling values: greedy means greedy
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@torch.no_grad()
def _generate(vlm: VLM, inputs: dict, max_new_tokens: int | GenerationSettings,
              stop_requested: Callable[[], bool] | None = None) -> tuple[str, LLMEmbeds]:
    """The response and e_llm: for every response token, the language model's last hidden state (after its
    final norm) that the token was generated from, taken from the generation itself
    (`output_hidden_states`), so no family's per-token inputs (token types, cross-attention masks, ...)
    need extending for a second pass."""
    settings = max_new_tokens if isinstance(max_new_tokens, GenerationSettings) else GenerationSettings(max_new_tokens)
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = cap_new_tokens(settings.max_new_tokens, prompt_length, max_positions(vlm.model.config),
                                what="MMIG MLLM Describe")
    devices = [vlm.device] if vlm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        out = vlm.model.generate(**inputs, max_new_tokens=new_tokens, stopping_criteria=stopping_criteria(stop_requested),
                                 output_hidden_states=True, return_dict_in_generate=True,
                                 **settings.generate_kwargs())
    raise_if_stopped(stop_requested)
    sequences = out.sequences
    response_ids = sequences[0, prompt_length:] if sequences.shape[1] > prompt_length else sequences[0, :0]
    response = vlm.processor.tokenizer.decode(response_ids, skip_special_tokens=True).strip()
    steps = out.hidden_states[:max(1, response_ids.numel())]
    states = torch.stack([step[-1][0, -1] for step in steps]).float().cpu()
    return response, pad_batch([require_finite(states, vlm, "MMIG MLLM Describe")])


def describe(vlm: VLM, prompt: MMPrompt, *, history: str = "", suffix: str = "",
             max_new_tokens: int | GenerationSettings = 200, system: str = "", template: str = "",
             stop_requested: Callable[[], bool] | None = None) -> tuple[str, LLMEmbeds]:
    """z_d = f_mllm(x, w) (MMIG Eq. 1): the response to an image + instruction, and its hidden states.

    The hidden states are the language model's last layer for each response token (e_llm). `max_new_tokens`
    (or GenerationSettings) is lowered (logged) to the model's positions left after the prompt;
    `stop_requested()` is polled at each generated token and, once true, ends generation with GenerationStopped.
    """
    return _generate(vlm, chat_inputs(vlm, prompt, history, suffix, system=system, template=template),
                     max_new_tokens, stop_requested)


def edit_instruction(prompt: MMPrompt) -> str:
    """The edit task's instruction: the prompt's text, whitespace collapsed."""
    return " ".join(" ".join(s for s in prompt.segments if isinstance(s, str)).split())


def edit_messages(vlm: VLM, prompt: MMPrompt, first_turn: str, *, history: str = "", suffix: str = "",
                  system: str = "", first_response: str | None = None) -> tuple[list[dict], list]:
    """(messages, images) of LLMGA's instruction editing (llmga/serve/cli-sd15-editing.py): a first user turn of
    the images and `first_turn`; once `first_response` is known, that answer and the prompt's text as the
    edit instruction (without the images again, as the released CLI sends it)."""
    if not edit_instruction(prompt) or not prompt.image_count():
        raise ValueError("the edit task needs the image(s) and the edit instruction as the prompt's text, e.g. "
                         "'<image1> make it winter'")
    messages = [_text_message("system", system)] if system else []
    messages += [_text_message(role, text) for role, text in parse_history(history)]
    content, images = _user_content(vlm, prompt, with_text=False, after=_after_images(prompt, first_turn))
    messages.append({"role": "user", "content": content})
    if first_response is not None:
        messages += [_text_message("assistant", first_response),
                     _text_message("user", edit_instruction(prompt) + suffix)]
    return messages, images


def describe_edit(vlm: VLM, prompt: MMPrompt, first_turn: str, *, history: str = "", suffix: str = "",
                  max_new_tokens: int | GenerationSettings = 200, system: str = "",
                  stop_requested: Callable[[], bool] | None = None) -> tuple[str, str, LLMEmbeds]:
    """Instruction editing in two generated turns (`edit_messages`). Returns (first response, edited response,
    hidden states over the edited one)."""
    messages, images = edit_messages(vlm, prompt, first_turn, history=history, system=system)
    first, _ = _generate(vlm, _processor_inputs(vlm, _render(vlm, messages), images), max_new_tokens,
                         stop_requested)
    messages, images = edit_messages(vlm, prompt, first_turn, history=history, suffix=suffix, system=system,
                                     first_response=first)
    second, embeds = _generate(vlm, _processor_inputs(vlm, _render(vlm, messages), images), max_new_tokens,
                               stop_requested)
    return first, second, embeds
