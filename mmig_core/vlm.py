"""Vision-language models (Idefics2 family) as prompt encoders and describers, independent of any host.

`load_vlm(folder)` reads a Hugging Face image-text-to-text folder (safetensors only, no remote code, no
network). With `drop_perceiver` (MUMU) Idefics2's perceiver resampler becomes an identity: every vision
patch becomes one token (1024 at 448 px) instead of 64 per image, and the processor is told so.
`encode_prompt` returns the language model's last hidden states for an interleaved prompt (MUMU's input
to the adapter); `describe` generates a response (MMIG Eq. 1: z_d = f_mllm(x, w)) and its hidden states.
transformers is imported inside the functions: importing this module stays cheap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .generation import cap_new_tokens, max_positions, raise_if_stopped, stopping_criteria
from .hf_compat import folder_family_requirement, images_kwargs, require_transformers
from .mm_prompt import MMPrompt
from .model_files import ModelFilesError, from_pretrained_strict, require_hf_folder

SOURCE_HINT = ("Idefics2 weights come from Hugging Face, e.g. HuggingFaceM4/idefics2-8b: `huggingface-cli download "
               "HuggingFaceM4/idefics2-8b --local-dir ComfyUI/models/vlm/idefics2-8b`.")
MUMU_RESOLUTION = 448  # MUMU's ~1000 tokens per image: (448 / 14)^2 = 1024 patches
# Image-to-text families that caption but do not chat: they have their own loader in the pack.
CAPTIONER_FAMILIES = {"blip-2": "BLIP-2", "instructblip": "InstructBLIP", "blip": "BLIP"}


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

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _vision_geometry(config) -> tuple[int, int]:
    vision = config.vision_config
    size, patch = vision.image_size, vision.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return int(size), int(patch)


def text_decoder(model):
    """The language model's decoder stack (the module holding `.layers`), wherever the family keeps it."""
    for path in ("model.text_model", "model.language_model", "language_model", "model"):
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


def load_vlm(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, drop_perceiver: bool = False,
             image_resolution: int = MUMU_RESOLUTION, mm_adapter_path: str | os.PathLike | None = None,
             searched: list[str] | None = None, source_hint: str = SOURCE_HINT) -> VLM:
    """Load an image-text-to-text model and its processor from a local folder; any failure is a ModelFilesError.

    Every image is padded to a square and resized to `image_resolution` px (capped at the vision tower's
    native size and rounded down to whole patches; 0 means the native size), so each image gives the same
    number of tokens whatever its size. `mm_adapter_path` attaches MM-Adapters (MMIG Eq. 6) to the
    language model's decoder layers.
    """
    path = require_hf_folder(folder, kind="vision-language", searched=searched, source_hint=source_hint)
    require_transformers("The MMIG vision-language nodes")
    needs = folder_family_requirement(path)
    if needs:
        raise ModelFilesError(f"Cannot load the model in {path}: {needs}")
    try:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
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
        model = from_pretrained_strict(AutoModelForImageTextToText, path, dtype)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise ModelFilesError(f"Could not load the vision-language model in {path}: {type(e).__name__}: {e}. "
                              f"{source_hint}") from e
    if getattr(processor, "image_processor", None) is None:
        raise ModelFilesError(f"The processor in {path} has no image processor: the folder lacks its "
                              f"preprocessor/processor config. {source_hint}")
    tokenizer = processor.tokenizer
    ids = tokenizer("a photo of", add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise ModelFilesError(f"The tokenizer in {path} is empty ({len(tokenizer)} tokens): its files are missing "
                              f"or corrupt. {source_hint}")

    native, patch = _vision_geometry(model.config)
    resolution = native if image_resolution <= 0 else min(image_resolution, native)
    resolution = max(patch, resolution // patch * patch)
    if drop_perceiver:
        model.model.connector.perceiver_resampler = PerceiverBypass()
        processor.image_seq_len = (resolution // patch) ** 2
    if mm_adapter_path:
        from .mm_adapter import load_mm_adapters
        adapters = load_mm_adapters(mm_adapter_path)
        if adapters.config.dim != model.config.get_text_config().hidden_size:
            raise ModelFilesError(f"the MM-Adapter {mm_adapter_path} is for hidden size {adapters.config.dim}, the VLM "
                                  f"in {path} has {model.config.get_text_config().hidden_size}")
        model.mm_adapters = adapters.to(dtype)  # a submodule: it moves with the model between devices
        try:
            attach_vlm_mm_adapters(model, adapters)
        except ValueError as e:
            raise ModelFilesError(str(e)) from None
    tokens = getattr(processor, "image_seq_len", None) or (resolution // patch) ** 2
    return VLM(model=model.eval(), processor=processor, model_type=model.config.model_type,
               image_resolution=resolution, tokens_per_image=int(tokens), perceiver_dropped=drop_perceiver)


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


def prompt_text_and_images(vlm: VLM, prompt: MMPrompt) -> tuple[str, list]:
    """The processor's text (each image a single image token, which the processor expands) and its images."""
    token, text, images = _image_token(vlm), [], []
    for segment in prompt.segments:
        if isinstance(segment, int):
            text.append(token)
            images.append(square_image(prompt.images[segment]))
        else:
            text.append(segment.replace(token, ""))
    return "".join(text), images


def _processor_inputs(vlm: VLM, text: str, images: list) -> dict:
    kwargs = {}
    if images:
        kwargs = dict(images=[images], **images_kwargs(size={"height": vlm.image_resolution,
                                                              "width": vlm.image_resolution}, do_image_splitting=False))
    inputs = vlm.processor(text=[text], return_tensors="pt", **kwargs)
    out = {}
    for key, value in inputs.items():
        value = value.to(vlm.device)
        out[key] = value.to(vlm.dtype) if key == "pixel_values" else value
    return out


def prompt_inputs(vlm: VLM, prompt: MMPrompt) -> dict:
    """The model's input tensors for one interleaved prompt, on the model's device."""
    return _processor_inputs(vlm, *prompt_text_and_images(vlm, prompt))


def _base_model(model):
    return model.model if hasattr(model, "model") else model


def trainable_hidden_states(vlm: VLM, inputs: dict) -> torch.Tensor:
    """`hidden_states` with gradients (MUMU training back-propagates into the VLM's LoRA)."""
    return _base_model(vlm.model)(**inputs, use_cache=False).last_hidden_state


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
        states.append(hidden_states(vlm, prompt_inputs(vlm, prompt))[0].float().cpu())
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
    token = _image_token(vlm)
    content, images = [], []
    for segment in prompt.segments:
        if isinstance(segment, int):
            content.append({"type": "image"})
            images.append(square_image(prompt.images[segment]))
        elif with_text and segment.strip():
            content.append({"type": "text", "text": segment.replace(token, "")})
    if after:
        content.append({"type": "text", "text": after})
    return content, images


def _text_message(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _render(vlm: VLM, messages: list[dict]) -> str:
    if getattr(vlm.processor, "chat_template", None):
        try:
            return vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja's SecurityError/TemplateError: the file is at fault
            if not type(e).__module__.startswith("jinja2"):
                raise
            folder = getattr(vlm.model.config, "_name_or_path", "") or "the VLM's folder"
            raise ModelFilesError(f"The chat template of the model in {folder} (chat_template.jinja, or "
                                  f"chat_template in tokenizer_config.json / processor_config.json) cannot be "
                                  f"rendered: {type(e).__name__}: {e}. The sandbox refuses templates that call "
                                  f"unsafe code; restore the template the model was released with.") from None
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


@torch.no_grad()
def _generate(vlm: VLM, inputs: dict, max_new_tokens: int,
              stop_requested: Callable[[], bool] | None = None) -> tuple[str, LLMEmbeds]:
    prompt_length = inputs["input_ids"].shape[1]
    max_new_tokens = cap_new_tokens(max_new_tokens, prompt_length, max_positions(vlm.model.config),
                                    what="MMIG MLLM Describe")
    out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             stopping_criteria=stopping_criteria(stop_requested))
    raise_if_stopped(stop_requested)
    response_ids = out[0, prompt_length:] if out.shape[1] > prompt_length else out[0, :0]
    response = vlm.processor.tokenizer.decode(response_ids, skip_special_tokens=True).strip()
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], response_ids[None]], dim=1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    states = hidden_states(vlm, full)[0].float().cpu()
    if response_ids.numel():
        states = states[prompt_length:]
    return response, pad_batch([states])


def describe(vlm: VLM, prompt: MMPrompt, *, history: str = "", suffix: str = "", max_new_tokens: int = 200,
             system: str = "", template: str = "",
             stop_requested: Callable[[], bool] | None = None) -> tuple[str, LLMEmbeds]:
    """z_d = f_mllm(x, w) (MMIG Eq. 1): greedy response to an image + instruction, and its hidden states.

    The hidden states are the language model's last layer over the response tokens (e_llm). `max_new_tokens`
    is lowered (logged) to the model's positions left after the prompt; `stop_requested()` is polled at each
    generated token and, once true, ends generation with GenerationStopped.
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
                  max_new_tokens: int = 200, system: str = "",
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
