"""Interleaved text-and-image prompts (MUMU): "a <image1> man and his <image2> dog".

`build_prompt(text, images, masks)` parses the placeholders against the images actually connected and
returns an `MMPrompt`: the ordered segments (strings, and indices into its `images`). Numbered
placeholders `<image1>` ... `<imageN>` name an input; bare `<image>` placeholders take the connected
images in order. A mask cuts its object out of the background (MUMU segments objects at test time:
background details otherwise leak into the generation); the background becomes black, the colour MUMU
pads its conditioning images with.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

PLACEHOLDER = re.compile(r"<image(\d*)>")
# The text a prompt keeps (about 1000 tokens): a caption-length prompt is far shorter, and a 60k-character one
# took 11 s to encode. Longer text is cut with a log line, as the host's CLIP cuts what it cannot use.
MAX_TEXT_CHARS = 4000
log = logging.getLogger("ComfyUI-MMIG")


class PromptError(ValueError):
    """A multimodal prompt does not match its images."""


@dataclass(frozen=True)
class MMPrompt:
    """One prompt: `segments` in reading order, each a text string or an index into `images`.

    `images` are [H, W, 3] float tensors in 0..1 (background already cut away where a mask was given).
    """
    segments: tuple
    images: tuple

    @property
    def text_only(self) -> str:
        return "".join(s for s in self.segments if isinstance(s, str))

    def image_count(self) -> int:
        return sum(1 for s in self.segments if isinstance(s, int))


def _single_image(name: str, image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() not in (3, 4):
        raise PromptError(f"{name} is not a ComfyUI IMAGE tensor [batch, height, width, channels]")
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise PromptError(f"{name} holds a batch of {image.shape[0]} images; a placeholder stands for one "
                              f"image: pick one with 'ImageFromBatch', or connect each to its own input")
        image = image[0]
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise PromptError(f"{name} has {channels} channels; expected 1, 3 or 4 (shape {tuple(image.shape)})")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise PromptError(f"{name} is {image.shape[1]}x{image.shape[0]} px: too small to encode")
    return image.detach().float().clamp(0, 1).cpu()


def cut_out(image: torch.Tensor, mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Keep the masked object of an [H, W, 3] image and blacken the rest; the mask is resized to fit."""
    if mask.dim() == 3:
        if mask.shape[0] != 1:
            raise PromptError(f"{name} holds {mask.shape[0]} masks; connect a single mask per image")
        mask = mask[0]
    if mask.dim() != 2:
        raise PromptError(f"{name} is not a ComfyUI MASK [batch, height, width] (shape {tuple(mask.shape)})")
    mask = mask.detach().float().clamp(0, 1).cpu()
    if mask.shape != image.shape[:2]:
        mask = torch.nn.functional.interpolate(mask[None, None], size=image.shape[:2], mode="bilinear",
                                               align_corners=False)[0, 0]
    if mask.max() <= 0:
        raise PromptError(f"{name} is empty (all zero): it would cut the whole image away")
    return image * mask[..., None]


def build_prompt(text: str, images: dict[int, torch.Tensor], masks: dict[int, torch.Tensor] | None = None) -> MMPrompt:
    """Parse `text` against the connected `images` ({input number: IMAGE}) and optional `masks`.

    Errors name what to fix: an empty prompt, a placeholder without an image, an image no placeholder
    uses, mixed numbered and bare placeholders, a mask without its image.
    """
    masks = masks or {}
    if not isinstance(text, str) or not text.strip():
        raise PromptError("the prompt is empty: write a text, with <image1>, <image2>, ... where the images go")
    for number in masks:
        if number not in images:
            raise PromptError(f"mask{number} is connected but image{number} is not: connect the image it cuts out")
    connected = sorted(images)
    matches = list(PLACEHOLDER.finditer(text))
    numbered = [m for m in matches if m.group(1)]
    bare = [m for m in matches if not m.group(1)]
    if numbered and bare:
        raise PromptError("the prompt mixes numbered placeholders (<image1>) with bare ones (<image>): use one kind")
    if bare:
        if len(bare) != len(connected):
            raise PromptError(f"the prompt has {len(bare)} <image> placeholder(s) but {len(connected)} image(s) are "
                              f"connected: each bare <image> takes the next connected image, so the counts must match")
        references = connected
    else:
        references = [int(m.group(1)) for m in numbered]
        missing = sorted({r for r in references if r not in images})
        if missing:
            have = ", ".join(f"image{n}" for n in connected) or "none"
            raise PromptError(f"the prompt references {', '.join(f'<image{n}>' for n in missing)} but that input "
                              f"is not connected (connected: {have}): connect it or remove the placeholder")
        unused = [n for n in connected if n not in references]
        if unused:
            raise PromptError(f"{', '.join(f'image{n}' for n in unused)} is connected but the prompt has no "
                              f"{', '.join(f'<image{n}>' for n in unused)}: put the placeholder where the image "
                              f"belongs, or disconnect it")

    order = sorted(set(references), key=references.index)  # images in order of first mention
    prepared = []
    for number in order:
        image = _single_image(f"image{number}", images[number])
        if number in masks:
            image = cut_out(image, masks[number], name=f"mask{number}")
        prepared.append(image)
    segments, cursor = [], 0
    for match, number in zip(matches, references):
        if match.start() > cursor:
            segments.append(text[cursor:match.start()])
        segments.append(order.index(number))
        cursor = match.end()
    if cursor < len(text):
        segments.append(text[cursor:])
    return MMPrompt(segments=tuple(_truncate_text(segments)), images=tuple(prepared))


def _truncate_text(segments: list) -> list:
    """Segments whose text totals at most MAX_TEXT_CHARS; every image keeps its place (logged when cut)."""
    total = sum(len(s) for s in segments if isinstance(s, str))
    if total <= MAX_TEXT_CHARS:
        return segments
    log.warning("MMIG Multimodal Prompt: the text is %d characters long; keeping its first %d (images kept).",
                total, MAX_TEXT_CHARS)
    kept, left = [], MAX_TEXT_CHARS
    for segment in segments:
        if isinstance(segment, int):
            kept.append(segment)
        elif left > 0:
            kept.append(segment[:left])
            left -= len(kept[-1])
    return kept
