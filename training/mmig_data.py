"""Image-caption pairs for the `mmig` recipe.

Two layouts:
- a folder: each image (`.png`, `.jpg`, `.jpeg`, `.webp`, `.bmp`) with its caption in a `.txt` of the same
  name, and optionally an object mask `<name>.mask.png` (white = the object; L_fg / L_bg of stage 3+);
- a JSON-lines manifest (`.jsonl`): one object per line, `{"image": path, "caption": text}` plus optional
  `"mask": path` and `"concepts": ["cat", "dog"]` (the words whose cross-attention maps L_AS / L_AR keep
  apart and alive). Relative paths are relative to the manifest.

Every image is resized (shorter side) and centre-cropped to `resolution` px; item i is the same on every run.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """The dataset path or a record in it is unusable; the message names it."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """The dataset path does not exist (the training entry point reports it as a usage error)."""


def _records(path: Path) -> list[dict]:
    if not path.exists():
        raise DatasetNotFoundError(f"the dataset path {path} does not exist: give a folder of images with .txt "
                                   f"captions, or a .jsonl manifest (recipe.data)")
    if path.is_file():
        if path.suffix != ".jsonl":
            raise DataError(f"{path}: a dataset file must be a JSON-lines manifest (.jsonl)")
        records = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                record["image"] = str(path.parent / record["image"])
                str(record["caption"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path} line {number}: expected {{\"image\": ..., \"caption\": ...}} ({e})") from None
            if record.get("mask"):
                record["mask"] = str(path.parent / record["mask"])
            records.append(record)
        return records
    records = []
    for image in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                        and not p.name.endswith(".mask.png")):
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise DataError(f"{image} has no caption file {caption.name} beside it")
        mask = image.with_name(image.stem + ".mask.png")
        records.append({"image": str(image), "caption": caption.read_text().strip(),
                        "mask": str(mask) if mask.is_file() else None})
    return records


def _load(path: str, resolution: int, mode: str) -> torch.Tensor:
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as image:
            image = ImageOps.fit(image.convert(mode), (resolution, resolution), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the image {path}: {e}") from None
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float() / 255
    return data.reshape(resolution, resolution, -1).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    def __init__(self, path: str | Path, resolution: int):
        self.path, self.resolution = Path(path), resolution
        self.records = _records(self.path)
        if not self.records:
            raise DataError(f"{self.path} holds no image-caption pairs")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = {"image": _load(record["image"], self.resolution, "RGB"), "caption": str(record["caption"]).strip(),
                "concepts": list(record.get("concepts") or [])}
        item["mask"] = _load(record["mask"], self.resolution, "L") if record.get("mask") else None
        if not item["caption"]:
            raise DataError(f"{record['image']}: its caption is empty")
        return item


def collate(items: list[dict]) -> dict:
    masks = [item["mask"] for item in items]
    return {"image": torch.stack([item["image"] for item in items]),
            "caption": [item["caption"] for item in items],
            "concepts": [item["concepts"] for item in items],
            "mask": torch.stack(masks) if all(m is not None for m in masks) else None}


def write_synthetic_pairs(folder: str | Path, count: int = 4) -> Path:
    """A few coloured 40x40 px images with captions, object masks and concepts, and their .jsonl manifest:
    data for a smoke run of every stage on the tiny models. Returns the manifest."""
    from PIL import Image, ImageDraw
    colours = [("red", (200, 40, 40)), ("blue", (40, 40, 200)), ("green", (40, 180, 40)), ("yellow", (210, 200, 40))]
    animals = ["cat", "dog"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        (name, rgb), (_, other) = colours[i % 4], colours[(i + 1) % 4]
        first, second = animals[i % 2], animals[(i + 1) % 2]
        image = Image.new("RGB", (40, 40), other)
        ImageDraw.Draw(image).rectangle((8, 8, 28, 28), fill=rgb)
        mask = Image.new("L", (40, 40), 0)
        ImageDraw.Draw(mask).rectangle((8, 8, 28, 28), fill=255)
        caption = f"a {name} {first} beside a {second}"
        image.save(folder / f"{i}.png")
        mask.save(folder / f"{i}.mask.png")
        (folder / f"{i}.txt").write_text(caption)
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption, "mask": f"{i}.mask.png",
                                 "concepts": [first, second]}))
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="python -m training.mmig_data synthetic OUT_FOLDER [--count N]: "
                                                 "tiny image-caption pairs for a smoke run of the mmig recipe")
    parser.add_argument("command", choices=["synthetic"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=4)
    args = parser.parse_args()
    print(write_synthetic_pairs(args.out, args.count))
