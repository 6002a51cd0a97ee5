"""Writing the bootstrapped records as WebDataset shards, with a manifest, resumably.

The record and manifest formats are documented in `training/data/__init__.py`. Shard k holds input pairs
[k * shard_size, (k + 1) * shard_size), so rerunning a shard gives the same bytes (PNG encoding and tar
headers are deterministic: fixed mtime, owner and member order) and resuming gives the same dataset.
"""
from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from training.data import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, MAX_CROPS
from training.data.filters import HEAD_QUERY, Detection, FilterConfig, interleave, select_crops
from training.data.nouns import PERSON_NOUNS, NounMatcher, load_nouns

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DetectFn = Callable[[object, list], list]  # (PIL image, nouns) -> [Detection]


@dataclass(frozen=True)
class BootstrapConfig:
    shard_size: int = 1000  # input pairs per shard
    seed: int = 0  # draws nothing since format 2 (the head swap moved to train time); kept for old command lines
    min_area: int = 150 * 150
    max_area_fraction: float = 0.75
    max_crops: int = MAX_CROPS
    box_threshold: float = 0.35  # GroundingDINO box score threshold
    min_crops: int = 0  # pairs with fewer crops write no record (0: keep text-only records)
    nouns_file: str | None = None  # None: training.data.nouns.DEFAULT_NOUNS

    def filters(self) -> FilterConfig:
        return FilterConfig(min_area=self.min_area, max_area_fraction=self.max_area_fraction,
                            max_crops=self.max_crops)


@dataclass(frozen=True)
class Pair:
    key: str  # zero-padded input index: stable, and free of dots (WebDataset splits member names on them)
    image: Path
    caption: str


def read_pairs(source: str | Path) -> list[Pair]:
    """Pairs from a folder (images with a same-stem .txt caption, sorted by path) or a JSON-lines file of
    {"image": path (relative to the file's folder unless absolute), "caption": str}, in line order."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"image-caption pairs not found at {source}: give a folder of images with "
                                f"same-stem .txt captions, or a .jsonl file of {{\"image\", \"caption\"}} lines")
    items: list[tuple[Path, str]] = []
    if source.is_dir():
        for image in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            caption_file = image.with_suffix(".txt")
            if caption_file.is_file():
                items.append((image, caption_file.read_text(encoding="utf-8").strip()))
    else:
        for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, caption = Path(row["image"]), str(row["caption"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{source} line {number}: expected a JSON object with \"image\" and "
                                 f"\"caption\" ({error})") from None
            items.append((image if image.is_absolute() else source.parent / image, caption.strip()))
    if not items:
        raise ValueError(f"no image-caption pairs in {source}: a folder needs images (.jpg/.png/...) each with "
                         f"a same-stem .txt caption; a .jsonl file needs {{\"image\", \"caption\"}} lines")
    return [Pair(f"{i:09d}", image, caption) for i, (image, caption) in enumerate(items)]


def pairs_fingerprint(pairs: list[Pair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(f"{pair.key}\t{pair.image.name}\t{pair.caption}\n".encode())
    return digest.hexdigest()[:16]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_record(pair: Pair, detect: DetectFn, matcher: NounMatcher, config: BootstrapConfig,
                 stats: Counter) -> dict | None:
    """One pair -> a WebDataset sample dict (bytes values), or None when the pair writes no record."""
    from PIL import Image, ImageOps

    try:
        with Image.open(pair.image) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError) as error:
        stats["unreadable_images"] += 1
        print(f"skipping pair {pair.key}: cannot read {pair.image} ({error})", file=sys.stderr)
        return None
    matches = matcher.first_occurrences(pair.caption)
    stats["nouns"] += len(matches)
    queries = [m.noun for m in matches]
    if any(noun in PERSON_NOUNS for noun in queries) and HEAD_QUERY not in queries:
        queries.append(HEAD_QUERY)
    detections = [d if isinstance(d, Detection) else Detection(*d) for d in detect(image, queries)] if matches else []
    stats["detections"] += len(detections)
    width, height = image.size
    crops = select_crops(matches, detections, width, height, config.filters(), stats)
    if len(crops) < config.min_crops:
        stats["below_min_crops"] += 1
        return None
    stats["records"] += 1
    stats["crops"] += len(crops)
    info = {"key": pair.key, "caption": pair.caption, "prompt": interleave(pair.caption, crops),
            "width": width, "height": height, "source": str(pair.image),
            "crops": [crop.to_json() for crop in crops]}
    record = {"__key__": pair.key, "json": json.dumps(info, sort_keys=True).encode(),
              "target.png": png_bytes(image)}
    for i, crop in enumerate(crops):
        record[f"crop{i}.png"] = png_bytes(image.crop(crop.box))
    return record


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    temp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temp, path)


def write_shard(out: Path, index: int, pairs: Iterable[Pair], build: Callable[[Pair], dict | None]) -> dict:
    """Write one shard through a temp file and rename it into place; returns its manifest entry."""
    from webdataset import TarWriter

    path = out / shard_name(index)
    temp = out / f".{path.name}.partial"
    keys, crop_counts = [], []
    try:
        with open(temp, "wb") as stream:
            writer = TarWriter(stream, user="mmig", group="mmig", mtime=0, encoder=False)
            try:
                for pair in pairs:
                    record = build(pair)
                    if record is not None:
                        writer.write(record)
                        keys.append(record["__key__"])
                        crop_counts.append(sum(1 for k in record if k.startswith("crop")))
            finally:
                writer.close()  # also on failure: the tar stream must finish before its file closes
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return {"name": path.name, "index": index, "records": len(keys), "bytes": path.stat().st_size,
            "sha256": file_sha256(path), "keys": keys, "crop_counts": crop_counts}


def read_manifest(out: Path) -> dict | None:
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a bootstrap manifest (format {manifest.get('format')!r})")
    if manifest.get("version", 1) > MANIFEST_VERSION:
        raise ValueError(f"{path} is bootstrap format version {manifest['version']}, newer than this pack reads "
                         f"({MANIFEST_VERSION}): update the pack")
    return manifest


def _check_resumable(manifest: dict, config: dict, pairs: dict, out: Path) -> None:
    if manifest.get("version", 1) != MANIFEST_VERSION:
        raise ValueError(f"{out} was bootstrapped in format version {manifest.get('version', 1)} (head crops drawn "
                         f"once at bootstrap); this pack writes version {MANIFEST_VERSION} (head boxes recorded, "
                         f"swapped at train time): write to a new --out folder instead of resuming")
    old = manifest["config"]
    changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if changed:
        differences = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(f"{out} was bootstrapped with other options ({differences}): resume with the same "
                         f"options, or write to a new --out folder")
    if manifest["pairs"] != pairs:
        raise ValueError(f"the image-caption pairs changed since {out} was started ({manifest['pairs']} -> "
                         f"{pairs}): resume with the same pairs, or write to a new --out folder")


def bootstrap(pairs_source: str | Path, out: str | Path, *, detect: DetectFn | None = None,
              detector: str | Path | None = None, device: str = "auto",
              config: BootstrapConfig = BootstrapConfig(), resume: bool = False,
              log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> dict:
    """Bootstrap `pairs_source` into shards under `out`; returns the manifest.

    `detect(image, nouns) -> [Detection]` is the detection function; without it, the GroundingDINO in
    folder `detector` is loaded (only if a shard is left to write). `resume=True` continues a folder that
    already has a manifest, skipping its completed shards; without it such a folder is an error.
    """
    out = Path(out)
    if config.shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {config.shard_size}")
    pairs = read_pairs(pairs_source)
    nouns = load_nouns(config.nouns_file)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".bootstrap.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another bootstrap is writing to {out}: wait for it, or choose another "
                                  f"--out folder") from None
        return _bootstrap_locked(pairs, nouns, out, detect, detector, device, config, resume, log)


def _bootstrap_locked(pairs, nouns, out, detect, detector, device, config, resume, log) -> dict:
    config_json = asdict(config) | {"nouns_sha256": hashlib.sha256("\n".join(nouns).encode()).hexdigest()[:16]}
    pairs_json = {"count": len(pairs), "fingerprint": pairs_fingerprint(pairs)}
    num_shards = -(-len(pairs) // config.shard_size)
    manifest = read_manifest(out)
    if manifest is not None and not resume:
        raise FileExistsError(f"{out} already holds a bootstrap ({len(manifest['shards'])} of "
                              f"{manifest['num_shards']} shards): pass --resume to continue it, or choose an "
                              f"empty --out folder")
    if manifest is not None:
        _check_resumable(manifest, config_json, pairs_json, out)
    else:
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "config": config_json,
                    "pairs": pairs_json, "shard_size": config.shard_size, "num_shards": num_shards,
                    "shards": [], "stats": {}, "complete": False}
    done = {entry["index"] for entry in manifest["shards"]
            if (out / entry["name"]).is_file() and (out / entry["name"]).stat().st_size == entry["bytes"]}
    manifest["shards"] = [entry for entry in manifest["shards"] if entry["index"] in done]  # lost ones redo
    todo = [k for k in range(num_shards) if k not in done]
    if done:
        log(f"resuming {out}: {len(done)} of {num_shards} shards done, {len(todo)} to write")

    matcher = NounMatcher(nouns)
    for index in todo:
        if detect is None:
            if detector is None:
                raise ValueError("give a detection function (detect=...) or a GroundingDINO folder (detector=...)")
            from training.data.detector import GroundingDinoDetector
            detect = GroundingDinoDetector(detector, device=device, box_threshold=config.box_threshold)
        started, stats = time.monotonic(), Counter()
        shard_pairs = pairs[index * config.shard_size:(index + 1) * config.shard_size]
        stats["pairs"] += len(shard_pairs)
        entry = write_shard(out, index, shard_pairs, lambda pair: build_record(pair, detect, matcher, config, stats))
        entry["stats"] = dict(sorted(stats.items()))
        manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda e: e["index"])
        manifest["stats"] = _total_stats(manifest["shards"])
        manifest["complete"] = len(manifest["shards"]) == num_shards
        write_json_atomic(out / MANIFEST_NAME, manifest)  # after the rename: a listed shard is always whole
        elapsed = time.monotonic() - started
        log(f"{entry['name']} ({len(manifest['shards'])}/{num_shards}): {entry['records']} records, "
            f"{stats['crops']} crops, {len(shard_pairs) / max(elapsed, 1e-9):.1f} pairs/s")
    if not todo:
        manifest["complete"] = True
        manifest["stats"] = _total_stats(manifest["shards"])
        write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def _total_stats(entries: list[dict]) -> dict:
    total = Counter()
    for entry in entries:
        total.update(entry.get("stats", {}))
    return dict(sorted(total.items()))

