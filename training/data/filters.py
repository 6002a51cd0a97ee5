"""MUMU §4's crop filters: from detections for a caption's nouns to the crops of one interleaved prompt.

Pure functions on boxes: no model, no image, so the filters are tested on synthetic detections.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from training.data import IMAGE_PLACEHOLDER, MAX_CROPS
from training.data.nouns import PERSON_NOUNS, NounMatch

HEAD_QUERY = "head"  # asked of the detector whenever the caption has a person word


@dataclass(frozen=True)
class Detection:
    noun: str  # the vocabulary noun (or HEAD_QUERY) the box was found for
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    score: float


@dataclass(frozen=True)
class Crop:
    match: NounMatch  # the caption word the crop goes before
    box: tuple[int, int, int, int]  # x0, y0, x1, y1, integer pixels inside the image
    score: float
    kind: str  # "object" | "person" | "head"

    def to_json(self) -> dict:
        return {"word": self.match.word, "noun": self.match.noun, "char_start": self.match.start,
                "box": list(self.box), "score": round(float(self.score), 6), "kind": self.kind}


@dataclass(frozen=True)
class FilterConfig:
    min_area: int = 150 * 150  # MUMU: crops with a total area below 150x150 px are dropped
    max_area_fraction: float = 0.75  # ... and above 75 % of the image
    max_crops: int = MAX_CROPS
    head_probability: float = 0.7  # a person crop becomes a head crop 70 % of the time


def pair_rng(seed: int, key: str) -> random.Random:
    """The generator for one pair's draws: a function of (seed, key) only (str seeds hash with SHA-512)."""
    return random.Random(f"{seed}:{key}")


def clamp_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return (max(0, min(width, round(x0))), max(0, min(height, round(y0))),
            max(0, min(width, round(x1))), max(0, min(height, round(y1))))


def box_area(box) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def head_box(person: tuple[int, int, int, int], heads: list[Detection], width: int,
             height: int) -> tuple[int, int, int, int]:
    """The person's head: the best-scoring head detection whose centre lies in the person box (cut to it),
    else the top-centred square of the box with side min(width, height / 2)."""
    px0, py0, px1, py1 = person
    inside = [h for h in heads
              if px0 <= (h.box[0] + h.box[2]) / 2 <= px1 and py0 <= (h.box[1] + h.box[3]) / 2 <= py1]
    if inside:
        best = max(inside, key=lambda h: h.score)
        x0, y0, x1, y1 = clamp_box(best.box, width, height)
        return max(x0, px0), max(y0, py0), min(x1, px1), min(y1, py1)
    side = min(px1 - px0, (py1 - py0) // 2)
    left = px0 + (px1 - px0 - side) // 2
    return left, py0, left + side, py0 + side


def select_crops(matches: list[NounMatch], detections: list[Detection], width: int, height: int,
                 rng: random.Random, config: FilterConfig = FilterConfig(),
                 stats: Counter | None = None) -> list[Crop]:
    """The crops of one prompt, in caption order.

    `matches`: the caption's nouns (first occurrence each); `detections`: boxes for those nouns plus
    HEAD_QUERY boxes. Steps: area limits -> the best box per noun -> at most `max_crops` by score ->
    person crops swapped for head crops with `head_probability` (one draw per kept person crop).
    """
    stats = stats if stats is not None else Counter()
    max_area = config.max_area_fraction * width * height
    heads = [d for d in detections if d.noun == HEAD_QUERY]
    by_noun = {m.noun: m for m in matches}

    best: dict[str, tuple[tuple[int, int, int, int], float]] = {}
    for det in detections:
        if det.noun not in by_noun:
            continue  # a head box for the swap only, or a label the caption does not have
        box = clamp_box(det.box, width, height)
        area = box_area(box)
        if area < config.min_area:
            stats["dropped_small"] += 1
        elif area > max_area:
            stats["dropped_large"] += 1
        elif det.noun not in best or det.score > best[det.noun][1]:
            if det.noun in best:
                stats["dropped_same_noun"] += 1
            best[det.noun] = (box, float(det.score))
        else:
            stats["dropped_same_noun"] += 1

    # Highest score first; ties broken by caption position so the order never depends on dict order.
    ranked = sorted(best.items(), key=lambda item: (-item[1][1], by_noun[item[0]].start))
    stats["dropped_over_cap"] += max(0, len(ranked) - config.max_crops)
    crops = []
    for noun, (box, score) in ranked[:config.max_crops]:
        kind = "person" if noun in PERSON_NOUNS else "object"
        if kind == "person":
            stats["person_crops"] += 1
            if rng.random() < config.head_probability:
                head = head_box(box, heads, width, height)
                if box_area(head) >= config.min_area:
                    box, kind = head, "head"
                    stats["head_swaps"] += 1
                else:
                    stats["head_too_small"] += 1
        crops.append(Crop(by_noun[noun], box, score, kind))
    return sorted(crops, key=lambda crop: crop.match.start)


def interleave(caption: str, crops: list[Crop]) -> str:
    """The caption with an `<image>` placeholder before each crop's word (crops in caption order)."""
    prompt = caption
    for crop in sorted(crops, key=lambda c: c.match.start, reverse=True):
        prompt = prompt[:crop.match.start] + IMAGE_PLACEHOLDER + " " + prompt[crop.match.start:]
    return prompt
