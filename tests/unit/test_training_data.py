"""Dataset bootstrapping (MUMU §4): the crop filters on synthetic detections, and the whole pipeline
(pairs -> shards -> reader) with a stub detection function injected through `bootstrap(detect=...)`.
The real GroundingDINO path is tested in test_training_data_detector.py."""
import fcntl
import json
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmig_core.mm_prompt import build_prompt
from training.data import IMAGE_PLACEHOLDER, MANIFEST_NAME
from training.data.__main__ import main as cli
from training.data.filters import HEAD_QUERY, Detection, FilterConfig, find_head, head_box, interleave, select_crops
from training.data.nouns import DEFAULT_NOUNS, NounMatcher, load_nouns
from training.data.reader import BootstrapDataset, CorruptShardError, shard_urls
from training.data.shards import BootstrapConfig, bootstrap, file_sha256, read_pairs

MATCHER = NounMatcher(DEFAULT_NOUNS)


def matches_for(caption):
    return MATCHER.first_occurrences(caption)


# --- nouns --------------------------------------------------------------------------------------------

def test_noun_matching_whole_words_plurals_and_multiword(tmp_path):
    found = [(m.noun, m.word) for m in MATCHER.find("Two Teddy bears, three dogs and men near a cathedral")]
    assert found == [("teddy bear", "Teddy bears"), ("dog", "dogs"), ("man", "men")]  # no "cat" in "cathedral"
    nouns_file = tmp_path / "nouns.txt"
    nouns_file.write_text("# my list\nscooter\nRed Panda  # two words\n")
    custom = NounMatcher(load_nouns(nouns_file))
    assert [m.noun for m in custom.find("a red panda on a scooter with a dog")] == ["red panda", "scooter"]
    with pytest.raises(FileNotFoundError, match="one noun per line"):
        load_nouns(tmp_path / "absent.txt")


# --- filters on synthetic detections ------------------------------------------------------------------

def test_area_limits_drop_small_and_large_boxes():
    caption = "a cat, a dog, a horse, a bird and a car"
    stats = Counter()
    # Image 400x400: min area 150*150 = 22500, max area 0.75 * 160000 = 120000.
    detections = [Detection("cat", (0, 0, 149, 151), 0.9),  # 22499 px: too small
                  Detection("dog", (10, 10, 160, 160), 0.8),  # exactly 150x150: kept
                  Detection("horse", (0, 0, 400, 301), 0.9),  # 120400 px: too large
                  Detection("bird", (0, 50, 400, 350), 0.7),  # exactly 75 %: kept
                  Detection("car", (-50, -50, 100, 100), 0.9)]  # clamped to 100x100: too small
    crops = select_crops(matches_for(caption), detections, 400, 400, stats=stats)
    assert [(c.match.noun, c.box) for c in crops] == [("dog", (10, 10, 160, 160)), ("bird", (0, 50, 400, 350))]
    assert stats["dropped_small"] == 2 and stats["dropped_large"] == 1


def test_at_most_three_crops_highest_score_first_in_caption_order():
    caption = "a cat, a dog, a horse, a bird and a car"
    scores = {"cat": 0.3, "dog": 0.9, "horse": 0.5, "bird": 0.8, "car": 0.6}
    detections = [Detection(noun, (0, 0, 200, 200), score) for noun, score in scores.items()]
    detections.append(Detection("cat", (0, 0, 300, 300), 0.95))  # the cat's best box beats the others
    stats = Counter()
    crops = select_crops(matches_for(caption), detections, 1000, 1000, stats=stats)
    assert [c.match.noun for c in crops] == ["cat", "dog", "bird"]  # top 3 by score, back in caption order
    assert crops[0].box == (0, 0, 300, 300) and crops[0].score == pytest.approx(0.95)
    assert stats["dropped_over_cap"] == 2 and stats["dropped_same_noun"] == 1
    assert len(select_crops(matches_for(caption), detections, 1000, 1000,
                            FilterConfig(max_crops=1))) == 1


def test_bootstrap_records_each_person_crop_with_its_head_box_and_draws_nothing():
    caption = "a woman holding an umbrella"
    person_box = (100, 50, 500, 850)
    detections = [Detection("woman", person_box, 0.9), Detection("umbrella", (600, 0, 900, 300), 0.8),
                  Detection(HEAD_QUERY, (250, 60, 350, 170), 0.7)]
    stats = Counter()
    crops = select_crops(matches_for(caption), detections, 1000, 1000, stats=stats)
    assert [(c.kind, c.box) for c in crops] == [("person", person_box), ("object", (600, 0, 900, 300))]
    assert crops[0].to_json()["head_box"] == [250, 60, 350, 170] and crops[0].to_json()["head_source"] == "detected"
    assert "head_box" not in crops[1].to_json()
    assert stats["person_crops"] == 1 and stats["heads_detected"] == 1 and stats["heads_below_min_area"] == 1
    undetected = select_crops(matches_for(caption), detections[:2], 1000, 1000)[0].to_json()
    assert undetected["head_box"] == [100, 50, 500, 450] and undetected["head_source"] == "top_square"
    # Deterministic: no draw left in the bootstrapper.
    assert [c.to_json() for c in select_crops(matches_for(caption), detections, 1000, 1000)] == \
        [c.to_json() for c in crops]


def test_head_box_rule():
    person = (100, 50, 500, 850)
    assert head_box(person, [], 1000, 1000) == (100, 50, 500, 450)  # top square, side min(400, 800 / 2)
    assert head_box((0, 0, 600, 400), [], 1000, 1000) == (200, 0, 400, 200)  # wide box: side 400 / 2, centred
    heads = [Detection(HEAD_QUERY, (250, 60, 350, 170), 0.5), Detection(HEAD_QUERY, (220, 60, 380, 240), 0.9),
             Detection(HEAD_QUERY, (700, 0, 900, 200), 0.99)]  # outside the person: ignored
    assert find_head(person, heads, 1000, 1000) == ((220, 60, 380, 240), True)
    assert find_head(person, heads[2:], 1000, 1000) == ((100, 50, 500, 450), False)


def test_interleave_puts_a_placeholder_before_each_word():
    caption = "A man walking his dog on the beach"
    detections = [Detection(n, (0, 0, 300, 300), s) for n, s in (("man", 0.9), ("dog", 0.8), ("beach", 0.7))]
    crops = select_crops(matches_for(caption), detections, 1000, 1000)
    prompt = interleave(caption, crops)
    assert prompt == "A <image> man walking his <image> dog on the <image> beach"
    parsed = build_prompt(prompt, {i + 1: torch.zeros(1, 8, 8, 3) for i in range(len(crops))})
    assert parsed.image_count() == 3 and parsed.text_only.split() == caption.split()


# --- the pipeline with a stub detection function ------------------------------------------------------

CAPTIONS = ["a man walking his dog on the beach", "a cat sleeping on a chair", "two women and a horse",
            "a red car parked near a tree", "an empty sky", "a girl with a kite and a ball"]


def make_pairs(folder: Path, captions=CAPTIONS) -> Path:
    """Small smooth images (they compress to a few kB) with same-stem captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        height, width = 300 + 20 * i, 400
        y, x = np.mgrid[0:height, 0:width]
        image = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 40 * i)], -1).astype(np.uint8)
        Image.fromarray(image).save(folder / f"pair{i:02d}.png")
        (folder / f"pair{i:02d}.txt").write_text(caption)
    return folder


class StubDetector:
    """Deterministic boxes per noun: one that passes the filters, one too small; counts calls and can fail."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, image, nouns):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        width, height = image.size
        detections = []
        for i, noun in enumerate(nouns):
            left = (37 * i) % (width - 200)
            detections.append(Detection(noun, (left, 10, left + 200, 10 + 200), 0.9 - 0.1 * i))
            detections.append(Detection(noun, (0, 0, 50, 50), 0.99))
        return detections


def test_bootstrap_writes_readable_deterministic_shards(tmp_path):
    pairs = make_pairs(tmp_path / "pairs")
    config = BootstrapConfig(shard_size=4, seed=3)
    manifest = bootstrap(pairs, tmp_path / "out", detect=StubDetector(), config=config)
    assert manifest["complete"] and [e["name"] for e in manifest["shards"]] == ["shard-000000.tar",
                                                                                 "shard-000001.tar"]
    assert manifest["stats"]["pairs"] == 6 and manifest["stats"]["records"] == 6
    assert manifest["stats"]["dropped_small"] > 0  # every noun's 50x50 box

    dataset = BootstrapDataset(tmp_path / "out")
    assert len(dataset) == 6 and dataset.skipped_count == 0
    for i, caption in enumerate(CAPTIONS):
        item = dataset[i]
        assert item["caption"] == caption and item["target"].size == (400, 300 + 20 * i)
        assert item["prompt"].count(IMAGE_PLACEHOLDER) == len(item["crops"]) == len(item["crop_info"]) <= 3
        assert item["prompt"].replace(IMAGE_PLACEHOLDER + " ", "") == caption
        for crop, info in zip(item["crops"], item["crop_info"]):
            x0, y0, x1, y1 = info["box"]
            assert crop.size == (x1 - x0, y1 - y0)
            assert np.array_equal(np.asarray(crop), np.asarray(item["target"].crop((x0, y0, x1, y1))))
            assert caption[info["char_start"]:].startswith(info["word"])
    assert dataset[0]["prompt"] == "a <image> man walking his <image> dog on the <image> beach"
    assert dataset[4]["crops"] == [] and dataset[4]["prompt"] == "an empty sky"  # no noun: text-only record
    assert len(BootstrapDataset(tmp_path / "out", min_crops=1)) == 5
    info = dataset.info(2)  # the JSON alone, no image decoded
    assert info["crops"] == dataset[2]["crop_info"] and info["prompt"] == dataset[2]["prompt"]
    assert info["crops"][0]["kind"] == "person" and info["crops"][0]["word"] == "women"
    x0, y0, x1, y1 = info["crops"][0]["head_box"]
    assert dataset[2]["heads"][0].size == (x1 - x0, y1 - y0) and dataset[2]["heads"][1] is None
    copy = pickle.loads(pickle.dumps(dataset))  # as a DataLoader worker gets it: no open file handles
    assert copy[5]["prompt"] == dataset[5]["prompt"] and len(copy) == 6

    # Plain WebDataset streams the same records.
    import webdataset as wds
    keys = [sample["__key__"] for sample in wds.WebDataset(shard_urls(tmp_path / "out"), shardshuffle=False)]
    assert keys == [f"{i:09d}" for i in range(6)]

    # Deterministic: the same pairs and seed give the same bytes; the JSON-lines input gives the same records.
    again = bootstrap(pairs, tmp_path / "again", detect=StubDetector(), config=config)
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in manifest["shards"]]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"image": f"pairs/pair{i:02d}.png", "caption": c}) + "\n"
                             for i, c in enumerate(CAPTIONS)))
    bootstrap(jsonl, tmp_path / "jsonl", detect=StubDetector(), config=config)
    from_jsonl = BootstrapDataset(tmp_path / "jsonl")
    assert [from_jsonl[i]["prompt"] for i in range(6)] == [dataset[i]["prompt"] for i in range(6)]


def test_resume_after_an_interruption_gives_the_same_shards(tmp_path):
    pairs = make_pairs(tmp_path / "pairs")
    config = BootstrapConfig(shard_size=2, seed=7)
    reference = bootstrap(pairs, tmp_path / "reference", detect=StubDetector(), config=config)

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # stops in the middle of the second shard
        bootstrap(pairs, out, detect=StubDetector(fail_after=3), config=config)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [e["name"] for e in manifest["shards"]] == ["shard-000000.tar"] and not manifest["complete"]
    assert [p.name for p in out.glob("*.tar")] == ["shard-000000.tar"] and not list(out.glob("*.partial"))
    (out / ".shard-000001.tar.partial").write_bytes(b"left by a killed run")  # as after a hard kill

    with pytest.raises(FileExistsError, match="--resume"):
        bootstrap(pairs, out, detect=StubDetector(), config=config)
    with pytest.raises(ValueError, match="seed: 7 -> 8"):
        bootstrap(pairs, out, detect=StubDetector(), config=BootstrapConfig(shard_size=2, seed=8), resume=True)

    detector = StubDetector()
    resumed = bootstrap(pairs, out, detect=detector, config=config, resume=True)
    assert detector.calls == 3  # only pairs 2-5 again; pair 4 ("an empty sky") has no noun to detect
    assert resumed["complete"] and resumed["shards"] == reference["shards"]
    assert resumed["stats"] == reference["stats"]
    for entry in reference["shards"]:
        assert file_sha256(out / entry["name"]) == entry["sha256"]
    assert not (out / ".shard-000001.tar.partial").exists()
    detector = StubDetector()
    bootstrap(pairs, out, detect=detector, config=config, resume=True)  # complete: nothing left to do
    assert detector.calls == 0
    with open(out / ".bootstrap.lock", "w") as held:  # another run writing there
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match="another bootstrap"):
            bootstrap(pairs, out, detect=StubDetector(), config=config, resume=True)


def test_corrupt_shard_is_skipped_with_a_count_or_stops(tmp_path):
    pairs = make_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    bootstrap(pairs, out, detect=StubDetector(), config=BootstrapConfig(shard_size=2))
    assert len(BootstrapDataset(out)) == 6

    shard = out / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])  # truncated
    skipping = BootstrapDataset(out, on_corrupt="skip")
    assert len(skipping) == 4 and skipping.skipped_count == 1 and skipping.skipped_shards[0][0] == shard.name
    assert [skipping[i]["key"] for i in range(4)] == ["000000000", "000000001", "000000004", "000000005"]
    with pytest.raises(CorruptShardError, match="shard-000001.tar"):
        BootstrapDataset(out, on_corrupt="raise")

    # Same size, a changed byte inside a PNG: only the checksum sees it.
    shard.write_bytes(data)
    with tarfile.open(shard) as tar:
        offset = next(m.offset_data for m in tar.getmembers() if m.name.endswith("target.png"))
    flipped = bytearray(data)
    flipped[offset + 100] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    assert len(BootstrapDataset(out)) == 6
    checked = BootstrapDataset(out, verify="sha256")
    assert len(checked) == 4 and "sha256" in checked.skipped_shards[0][1]
    (out / "shard-000002.tar").unlink()
    assert BootstrapDataset(out, verify="sha256").skipped_count == 2


def test_missing_paths_give_clear_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="absent-pairs.*same-stem .txt"):
        read_pairs(tmp_path / "absent-pairs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image-caption pairs"):
        read_pairs(tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png", "caption": "a cat"}\n{"img": "b.png"}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_pairs(bad)
    with pytest.raises(FileNotFoundError, match="absent-out"):
        BootstrapDataset(tmp_path / "absent-out")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        BootstrapDataset(tmp_path / "empty")
    code = cli(["bootstrap", "--pairs", str(tmp_path / "absent-pairs"), "--detector", str(tmp_path / "none"),
                "--out", str(tmp_path / "out")])
    assert code == 2 and "absent-pairs" in capsys.readouterr().err
    make_pairs(tmp_path / "pairs", CAPTIONS[:1])
    code = cli(["bootstrap", "--pairs", str(tmp_path / "pairs"), "--detector", str(tmp_path / "no-detector"),
                "--out", str(tmp_path / "out")])
    assert code == 2 and "GroundingDINO model folder not found" in capsys.readouterr().err
