"""MUMU's train-time prompt construction (§5): which crops and control image go into a prompt, and the
augmentation of conditioning images. Every draw comes from the sample's own generator, so a run is
deterministic and resumes with the same prompts.

Stage 1: the record's detected object crops (at most 3), each inserted before its word in the caption, and
30 % of the time a control image (canny, sketch or depth) of the whole input placed first: at most 4 images.
Stage 2: a single face or person crop, at a higher token count (the VLM's image resolution, set per stage).
20 % of the conditioning images get augmented: a random crop, then a flip, Gaussian noise and grayscaling,
each with probability `op_probability`. Padding to a black square happens when the VLM reads the prompt
(`mmig_core.vlm.square_image`), at inference and training alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mmig_core.mm_prompt import MMPrompt


@dataclass
class Crop:
    image: torch.Tensor  # [h, w, 3] float 0..1
    char_index: int  # where in the caption it goes: before the word that starts here
    label: str = "object"


@dataclass
class PromptRules:
    stage: int = 1
    max_objects: int = 3
    max_images: int = 4
    control_probability: float = 0.3
    control_kinds: tuple[str, ...] = ("canny", "sketch")
    augment_probability: float = 0.2
    op_probability: float = 0.5  # of flip, noise and grayscale within an augmented image
    crop_scale: tuple[float, float] = (0.6, 1.0)  # side of the random crop, as a fraction of the image
    noise_std: tuple[float, float] = (0.02, 0.08)
    stage2_labels: tuple[str, ...] = ("person", "head", "face")

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        for name in ("control_probability", "augment_probability", "op_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {getattr(self, name)}")
        if self.max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {self.max_images}")


@dataclass
class PromptDraw:
    """What was drawn for one prompt (for tests and logs)."""
    prompt: MMPrompt
    control_kind: str | None = None
    augmented: list[bool] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


def _uniform(generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def augment_image(image: torch.Tensor, rules: PromptRules, generator: torch.Generator) -> torch.Tensor:
    """Random crop, then flip / Gaussian noise / grayscale each with probability `rules.op_probability`."""
    h, w = image.shape[:2]
    scale = _uniform(generator, *rules.crop_scale)
    ch, cw = max(2, round(h * scale)), max(2, round(w * scale))
    top = int(torch.randint(0, h - ch + 1, (), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (), generator=generator))
    out = image[top:top + ch, left:left + cw]
    flip, noise, gray = (bool(torch.rand((), generator=generator) < rules.op_probability) for _ in range(3))
    std = _uniform(generator, *rules.noise_std)
    if flip:
        out = out.flip(1)
    if noise:
        out = out + torch.randn(out.shape, generator=generator) * std
    if gray:
        out = (out * torch.tensor([0.299, 0.587, 0.114])).sum(-1, keepdim=True).expand(-1, -1, 3)
    return out.clamp(0, 1).contiguous()


def _pick_objects(crops: list[Crop], rules: PromptRules, slots: int, generator) -> list[Crop]:
    if rules.stage == 2:
        people = [c for c in crops if c.label in rules.stage2_labels]
        if not people:
            return []
        return [people[int(torch.randint(0, len(people), (), generator=generator))]]
    limit = min(rules.max_objects, slots)
    if len(crops) <= limit:
        return list(crops)
    keep = sorted(torch.randperm(len(crops), generator=generator)[:limit].tolist())
    return [crops[i] for i in keep]


def sample_prompt(caption: str, image: torch.Tensor, crops: list[Crop], rules: PromptRules,
                  generator: torch.Generator, make_control: Callable[[torch.Tensor, str], torch.Tensor]) -> PromptDraw:
    """The interleaved prompt for one training sample; `make_control(image, kind)` renders a control image."""
    control_kind = None
    if rules.stage == 1 and rules.control_kinds:
        wants_control = bool(torch.rand((), generator=generator) < rules.control_probability)
        kind = rules.control_kinds[int(torch.randint(0, len(rules.control_kinds), (), generator=generator))]
        control_kind = kind if wants_control else None
    objects = _pick_objects(crops, rules, rules.max_images - (control_kind is not None), generator)
    objects = sorted(objects, key=lambda c: c.char_index)

    images, labels, segments = [], [], []
    if control_kind is not None:
        images.append(make_control(image, control_kind))
        labels.append(control_kind)
        segments += [0, " "]
    cursor = 0
    for crop in objects:
        at = min(max(crop.char_index, cursor), len(caption))
        if caption[cursor:at]:
            segments.append(caption[cursor:at])
        segments += [len(images), " "]
        images.append(crop.image)
        labels.append(crop.label)
        cursor = at
    segments.append(caption[cursor:])
    merged = []  # adjacent text pieces become one segment, as build_prompt writes them
    for s in segments:
        if isinstance(s, str) and merged and isinstance(merged[-1], str):
            merged[-1] += s
        elif not (isinstance(s, str) and not s):
            merged.append(s)

    augmented = [bool(torch.rand((), generator=generator) < rules.augment_probability) for _ in images]
    images = [augment_image(im, rules, generator) if aug else im.float().clamp(0, 1)
              for im, aug in zip(images, augmented)]
    return PromptDraw(MMPrompt(segments=tuple(merged), images=tuple(images)), control_kind, augmented, labels)
