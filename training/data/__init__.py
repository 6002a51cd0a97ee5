"""MUMU dataset bootstrapping (MUMU §4): interleaved text-and-image prompts cut from image-caption pairs.

    python -m training.data bootstrap --pairs DIR_OR_JSONL --detector GROUNDING_DINO_DIR --out OUT_DIR \
        [--shard-size 1000] [--seed 0] [--resume]

For each pair, GroundingDINO (transformers, local folder) looks for the caption's nouns; the crops that
pass the filters are inserted as `<image>` placeholders before their words:

    caption  "a man walking his dog on the beach"
    prompt   "a <image> man walking his <image> dog on the <image> beach"     + 3 crops, in that order

Pipeline per pair (`training.data.filters`):
  1. nouns: whole-word matches of a noun vocabulary (default: `nouns.DEFAULT_NOUNS`, ~200 object and
     person words with plurals; `--nouns FILE` replaces it). Multi-word entries ("teddy bear") win over
     their parts. No tagger model: it runs offline and is easy to audit.
  2. detection of every noun in one GroundingDINO call ("man . dog . beach ." plus "head ." when a person
     word is present); boxes clamped to the image.
  3. drop boxes whose area is below 150x150 px or above 75 % of the image area;
  4. one box per noun (its best score), then at most 3 crops per prompt (highest score first);
  5. each person crop records its head box: the best "head" detection whose centre lies in the person
     box, else the top-centred square of the box with side min(width, height / 2). Nothing is drawn
     here: MUMU §4-5 replace 70 % of person crops with head crops at train time, so the swap is drawn
     anew each time a record is drawn, from that sample's seed (`training.mumu_data.swap_heads`, logged
     by the mumu recipe as head_swaps / head_too_small); a head below the minimum area keeps the person
     crop there and is counted;
  6. crops inserted before the first occurrence of their word, in caption order.
  Nothing is random: output does not depend on shard size boundaries, on resume, or on the order shards
  are written.

Output folder:

    OUT_DIR/manifest.json          written atomically after each completed shard (see below)
    OUT_DIR/shard-000000.tar       WebDataset tar shards (uncompressed; plain `webdataset.WebDataset`
    OUT_DIR/shard-000001.tar ...   reads them too); a shard is written to a temp file, then renamed

Shard k holds the records of input pairs [k * shard_size, (k + 1) * shard_size) in input order (pairs
sorted by file stem for a folder, line order for JSON lines); pairs whose image cannot be read, or with
fewer than `min_crops` crops (default 0: text-only records are kept), write no record. One record = the
tar members sharing a `__key__` (the pair key, e.g. "000000042"):

    <key>.json        {"key": str, "caption": str (original), "prompt": str (with "<image>" placeholders,
                       one per crop, in crop order), "width": int, "height": int (target size),
                       "source": str (image path as given),
                       "crops": [{"word": str (caption text the crop precedes), "noun": str (vocabulary
                                  noun), "char_start": int (word position in the caption),
                                  "box": [x0, y0, x1, y1] (int pixels in the target), "score": float,
                                  "kind": "object" | "person",
                                  "head_box": [x0, y0, x1, y1], "head_source": "detected" | "top_square"
                                  (person crops only)}, ...]}
    <key>.target.png  the whole image (RGB)
    <key>.crop0.png, <key>.crop1.png, <key>.crop2.png   the crops (RGB), crop i for the i-th <image>

manifest.json:

    {"format": "mmig-mumu-bootstrap", "version": 2,
     "config": {...bootstrap options...}, "pairs": {"count": int, "fingerprint": str},
     "shard_size": int, "num_shards": int (planned),
     "shards": [{"name": "shard-000000.tar", "index": 0, "records": int, "bytes": int, "sha256": str,
                 "keys": [str, ...], "crop_counts": [int, ...]}, ...]   (completed shards only, by index)
     "stats": {"pairs", "records", "crops", "nouns", "detections", "dropped_small", "dropped_large",
               "dropped_same_noun", "dropped_over_cap", "person_crops", "heads_detected",
               "heads_below_min_area", "below_min_crops", "unreadable_images": int}   (summed over
               completed shards; each shard entry has its own "stats"; a counter that never fired may be
               absent),
     "complete": bool}

Reading (`training.data.reader.BootstrapDataset(root, min_crops=0, on_corrupt="skip"|"raise")`): a
map-style dataset; item i maps to (shard, offset) from the manifest, so it is the same on every run and
rank. An item is a dict: key, caption, prompt, crops (list of RGB PIL images, one per placeholder),
target (RGB PIL image), crop_info (the json "crops" list), heads (per crop: the head crop, a PIL image cut
from the target at head_box, for person crops; None for the others); `dataset.info(i)` is the record's
JSON alone (no image decoded: cheap filtering by crop kind). A corrupt or missing shard is skipped and
counted (`dataset.skipped_shards`) or raises `CorruptShardError`, per `on_corrupt`; a missing path raises
`FileNotFoundError` naming it.

Version 1 folders (written before the head swap moved to train time: kind "head" crops were drawn once
at bootstrap, person crops have no head_box) stay readable as they are, with a warning: their crops
get no train-time head swap; bootstrap again to get one. Resuming a version-1 folder is an error.
"""
from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mmig-mumu-bootstrap"
MANIFEST_VERSION = 2  # 2: person crops carry head_box; the head swap moved to train time
MAX_CROPS = 3  # MUMU §4: at most 3 crops per prompt


def __getattr__(name):  # cheap import: torch/transformers/PIL load only with the part that needs them
    if name in ("BootstrapDataset", "CorruptShardError"):
        from training.data import reader
        return getattr(reader, name)
    if name in ("bootstrap", "BootstrapConfig"):
        from training.data import shards
        return getattr(shards, name)
    raise AttributeError(name)
