"""bench/quality.py, the world quality harness: parts merged, a failing part recorded (not a crash), the
contact sheet written with one row per part."""
import json
import sys
import types

import numpy as np
import pytest

import bench.quality as quality


@pytest.fixture
def fake_parts(monkeypatch):
    good = types.ModuleType("bench._quality_good")
    good.run = lambda n: ({"good_rate": n / 100, "good_dB": float("inf")},
                          [("a red circle on a grey background", np.full((64, 64, 3), 200, np.uint8))] * 9)
    broken = types.ModuleType("bench._quality_broken")

    def fail(n):
        raise RuntimeError("no weights here")
    broken.run = fail
    monkeypatch.setitem(sys.modules, "bench._quality_good", good)
    monkeypatch.setitem(sys.modules, "bench._quality_broken", broken)
    monkeypatch.setattr(quality, "part_names", lambda: ["broken", "good"])


def test_parts_merge_and_a_failing_part_is_recorded(fake_parts, tmp_path):
    report = quality.run_quality(50, out_dir=tmp_path)
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["figures"] == {"good_rate": 0.5, "good_dB": "inf"}  # JSON has no inf: written as a string
    assert "RuntimeError: no weights here" in saved["parts"]["broken"]["error"]
    assert saved["eval_seeds"] == "1000000..1000049" and report["n_seeds"] == 50
    from PIL import Image
    sheet = Image.open(tmp_path / "quality_sheet.png")
    assert sheet.height >= 2 * quality.TILE and sheet.width >= quality.MAX_SAMPLES * quality.TILE  # 9 cut to 8
    assert "FAILED: broken" in quality.summary(report)


def test_unknown_parts_and_bad_seed_counts_are_refused(fake_parts, tmp_path):
    with pytest.raises(ValueError, match="unknown quality part.*the parts are broken, good"):
        quality.run_quality(5, ["nope"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="--seeds"):
        quality.run_quality(0, out_dir=tmp_path)


def test_every_real_part_has_the_run_function():
    import importlib
    for part in quality.part_names():
        assert callable(importlib.import_module(f"bench._quality_{part}").run), part
