"""MUMU training records: an image, its caption and the crops of caption words (MUMU §4), read as a map-style
dataset. Prompt construction and augmentation happen later, per step, from the sample's seed
(`training/mumu_prompts.py`).

A records folder holds `records.jsonl`, one JSON object per line:

    {"image": "images/0001.png", "caption": "a man and his dog on a beach",
     "crops": [{"box": [x0, y0, x1, y1], "char_index": 2, "label": "person"},      # a box into the image
               {"image": "crops/0001_1.png", "char_index": 14, "label": "dog"}]}   # or a crop file

Paths are relative to the folder; `char_index` is where the crop's word starts in the caption (the crop is
inserted before it). A "person" crop may give its head as "head_box" (into the image); without one its head
is the top-centred square of the crop (side min(width, height / 2)), the bootstrapper's rule.
`python -m training.mumu_data synthetic OUT [--count N]` writes a small synthetic folder.

Head crops (MUMU §4-5: "for detected person crops, we replaced the crop of the full person with a crop of
their head 70 % of the time"): items carry each person crop's head beside it, and `swap_heads` draws the
swap at train time from the sample's own generator, so a record gives a head crop in ~70 % of the steps
that draw it. A head below `min_area` (MUMU's 150x150 crop filter) keeps the person crop and is counted.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.config import ConfigError
from training.mumu_prompts import Crop

RECORDS = "records.jsonl"
HEAD_PROBABILITY = 0.7  # MUMU §4-5: 70 % of person crops become head crops
HEAD_MIN_AREA = 150 * 150  # MUMU §4's crop filter, applied to the head crop too
PERSON_LABEL, HEAD_LABEL = "person", "head"


class RecordsError(ConfigError):
    """A records folder or line that cannot be read; the message names the file and line (exit code 2)."""


def _read_rgb(path: Path) -> torch.Tensor:
    from PIL import Image
    import numpy as np
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as e:
        raise RecordsError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(array).float() / 255.0


def read_records(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    path = folder / RECORDS
    if not folder.is_dir():
        raise RecordsError(f"MUMU records folder not found: {folder} (expected a folder with {RECORDS})")
    if not path.is_file():
        raise RecordsError(f"{folder} has no {RECORDS}: write one JSON object per line with image, caption, "
                           f"crops (see training/mumu_data.py)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record.get("image"), str) or not isinstance(record.get("caption"), str):
                raise ValueError("needs 'image' (a path) and 'caption' (a string)")
            for crop in record.get("crops", []):
                if ("box" in crop) == ("image" in crop) or not isinstance(crop.get("char_index"), int):
                    raise ValueError("each crop needs either 'box' or 'image', and an integer 'char_index'")
        except (json.JSONDecodeError, ValueError, AttributeError, TypeError) as e:
            raise RecordsError(f"{path} line {number}: {e}") from None
        records.append(record)
    if not records:
        raise RecordsError(f"{path} holds no records")
    return records


def target_image(image: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training target: shorter side resized to `resolution`, centre-cropped square, [3, R, R] in 0..1;
    and SDXL's size conditioning (original h, w, crop top, left, target h, w)."""
    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    rh, rw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    resized = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(rh, rw), mode="bilinear",
                                              antialias=True, align_corners=False)[0]
    top, left = (rh - resolution) // 2, (rw - resolution) // 2
    square = resized[:, top:top + resolution, left:left + resolution].clamp(0, 1)
    time_ids = torch.tensor([h, w, top, left, resolution, resolution], dtype=torch.float32)
    return square, time_ids


def top_square(image: torch.Tensor) -> torch.Tensor:
    """The top-centred square of a [h, w, 3] person crop, side min(w, h / 2): its head where none was given."""
    h, w = image.shape[:2]
    side = min(w, h // 2)
    left = (w - side) // 2
    return image[:side, left:left + side]


@dataclass
class MUMUItem:
    image: torch.Tensor  # the whole input, [H, W, 3] in 0..1 (control images are drawn from it)
    caption: str
    crops: list[Crop]
    target: torch.Tensor  # [3, R, R] in 0..1
    time_ids: torch.Tensor  # [6]
    heads: list[torch.Tensor | None] = field(default_factory=list)  # per crop: a person crop's head, else None


def swap_heads(crops: list[Crop], heads: list[torch.Tensor | None], generator: torch.Generator,
               probability: float = HEAD_PROBABILITY, min_area: int = HEAD_MIN_AREA,
               stats: Counter | None = None) -> list[Crop]:
    """The crops of one draw of a record: each crop with a head (a person crop) becomes a head crop with
    `probability`, one draw per person crop from `generator` (the sample's own); a head smaller than
    `min_area` px keeps the person crop and counts as `head_too_small` in `stats`."""
    stats = stats if stats is not None else Counter()
    out = []
    for i, crop in enumerate(crops):
        head = heads[i] if i < len(heads) else None
        if head is None:
            out.append(crop)
            continue
        stats["person_crops"] += 1
        if float(torch.rand((), generator=generator)) >= probability:
            out.append(crop)
        elif head.shape[0] * head.shape[1] < min_area or min(head.shape[:2]) < 2:
            stats["head_too_small"] += 1
            out.append(crop)
        else:
            stats["head_swaps"] += 1
            out.append(Crop(head.to(crop.image.device), crop.char_index, HEAD_LABEL))  # the batch moved heads
    return out


class MUMURecords(torch.utils.data.Dataset):
    """Records of one folder; `require_labels` keeps only records with a crop of those labels (stage 2)."""

    def __init__(self, folder: str | Path, resolution: int, require_labels: tuple[str, ...] = ()):
        self.folder, self.resolution = Path(folder), resolution
        self.records = read_records(self.folder)
        if require_labels:
            self.records = [r for r in self.records
                            if any(c.get("label") in require_labels for c in r.get("crops", []))]
            if not self.records:
                raise RecordsError(f"no record in {self.folder} has a crop labelled {', '.join(require_labels)} "
                                   f"(stage 2 trains on face/person crops)")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> MUMUItem:
        record = self.records[index]
        image = _read_rgb(self.folder / record["image"])
        crops, heads = [], []
        for crop in record.get("crops", []):
            pixels = (self._cut(image, crop["box"], index) if "box" in crop
                      else _read_rgb(self.folder / crop["image"]))
            label = crop.get("label", "object")
            crops.append(Crop(pixels, crop["char_index"], label))
            if label != PERSON_LABEL:
                heads.append(None)
            elif "head_box" in crop:
                heads.append(self._cut(image, crop["head_box"], index))
            else:
                heads.append(top_square(pixels))
        target, time_ids = target_image(image, self.resolution)
        return MUMUItem(image, record["caption"], crops, target, time_ids, heads)

    def _cut(self, image: torch.Tensor, box, index: int) -> torch.Tensor:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        x0, y0 = max(0, x0), max(0, y0)
        x1, y1 = min(image.shape[1], x1), min(image.shape[0], y1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            raise RecordsError(f"{self.folder / RECORDS} record {index}: crop box {list(box)} is empty")
        return image[y0:y1, x0:x1]


def collate(items: list[MUMUItem]) -> dict:
    """Targets and size conditioning batched; images, captions and crops stay per-sample lists."""
    return {"target": torch.stack([i.target for i in items]), "time_ids": torch.stack([i.time_ids for i in items]),
            "image": [i.image for i in items], "caption": [i.caption for i in items],
            "crops": [i.crops for i in items], "heads": [i.heads for i in items]}


COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.9, 0.1)}


def write_synthetic_records(folder: str | Path, count: int = 8, size: int = 48, seed: int = 0) -> Path:
    """Pictures of a coloured "person" block and a coloured "dog" block, captioned, with both crops as boxes."""
    from PIL import Image
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    names = list(COLOURS)
    lines = []
    for i in range(count):
        image = torch.full((size, size + 8, 3), 0.5) + 0.1 * torch.rand(size, size + 8, 3, generator=generator)
        person, thing = (names[int(torch.randint(0, len(names), (), generator=generator))] for _ in range(2))
        image[4:size - 4, 4:size // 2] = torch.tensor(COLOURS[person])
        image[size // 2:size - 6, size // 2 + 6:size] = torch.tensor(COLOURS[thing])
        Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(folder / f"images/{i:04d}.png")
        caption = f"a {person} person next to a {thing} dog"
        crops = [{"box": [4, 4, size // 2, size - 4], "char_index": caption.index(" person") + 1, "label": "person"},
                 {"box": [size // 2 + 6, size // 2, size, size - 6], "char_index": caption.rindex(" dog") + 1,
                  "label": "dog"}]
        lines.append(json.dumps({"image": f"images/{i:04d}.png", "caption": caption, "crops": crops}))
    (folder / RECORDS).write_text("\n".join(lines) + "\n")
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="MUMU training records")
    sub = parser.add_subparsers(dest="command", required=True)
    synthetic = sub.add_parser("synthetic", help="write a small synthetic records folder")
    synthetic.add_argument("out", type=Path)
    synthetic.add_argument("--count", type=int, default=8)
    args = parser.parse_args(argv)
    print(write_synthetic_records(args.out, args.count))



def _pil_to_tensor(image) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).float() / 255.0


class BootstrapRecords(torch.utils.data.Dataset):
    """The dataset bootstrapper's WebDataset shards (`training.data`, its manifest format) as MUMU items.

    Each crop keeps its caption position (`char_start`) and kind, a person crop its head (cut at the
    recorded head_box, swapped in at train time by `swap_heads`), and the prompt is drawn per step. Version-1
    folders (heads drawn at bootstrap) read as they are, without head alternatives."""

    def __init__(self, folder: str | Path, resolution: int, require_labels: tuple[str, ...] = (),
                 on_corrupt: str = "skip"):
        from training.data.reader import BootstrapDataset
        self.source, self.resolution = BootstrapDataset(folder, on_corrupt=on_corrupt), resolution
        self.indices = list(range(len(self.source)))
        if require_labels:  # stage 2 needs a person or head crop in each: reads each record's JSON only
            self.indices = [i for i in self.indices
                            if any(c.get("kind") in require_labels for c in self.source.info(i)["crops"])]
            if not self.indices:
                raise RecordsError(f"no record in {folder} has a crop of kind {', '.join(require_labels)}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> MUMUItem:
        record = self.source[self.indices[index]]
        image = _pil_to_tensor(record["target"])
        crops = [Crop(_pil_to_tensor(pixels), int(info["char_start"]), info.get("kind", "object"))
                 for pixels, info in zip(record["crops"], record["crop_info"])]
        heads = [None if head is None else _pil_to_tensor(head) for head in record["heads"]]
        target, time_ids = target_image(image, self.resolution)
        return MUMUItem(image, record["caption"], crops, target, time_ids, heads)


def open_records(folder: str | Path, resolution: int, require_labels: tuple[str, ...] = ()):
    """A bootstrapper output folder (manifest.json) or a records.jsonl folder."""
    from training.data import MANIFEST_NAME
    folder = Path(folder)
    if (folder / MANIFEST_NAME).is_file():
        return BootstrapRecords(folder, resolution, require_labels)
    return MUMURecords(folder, resolution, require_labels)


if __name__ == "__main__":
    main()
