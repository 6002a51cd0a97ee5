"""The bootstrapper's real detection path: the tiny random-weight GroundingDINO, loaded from its
save_pretrained folder through transformers, finds boxes for caption nouns; the CLI bootstraps with it."""
import json

import numpy as np
import pytest
from PIL import Image

from devtools.tiny_grounding_dino import MAX_TEXT_LEN, vocabulary
from devtools.tiny_models import TINY_GROUNDING_DINO
from training.data.__main__ import main as cli
from training.data.detector import GroundingDinoDetector
from training.data.filters import HEAD_QUERY
from training.data.reader import BootstrapDataset


@pytest.fixture(scope="module")
def detector(tiny_models):
    return GroundingDinoDetector(tiny_models / TINY_GROUNDING_DINO, box_threshold=0.0)


def gradient(width, height):
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8))


def test_tiny_grounding_dino_loads_and_returns_boxes_for_the_nouns(detector):
    tokenizer = detector.processor.tokenizer
    assert len(tokenizer) == len(vocabulary())  # an offline tokenizer can load empty without an error
    assert tokenizer.tokenize("a man . dog .") == ["a", "man", ".", "dog", "."]
    nouns = ["man", "dog", HEAD_QUERY]
    detections = detector(gradient(640, 480), nouns)
    assert len(detections) == detector.model.config.num_queries  # threshold 0: every query box
    assert {d.noun for d in detections} <= set(nouns) and len({d.noun for d in detections}) > 1
    for d in detections:
        x0, y0, x1, y1 = d.box
        assert -1e-3 <= x0 <= x1 <= 640 + 1e-3 and -1e-3 <= y0 <= y1 <= 480 + 1e-3 and 0.0 <= d.score <= 1.0
    again = detector(gradient(640, 480), nouns)
    assert [(d.noun, d.box) for d in again] == [(d.noun, d.box) for d in detections]
    strict = GroundingDinoDetector.__new__(GroundingDinoDetector)
    strict.__dict__.update(detector.__dict__, box_threshold=1.01)
    assert strict(gradient(64, 64), nouns) == [] and detector(gradient(64, 64), []) == []
    # A caption with more nouns than the text limit holds is truncated, not an error.
    many = [w for w in vocabulary() if w.isalpha() and len(w) > 2][:MAX_TEXT_LEN]
    assert {d.noun for d in detector(gradient(64, 64), many)} <= set(many)


def test_cli_bootstraps_with_the_tiny_grounding_dino(tiny_models, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    captions = ["a man walking his dog on the beach", "a cat on a chair near a window", "a horse in a field"]
    for i, caption in enumerate(captions):
        gradient(900 + 40 * i, 700).save(pairs / f"{i}.png")  # large: some random boxes pass 150x150 px
        (pairs / f"{i}.txt").write_text(caption)
    out = tmp_path / "out"
    args = ["bootstrap", "--pairs", str(pairs), "--detector", str(tiny_models / TINY_GROUNDING_DINO),
            "--out", str(out), "--shard-size", "2", "--box-threshold", "0"]
    assert cli(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["shards"] == 2 and summary["stats"]["records"] == 3
    assert summary["stats"]["detections"] > 0 and summary["stats"]["crops"] > 0
    dataset = BootstrapDataset(out)
    assert len(dataset) == 3
    for i in range(3):
        item = dataset[i]
        assert item["caption"] == captions[i] and len(item["crops"]) == item["prompt"].count("<image>") <= 3
        for crop in item["crops"]:
            assert crop.width * crop.height >= 150 * 150
    assert cli(args) == 2 and "--resume" in capsys.readouterr().err
    assert cli(args + ["--resume"]) == 0
