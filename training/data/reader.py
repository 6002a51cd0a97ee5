"""Reading bootstrapped shards: a map-style dataset with stable indexing (formats: training/data/__init__.py).

Item i is the i-th record of the manifest's shards in order (after dropping records with fewer than
`min_crops` crops and the shards found corrupt at construction), so it is the same on every run and every
rank. Shards are checked when the dataset is built, not when an item is read, so skipping a corrupt shard
never shifts the index mid-run.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from pathlib import Path

import torch

from training.data import MANIFEST_NAME
from training.data.shards import file_sha256, read_manifest

VERIFY_LEVELS = ("size", "headers", "sha256")


class CorruptShardError(RuntimeError):
    """A shard listed in the manifest is missing, truncated or unreadable."""


class BootstrapDataset(torch.utils.data.Dataset):
    """`dataset[i]` -> {"key", "caption", "prompt", "crops": [PIL RGB], "target": PIL RGB, "crop_info",
    "heads": [PIL RGB or None per crop: the head crop of a person crop]}.

    root: the bootstrap output folder (holding manifest.json).
    min_crops: only records with at least this many crops.
    on_corrupt: "skip" (leave the shard out, count it in `skipped_shards`) or "raise" (CorruptShardError).
    verify: "size" (file size matches the manifest), "headers" (also every member's tar header reads:
            catches truncation) or "sha256" (also the checksum: catches any changed byte).
    """

    def __init__(self, root: str | Path, min_crops: int = 0, on_corrupt: str = "skip", verify: str = "headers"):
        if on_corrupt not in ("skip", "raise"):
            raise ValueError(f"on_corrupt must be 'skip' or 'raise', got {on_corrupt!r}")
        if verify not in VERIFY_LEVELS:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, got {verify!r}")
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"bootstrapped dataset not found at {self.root}: run "
                                    f"`python -m training.data bootstrap --out {self.root} ...` first")
        manifest = read_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"{self.root} has no {MANIFEST_NAME}: point at the folder "
                                    f"`python -m training.data bootstrap --out` wrote")
        self.manifest = manifest
        self.version = int(manifest.get("version", 1))
        if self.version < 2:
            print(f"{self.root} is bootstrap format version {self.version}: its head crops were drawn once at "
                  f"bootstrap, so its person crops get no train-time head swap (MUMU §4-5); bootstrap again for "
                  f"one", file=sys.stderr)
        self.skipped_shards: list[tuple[str, str]] = []  # (shard name, why)
        self._members: dict[str, dict[str, tuple[int, int]]] = {}  # shard -> member name -> (offset, size)
        self._index: list[tuple[str, str]] = []  # item -> (shard name, record key)
        for entry in manifest["shards"]:
            problem = self._check(entry, verify)
            if problem:
                if on_corrupt == "raise":
                    raise CorruptShardError(f"shard {self.root / entry['name']} is corrupt: {problem}. Re-run the "
                                            f"bootstrap with --resume after deleting it, or read with "
                                            f"on_corrupt='skip'")
                self.skipped_shards.append((entry["name"], problem))
                print(f"skipping corrupt shard {entry['name']}: {problem}", file=sys.stderr)
                continue
            self._index.extend((entry["name"], key) for key, count in zip(entry["keys"], entry["crop_counts"])
                               if count >= min_crops)
        self._files: dict[str, object] = {}
        self._pid = os.getpid()

    def _check(self, entry: dict, verify: str) -> str | None:
        path = self.root / entry["name"]
        if not path.is_file():
            return "the file is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if verify in ("headers", "sha256"):
            try:
                with tarfile.open(path, mode="r:") as tar:
                    members = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError, EOFError) as error:
                return f"unreadable tar ({error})"
            for key, count in zip(entry["keys"], entry["crop_counts"]):
                needed = [f"{key}.json", f"{key}.target.png", *(f"{key}.crop{i}.png" for i in range(count))]
                absent = [name for name in needed if name not in members]
                if absent:
                    return f"record {key} lacks {', '.join(absent)}"
            self._members[entry["name"]] = members
        if verify == "sha256" and file_sha256(path) != entry["sha256"]:
            return "its sha256 differs from the manifest's"
        return None

    @property
    def skipped_count(self) -> int:
        return len(self.skipped_shards)

    def __len__(self) -> int:
        return len(self._index)

    def _read(self, shard: str, name: str) -> bytes:
        if os.getpid() != self._pid:  # a DataLoader worker: never share file offsets with the parent
            self._files, self._pid = {}, os.getpid()
        if shard not in self._members:
            with tarfile.open(self.root / shard, mode="r:") as tar:
                self._members[shard] = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        if shard not in self._files:
            self._files[shard] = open(self.root / shard, "rb")
        offset, size = self._members[shard][name]
        handle = self._files[shard]
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise CorruptShardError(f"shard {self.root / shard} is truncated at member {name}")
        return data

    def _locate(self, index: int) -> tuple[str, str]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} out of range for {len(self)} records")
        return self._index[index]

    def info(self, index: int) -> dict:
        """Item `index`'s JSON member only (caption, prompt, crops with kind and box): no image decoded, so
        filtering a dataset by crop kind reads a few hundred bytes per record."""
        shard, key = self._locate(index)
        try:
            return json.loads(self._read(shard, f"{key}.json"))
        except (OSError, ValueError, KeyError) as error:
            raise CorruptShardError(f"record {key} of shard {self.root / shard} cannot be decoded ({error})") from error

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        shard, key = self._locate(index)
        try:
            info = json.loads(self._read(shard, f"{key}.json"))
            target = Image.open(io.BytesIO(self._read(shard, f"{key}.target.png"))).convert("RGB")
            crops = [Image.open(io.BytesIO(self._read(shard, f"{key}.crop{i}.png"))).convert("RGB")
                     for i in range(len(info["crops"]))]
        except (OSError, ValueError, KeyError) as error:
            raise CorruptShardError(f"record {key} of shard {self.root / shard} cannot be decoded ({error}); "
                                    f"build the dataset with verify='sha256' to find such shards up front") from error
        heads = [target.crop(tuple(c["head_box"])) if c.get("head_box") else None for c in info["crops"]]
        return {"key": key, "caption": info["caption"], "prompt": info["prompt"], "crops": crops,
                "target": target, "crop_info": info["crops"], "heads": heads}

    def __getstate__(self):  # picklable for DataLoader workers (spawn): open files stay behind
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def __del__(self):
        for handle in getattr(self, "_files", {}).values():
            handle.close()


def shard_urls(root: str | Path) -> list[str]:
    """The completed shards' paths, for streaming with `webdataset.WebDataset(shard_urls(root))`."""
    manifest = read_manifest(Path(root))
    if manifest is None:
        raise FileNotFoundError(f"{root} has no {MANIFEST_NAME}")
    return [str(Path(root) / entry["name"]) for entry in manifest["shards"]]
