"""Read a world image back into objects and check it against a caption or a scene, by rule.

Segmentation: each pixel takes the nearest palette colour (object colours and backgrounds); a pixel farther than
`COLOUR_TOLERANCE` from every palette entry is unassigned. Each object colour's largest connected region is one
detected object (the world never repeats a colour in a scene). Shape: the region's fill of its bounding box
(square ~1.0, circle ~0.79, triangle ~0.5) with the bounding box's aspect as a sanity check.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import BACKGROUNDS, COLOURS, SHAPES, Scene

COLOUR_TOLERANCE = 90.0  # RGB euclidean; palette entries are >= ~120 apart
MIN_AREA = 120  # pixels; a MIN_SIZE triangle covers ~390


@dataclass(frozen=True)
class Detected:
    colour: str
    shape: str | None  # None when the region's geometry fits no shape
    area: int
    cx: float
    cy: float
    fill: float


def _as_uint8(image) -> np.ndarray:
    """Accept uint8 HxWx3, float HxWx3 in [0, 1], or a torch BHWC / HWC tensor (first image of a batch)."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 4:
        image = image[0]
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"a world image is HxWx3, got shape {image.shape}")
    return image


_PALETTE_NAMES = list(COLOURS) + [f"bg:{b}" for b in BACKGROUNDS]
_PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), np.float32)


def colour_labels(image) -> np.ndarray:
    """HxW int: index into `_PALETTE_NAMES`, or -1 for a pixel near no palette colour."""
    pixels = _as_uint8(image).astype(np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)
    labels = distance.argmin(-1)
    labels[distance.min(-1) > COLOUR_TOLERANCE] = -1
    return labels


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (pure numpy/python; images are 128x128)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, bool)
    best: list[tuple[int, int]] = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, region = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask, bool)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def classify_shape(region: np.ndarray) -> tuple[str | None, float]:
    ys, xs = np.nonzero(region)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = float(region.sum()) / float(h * w)
    if max(h, w) > 1.6 * min(h, w):
        return None, fill
    if fill >= 0.9:
        return "square", fill
    if 0.68 <= fill < 0.9:
        return "circle", fill
    if 0.38 <= fill < 0.62:
        return "triangle", fill
    return None, fill


def detect(image) -> list[Detected]:
    """The objects in a world image, left to right."""
    labels = colour_labels(image)
    found = []
    for index, colour in enumerate(COLOURS):
        mask = labels == index
        if mask.sum() < MIN_AREA:
            continue
        region = _largest_component(mask)
        area = int(region.sum())
        if area < MIN_AREA:
            continue
        shape, fill = classify_shape(region)
        ys, xs = np.nonzero(region)
        found.append(Detected(colour, shape, area, float(xs.mean()), float(ys.mean()), round(fill, 3)))
    return sorted(found, key=lambda d: d.cx)


_OBJECT = re.compile(r"\b(?:a|an)\s+(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")\b")
_GROUND = re.compile(r"\bon an?\s+(" + "|".join(BACKGROUNDS) + r")(?:\s+and\s+(" + "|".join(BACKGROUNDS) + r"))?\s+background\b")


def parse_caption(text: str) -> tuple[list[tuple[str, str]], tuple[str, ...]]:
    """([(colour, shape)] in order, (background[, background2])) from a world caption; tolerant of extra words."""
    text = text.lower()
    objects = [(m.group(1), m.group(2)) for m in _OBJECT.finditer(text)]
    ground = _GROUND.search(text)
    grounds = tuple(g for g in ground.groups() if g) if ground else ()
    return objects, grounds


def expected_objects(target: Scene | str) -> list[tuple[str, str]]:
    if isinstance(target, Scene):
        return [(o.colour, o.shape) for o in target.objects]
    return parse_caption(target)[0]


def backgrounds(image) -> tuple[str | None, str | None]:
    """The background colour of the image's left and right halves: the commonest background-palette label among
    each half's pixels (None when a half has no background pixel). A plain scene reads (g, g)."""
    labels = colour_labels(image)
    first = len(COLOURS)
    names = list(BACKGROUNDS)
    halves = []
    for half in (labels[:, : labels.shape[1] // 2], labels[:, labels.shape[1] // 2:]):
        counts = np.bincount(half[half >= first] - first, minlength=len(names))
        halves.append(names[int(counts.argmax())] if counts.sum() else None)
    return halves[0], halves[1]


def expected_backgrounds(target: Scene | str) -> tuple[str, str] | None:
    """(left, right) background names of a scene or caption; None when a caption names no background."""
    if isinstance(target, Scene):
        grounds = (target.background, target.background2 or target.background)
    else:
        named = parse_caption(target)[1]
        if not named:
            return None
        grounds = (named[0], named[-1])
    return grounds


def score(image, target: Scene | str) -> dict:
    """How an image matches a caption or scene.

    present: fraction of the expected objects found with the right colour AND shape;
    colours_present: fraction found with the right colour (any shape);
    all_present: every expected object found (the concept-neglect figure);
    exact: all present and nothing else (no extra object colour);
    background: the left and right halves' background colours are the target's (False when it names none).
    """
    expected = expected_objects(target)
    if not expected:
        raise ValueError(f"no world object in {target!r}: a caption names objects as 'a red circle'")
    found = {d.colour: d for d in detect(image)}
    hits = [c in found and found[c].shape == s for c, s in expected]
    colour_hits = [c in found for c, _ in expected]
    extra = sorted(set(found) - {c for c, _ in expected})
    return {
        "present": sum(hits) / len(expected),
        "colours_present": sum(colour_hits) / len(expected),
        "all_present": all(hits),
        "exact": all(hits) and not extra,
        "extra": extra,
        "background": backgrounds(image) == expected_backgrounds(target),
    }


def caption_matches(predicted: str, target: Scene | str) -> bool:
    """A caption names exactly the target's objects (order-free) and its background(s)."""
    objects, grounds = parse_caption(predicted)
    if isinstance(target, Scene):
        want_objects = expected_objects(target)
        want_grounds = tuple(g for g in (target.background, target.background2) if g)
    else:
        want_objects, want_grounds = parse_caption(target)
    return sorted(objects) == sorted(want_objects) and set(grounds) == set(want_grounds)


def names_objects(predicted: str, target: Scene | str) -> bool:
    """An answer names every target object (colour and shape); backgrounds and extra words ignored."""
    objects, _ = parse_caption(predicted)
    return set(expected_objects(target)) <= set(objects)


def masked_psnr(a, b, mask: np.ndarray) -> float:
    """PSNR (dB) between two images over the pixels where `mask` is true; inf when identical there."""
    a, b = _as_uint8(a).astype(np.float64), _as_uint8(b).astype(np.float64)
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise ValueError("masked_psnr: the mask selects no pixel")
    mse = float(((a - b) ** 2)[mask].mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 ** 2 / mse)
