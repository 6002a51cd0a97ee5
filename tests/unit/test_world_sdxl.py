"""The committed world SDXL checkpoint (devtools/world/weights/sdxl, `python -m devtools.world.train_sdxl`) loads
through the host's own checkpoint loader (comfy.sd.load_checkpoint_guess_config, what Load Checkpoint runs; the
tiny SDXL config registered by devtools/tiny_host_support) and draws, on evaluation seeds it never saw, what its
caption says: the background (the objects not yet, see MEASURED). Sampling is bench/_quality_t2i's (comfy.sample.sample, euler, 12 steps, cfg 5)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from devtools.world import caption, render, sample_scene
from devtools.world import train_sdxl
from devtools.world.score import score

N_EVAL = 8
# MEASURED below by this test on the committed model (CPU, 12 steps, cfg 5, seeds EVAL_SEED_BASE + 0..7), captioned
# vs the empty prompt on the same noise. An earlier model (tiny-SDXL init, 4 captions a batch) drew the same picture
# whatever the caption (text effect 0.003-0.05 RMS); this one draws the caption's background. Its objects take the
# named colours more often than the control's over 50 seeds (docs/quality: 0.78 vs 0.66), but on these 8 seeds the
# empty prompt's many blobs hit as many objects, so only the background is held to a FLOOR (below the measured
# rate) and must beat the control.
MEASURED = {"captioned": {"background": 0.5, "colours_present": 0.833, "present": 0.25},
            "empty_prompt": {"background": 0.125, "colours_present": 0.896, "present": 0.3125}}
FLOOR = {"background": 0.375}


def test_the_committed_file_is_small_fp16_unet_and_vae_and_matches_its_manifest():
    from safetensors import safe_open
    manifest = json.loads(train_sdxl.MANIFEST_FILE.read_text())
    assert train_sdxl.sha256(train_sdxl.WEIGHTS_FILE) == manifest["files"][train_sdxl.WEIGHTS_FILE.name]
    assert train_sdxl.WEIGHTS_FILE.stat().st_size <= 20 * 2**20
    with safe_open(str(train_sdxl.WEIGHTS_FILE), "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model"}, prefixes
    for key in ("command", "seed", "steps", "train_seconds", "train_loss", "git_commit_of_trainer"):
        assert key in manifest


def test_relayout_keeps_the_caption_and_moves_the_objects():
    scene = sample_scene(12)
    import random
    other = train_sdxl.relayout(scene, random.Random(3))
    assert caption(other) == caption(scene)
    assert [(o.cx, o.cy) for o in other.objects] != [(o.cx, o.cy) for o in scene.objects]


@pytest.fixture(scope="module")
def world_sdxl():
    from devtools import tiny_sdxl
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from bench import _quality_t2i
    return _quality_t2i.load_world_sdxl()


def test_the_host_vae_encodes_as_the_trainer_says_and_decodes_a_recognisable_scene(world_sdxl):
    _, _, vae = world_sdxl
    scene = sample_scene(1_000_000 + 99)
    truth = render(scene)[0]
    image = torch.from_numpy(truth.astype(np.float32) / 255.0)
    with torch.inference_mode():
        latent = vae.encode(image[None])
        back = vae.decode(latent)[0]
    # the host's latent (process_in applied by the sampler) is the trainer's closed-form cell-mean code
    expected = train_sdxl.encode_closed_form(image.permute(2, 0, 1)[None])
    assert torch.allclose(latent * train_sdxl.tiny_sdxl.TAESDXL_VAE_SCALE, expected, atol=2e-2)
    assert score(back, scene)["colours_present"] == 1.0


def test_draws_what_its_caption_says_on_unseen_seeds(world_sdxl):
    from bench import _quality_t2i
    model, clip, vae = world_sdxl
    negative = _quality_t2i.encode(clip, "")
    captioned, control = [], []
    for i in range(N_EVAL):
        text = caption(sample_scene(_quality_t2i.EVAL_SEED_BASE + i))
        image = _quality_t2i.draw(model, clip, vae, text, seed=i, negative=negative)
        assert np.isfinite(image.astype(np.float32)).all()
        captioned.append(score(image, text))
        control.append(score(_quality_t2i.draw(model, clip, vae, "", seed=i, negative=negative), text))
    rates = {k: sum(r[k] for r in captioned) / N_EVAL for k in FLOOR}
    chance = {k: sum(r[k] for r in control) / N_EVAL for k in FLOOR}
    assert all(rates[k] >= FLOOR[k] and rates[k] > chance[k] for k in FLOOR), (rates, chance, MEASURED)
    # the caption steers the picture: the same noise with another caption draws other colours
    a = _quality_t2i.draw(model, clip, vae, "a red circle on a white background", seed=0, negative=negative)
    b = _quality_t2i.draw(model, clip, vae, "a blue square on a black background", seed=0, negative=negative)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10
