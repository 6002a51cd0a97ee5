"""BLIP-2 image captioning (the caption of the generated image, MMIG Eq. 4), independent of any host.

`load_blip2(folder)` reads a Hugging Face BLIP-2 folder (safetensors only, no remote code, no network);
`caption_images(captioner, images)` captions a ComfyUI IMAGE batch one image at a time so a caller can show
progress and interrupt. transformers is imported inside the functions: importing this module stays cheap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .generation import cap_new_tokens, max_positions, raise_if_stopped, stopping_criteria, truncate_text_tokens
from .hf_compat import require_transformers
from .model_files import ModelFilesError, from_pretrained_strict, require_hf_folder

SOURCE_HINT = (
    "BLIP-2 weights come from Hugging Face, e.g. Salesforce/blip2-opt-2.7b: "
    "`huggingface-cli download Salesforce/blip2-opt-2.7b --local-dir ComfyUI/models/blip2/blip2-opt-2.7b`.")


@dataclass
class Blip2Captioner:
    """A loaded BLIP-2: `model` (Blip2ForConditionalGeneration, eval mode) and its `processor`."""
    model: Any
    processor: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype pixel values need: the vision tower's (the Q-Former may be kept in float32)."""
        return self.model.vision_model.embeddings.patch_embedding.weight.dtype


def load_blip2(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, searched: list[str] | None = None,
               source_hint: str = SOURCE_HINT) -> Blip2Captioner:
    """Load a BLIP-2 model and processor from a local folder; any failure is a ModelFilesError.

    `searched` lists the folders a user can put models in and `source_hint` says where weights come from
    (both for error messages).
    """
    path = require_hf_folder(folder, kind="BLIP-2", searched=searched, source_hint=source_hint)
    require_transformers("The MMIG BLIP-2 nodes")
    try:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor
        model = from_pretrained_strict(Blip2ForConditionalGeneration, path, dtype)
        processor = Blip2Processor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - every cause becomes an error naming the folder
        raise ModelFilesError(f"Could not load the BLIP-2 model in {path}: {type(e).__name__}: {e}. "
                              f"{source_hint}") from e
    # Without its files, a tokenizer can load empty and silently encode text to nothing.
    tokenizer = processor.tokenizer
    ids = tokenizer("a photo of", add_special_tokens=False)["input_ids"]
    if not ids or all(i == tokenizer.unk_token_id for i in ids):
        raise ModelFilesError(f"The tokenizer in {path} is empty ({len(tokenizer)} tokens): its files "
                              f"(tokenizer.json, or vocab.json + merges.txt) are missing or corrupt. {source_hint}")
    # Older checkpoints' processors lack num_query_tokens; with an image token in the config the model needs it.
    if getattr(processor, "num_query_tokens", 0) is None and getattr(model.config, "image_token_index", None):
        processor.num_query_tokens = model.config.num_query_tokens
    return Blip2Captioner(model=model.eval(), processor=processor)


def _to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] float 0..1 -> [B,H,W,3] uint8 on the CPU."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected an IMAGE tensor [batch, height, width, channels], got {shape}")
    if images.shape[0] == 0:
        raise ValueError("the image batch is empty: there is nothing to caption")
    channels = images.shape[-1]
    if channels == 1:
        images = images.expand(-1, -1, -1, 3)
    elif channels == 4:
        images = images[..., :3]
    elif channels != 3:
        raise ValueError(f"expected 1, 3 or 4 channels in the last dimension, got {channels} (shape "
                         f"{tuple(images.shape)}); a ComfyUI IMAGE is [batch, height, width, channels]")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def caption_images(captioner: Blip2Captioner, images: torch.Tensor, *, max_new_tokens: int = 30,
                   num_beams: int = 1, do_sample: bool = False, seed: int = 0, prompt: str = "",
                   on_image_done: Callable[[int], None] | None = None,
                   check_interrupt: Callable[[], None] | None = None,
                   stop_requested: Callable[[], bool] | None = None) -> list[str]:
    """Caption each image of a ComfyUI IMAGE batch [B,H,W,C] (C = 1, 3 or 4); returns B strings.

    With `prompt` (e.g. "a photo of") each caption is that prefix and its continuation. With `do_sample`,
    image i is sampled with seed `seed + i`, so a run repeats exactly. `check_interrupt()` is called before
    and `on_image_done(i)` after each image. `stop_requested()` is polled at every generated token: once it is
    true generation ends and GenerationStopped is raised.

    Lengths fit the language model's positions: a prompt longer than half of what the query tokens leave is
    cut to that (logged, as the host's CLIP cuts a long prompt), and `max_new_tokens` is lowered to what is left
    (logged) instead of indexing past the position table.
    """
    pixels = _to_rgb_uint8(images)
    model, processor = captioner.model, captioner.processor
    device, dtype = captioner.device, captioner.dtype
    positions = max_positions(model.config)
    prompt = prompt.strip()
    if positions is not None:
        budget = (positions - int(getattr(model.config, "num_query_tokens", 0) or 0) - 2) // 2
        prompt = truncate_text_tokens(processor.tokenizer, prompt, budget, what="MMIG BLIP-2 Caption").strip()
    criteria = stopping_criteria(stop_requested)
    gen_kwargs = dict(min_new_tokens=1, num_beams=num_beams, do_sample=do_sample, stopping_criteria=criteria)
    captions = []
    for i in range(pixels.shape[0]):
        if check_interrupt is not None:
            check_interrupt()
        inputs = processor(images=[pixels[i].numpy()], text=[prompt], return_tensors="pt")
        input_ids = inputs["input_ids"].to(device)
        # Query tokens are in input_ids when the config has an image token, prepended to the embeddings otherwise.
        query = 0 if getattr(model.config, "image_token_index", None) else int(model.config.num_query_tokens)
        new_tokens = cap_new_tokens(max_new_tokens, input_ids.shape[1] + query, positions,
                                    what="MMIG BLIP-2 Caption")
        rng_devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=rng_devices, enabled=do_sample):
            if do_sample:
                torch.manual_seed((seed + i) % 2**64)
            out = model.generate(pixel_values=inputs["pixel_values"].to(device, dtype), input_ids=input_ids,
                                 attention_mask=inputs["attention_mask"].to(device), max_new_tokens=new_tokens,
                                 **gen_kwargs)[0]
        raise_if_stopped(stop_requested)
        # transformers 5 returns prompt + continuation, older versions the continuation only.
        n = input_ids.shape[1]
        if out.shape[0] >= n and torch.equal(out[:n].cpu(), input_ids[0].cpu()):
            out = out[n:]
        continuation = processor.tokenizer.decode(out, skip_special_tokens=True)
        captions.append((prompt + continuation).strip())
        if on_image_done is not None:
            on_image_done(i)
    return captions
