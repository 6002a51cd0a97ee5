"""The committed world VLM (devtools/world/weights/vlm, a small Idefics2) describes and edits world scenes it never
saw, through the code MMIG VLM Loader / MLLM Describe run (mmig_core.vlm.load_vlm, describe, describe_edit) and
LLMGA's tag extraction (the node's "llmga prompt" mode).

The floors are set well below the rates measured at the committed weights on these 8 seeds (CPU, greedy; the
numbers are in FLOOR_*'s comments), so a CPU/BLAS difference cannot fail the test, while the untrained model
(0 of 8) cannot pass it.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from bench._quality_vlm import answers  # noqa: E402
from devtools.world import dataset  # noqa: E402
from devtools.world.score import names_objects, parse_caption  # noqa: E402
from mmig_core.llmga_tags import extract_generation_prompt  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[2] / "devtools" / "world" / "weights" / "vlm"
EVAL = [1_000_000 + i for i in range(8)]
FLOOR_BACKGROUND = 0.5  # measured 8 of 8 at the committed weights; untrained: 0
FLOOR_NAMES = 0.25  # measured 5 of 8 (every object named with its colour and shape); untrained and the previous
#                     committed model (its perceiver latents all equal, so it saw no objects): 0
FLOOR_TAGS = 0.5  # measured 16 of 16 responses (1.0); untrained: 0


@pytest.fixture(scope="module")
def responses():
    torch.set_num_threads(1)
    data = dataset(EVAL)
    return data, answers(WEIGHTS, data)


def test_the_committed_files_match_their_manifest_and_budget():
    manifest = json.loads((WEIGHTS / "MANIFEST.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((WEIGHTS / name).read_bytes()).hexdigest() == digest, name
    assert sum(p.stat().st_size for p in WEIGHTS.iterdir()) <= 8 * 2**20
    assert manifest["command"].startswith("python -m devtools.world.train_vlm")


def test_the_world_vlm_describes_unseen_scenes_in_llmga_tags(responses):
    data, (described, edited, _instructions) = responses
    grounds = np.mean([set(parse_caption(r)[1]) == {g for g in (scene.background, scene.background2) if g}
                       for r, (scene, *_r) in zip(described, data)])
    tags = np.mean([extract_generation_prompt(r) is not None for r in described + edited])
    assert grounds >= FLOOR_BACKGROUND, list(zip(described, [d[3] for d in data]))
    assert tags >= FLOOR_TAGS, described + edited


def test_the_world_vlm_names_the_objects_of_unseen_scenes(responses):
    data, (described, _edited, _instructions) = responses
    names = np.mean([names_objects(r, scene) for r, (scene, *_r) in zip(described, data)])
    assert names >= FLOOR_NAMES, list(zip(described, [d[3] for d in data]))
