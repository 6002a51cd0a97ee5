"""The committed world MMSM (devtools/world/weights/mmsm/) and MUMU bundle (devtools/world/weights/mumu/): the files
their manifests name, loaded by the functions MMIG MMSM Loader and MMIG MUMU Loader call, shaped for the world
VLM and the world SDXL; and the MUMU training records, whose captions leave attributes to the crops."""
import hashlib
import json
import random

import pytest

from devtools.world import SHAPES, caption, sample_scene
from devtools.world import train_mmsm, train_mumu


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(folder):
    path = folder / "MANIFEST.json"
    if not path.is_file():
        pytest.skip(f"no {path}: the weights are not trained in this checkout")
    return json.loads(path.read_text())


def test_the_world_mmsm_is_the_file_its_manifest_names_and_fits_the_world_models():
    from mmig_core.mmsm import load_mmsm
    from safetensors import safe_open
    manifest = _manifest(train_mmsm.WEIGHTS_DIR)
    for name, digest in manifest["files"].items():
        assert _sha256(train_mmsm.WEIGHTS_DIR / name) == digest, name
    mmsm = load_mmsm(train_mmsm.WEIGHTS_DIR / train_mmsm.WEIGHTS_NAME)
    vlm_config = json.loads((train_mmsm.VLM_DIR / "config.json").read_text())
    assert mmsm.config.text_dim == vlm_config["text_config"]["hidden_size"]
    from devtools.world.train_sdxl import WEIGHTS_FILE
    with safe_open(str(WEIGHTS_FILE), "pt") as f:  # the UNet's mid block width: its first resnet's conv
        mid = f.get_slice("model.diffusion_model.middle_block.0.in_layers.2.weight").get_shape()[0]
    assert mmsm.config.feature_channels == mid
    assert mmsm.config.width == train_mmsm.MMSM_SIZES["mmsm_width"]
    assert "python -m devtools.world.train_mmsm" in manifest["command"]


def test_the_world_mumu_bundle_is_the_files_its_manifest_names_and_reads_as_a_bundle():
    from mmig_core.mumu_adapter import load_adapter
    from mmig_core.mumu_bundle import read_bundle
    folder = train_mumu.WEIGHTS_DIR
    manifest = _manifest(folder)
    for name, digest in manifest["files"].items():
        assert _sha256(folder / name) == digest, name
    bundle = read_bundle(folder / train_mumu.BUNDLE_NAME)
    adapter = load_adapter(bundle.adapter)
    vlm_config = json.loads((train_mumu.VLM_DIR / "config.json").read_text())
    assert adapter.config.input_dim == vlm_config["text_config"]["hidden_size"]
    assert (adapter.config.context_dim, adapter.config.pooled_dim) == (2048, 1280)  # the SDXL interface
    assert bundle.vlm_lora is not None and bundle.unet_lora.is_file()


@pytest.mark.parametrize("seed", range(40))
def test_mumu_records_put_each_crop_before_its_shape_word_or_where_the_words_are_left_out(seed):
    scene = sample_scene(seed)
    text, crops = train_mumu.record_caption(scene, random.Random(seed))
    assert len(crops) == len(scene.objects)
    assert text.endswith(caption(scene).split(" on a ", 1)[1])
    for obj, crop in zip(scene.objects, crops):
        x0, y0, x1, y1 = crop["box"]
        assert x0 <= obj.cx - obj.size / 2 and x1 >= obj.cx + obj.size / 2
        assert y0 <= obj.cy - obj.size / 2 and y1 >= obj.cy + obj.size / 2
        after = text[crop["char_index"]:]
        said = after.startswith(obj.shape)
        assert said or not any(after.startswith(s) for s in SHAPES)  # never before another object's shape
        if said and text[:crop["char_index"]].rstrip().endswith(obj.colour):
            continue  # the full phrase "a red circle"
        assert obj.colour not in text[max(0, crop["char_index"] - 12):crop["char_index"]]


def test_mumu_records_leave_colours_to_the_crops_often():
    dropped = total = 0
    for seed in range(300):
        scene = sample_scene(seed)
        text, _ = train_mumu.record_caption(scene, random.Random(seed))
        total += len(scene.objects)
        dropped += sum(obj.colour not in text for obj in scene.objects)
    share = dropped / total
    assert abs(share - (train_mumu.DROP_COLOUR + train_mumu.DROP_BOTH)) < 0.08, share
