"""MUMU §4's crop filters: from detections for a caption's nouns to the crops of one interleaved prompt.

Pure functions on boxes: no model, no image, so the filters are tested on synthetic detections.
"""
from __future__ import annotations

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
    kind: str  # "object" | "person" (a head crop is chosen at train time, from head_box)
    head_box: tuple[int, int, int, int] | None = None  # person crops: the head inside the box
    head_detected: bool = False  # head_box is a "head" detection (else the box's top square)

    def to_json(self) -> dict:
        info = {"word": self.match.word, "noun": self.match.noun, "char_start": self.match.start,
                "box": list(self.box), "score": round(float(self.score), 6), "kind": self.kind}
        if self.head_box is not None:
            info["head_box"] = list(self.head_box)
            info["head_source"] = "detected" if self.head_detected else "top_square"
        return info


@dataclass(frozen=True)
class FilterConfig:
    min_area: int = 150 * 150  # MUMU: crops with a total area below 150x150 px are dropped
    max_area_fraction: float = 0.75  # ... and above 75 % of the image
    max_crops: int = MAX_CROPS


def clamp_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    return (max(0, min(width, round(x0))), max(0, min(height, round(y0))),
            max(0, min(width, round(x1))), max(0, min(height, round(y1))))


def box_area(box) -> int:
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


def top_square(person: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The top-centred square of a person box, side min(width, height / 2): where no head was detected."""
    px0, py0, px1, py1 = person
    side = min(px1 - px0, (py1 - py0) // 2)
    left = px0 + (px1 - px0 - side) // 2
    return left, py0, left + side, py0 + side


def find_head(person: tuple[int, int, int, int], heads: list[Detection], width: int,
              height: int) -> tuple[tuple[int, int, int, int], bool]:
    """(head box, detected): the best-scoring head detection whose centre lies in the person box (cut to it),
    else (`top_square(person)`, False)."""
    px0, py0, px1, py1 = person
    inside = [h for h in heads
              if px0 <= (h.box[0] + h.box[2]) / 2 <= px1 and py0 <= (h.box[1] + h.box[3]) / 2 <= py1]
    if inside:
        best = max(inside, key=lambda h: h.score)
        x0, y0, x1, y1 = clamp_box(best.box, width, height)
        return (max(x0, px0), max(y0, py0), min(x1, px1), min(y1, py1)), True
    return top_square(person), False


def head_box(person: tuple[int, int, int, int], heads: list[Detection], width: int,
             height: int) -> tuple[int, int, int, int]:
    """The person's head box (`find_head` without the flag)."""
    return find_head(person, heads, width, height)[0]


def select_crops(matches: list[NounMatch], detections: list[Detection], width: int, height: int,
                 config: FilterConfig = FilterConfig(), stats: Counter | None = None) -> list[Crop]:
    """The crops of one prompt, in caption order.

    `matches`: the caption's nouns (first occurrence each); `detections`: boxes for those nouns plus
    HEAD_QUERY boxes. Steps: area limits -> the best box per noun -> at most `max_crops` by score ->
    each person crop records its head box. Nothing is drawn here: MUMU swaps 70 % of the person crops for
    head crops at train time, anew each time a record is drawn (`training.mumu_data.swap_heads`).
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
        if noun in PERSON_NOUNS:
            head, detected = find_head(box, heads, width, height)
            stats["person_crops"] += 1
            stats["heads_detected"] += detected
            stats["heads_below_min_area"] += box_area(head) < config.min_area  # they keep the person crop
            crops.append(Crop(by_noun[noun], box, score, "person", head, detected))
        else:
            crops.append(Crop(by_noun[noun], box, score, "object"))
    return sorted(crops, key=lambda crop: crop.match.start)


def interleave(caption: str, crops: list[Crop]) -> str:
    """The caption with an `<image>` placeholder before each crop's word (crops in caption order)."""
    prompt = caption
    for crop in sorted(crops, key=lambda c: c.match.start, reverse=True):
        prompt = prompt[:crop.match.start] + IMAGE_PLACEHOLDER + " " + prompt[crop.match.start:]
    return prompt
