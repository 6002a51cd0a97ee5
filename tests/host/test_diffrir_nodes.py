"""The DiffRIR nodes inside a real ComfyUI server: listing, restoration, and every bad input of the issue."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from devtools.tiny_models import TINY_DIFFRIR

pytestmark = pytest.mark.host
TINY_NAME = TINY_DIFFRIR.split("/")[-1]
GENERATED_COLOR, REFERENCE_COLOR = 0x3366CC, 0xCC8844


def restore_graph(model_name=TINY_NAME, *, width=97, height=61, batch=1, mask_value=1.0, mask_size=None,
                  reference_size=None, reference_batch=1, channels=3, seed=0):
    ref_w, ref_h = reference_size or (width, height)
    mask_w, mask_h = mask_size or (width, height)
    graph = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": batch,
                                                      "color": GENERATED_COLOR}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": ref_w, "height": ref_h, "batch_size": reference_batch,
                                                      "color": REFERENCE_COLOR}},
        "3": {"class_type": "SolidMask", "inputs": {"value": mask_value, "width": mask_w, "height": mask_h}},
        "4": {"class_type": "MMIG_DiffRIRLoader", "inputs": {"model_name": model_name, "dtype": "auto"}},
        "5": {"class_type": "MMIG_DiffRIRRestore",
              "inputs": {"diffrir": ["4", 0], "image": ["1", 0], "reference": ["2", 0], "mask": ["3", 0],
                         "paste_back": True, "tile_size": 64, "tile_overlap": 16, "seed": seed}},
        "6": {"class_type": "SaveImage", "inputs": {"filename_prefix": "diffrir/test", "images": ["5", 0]}},
    }
    if channels != 3:
        graph["7"] = {"class_type": "MMIGTest_ImageChannels", "inputs": {"image": ["1", 0], "channels": channels}}
        graph["5"]["inputs"]["image"] = ["7", 0]
    return graph


def saved_images(host, result):
    return [np.asarray(Image.open(path).convert("RGB")) for path in host.output_files(result)]


def test_the_loader_lists_the_tiny_model(host):
    info = host.object_info()
    assert TINY_NAME in info["MMIG_DiffRIRLoader"]["input"]["required"]["model_name"][0]


def test_restores_a_batch_at_an_odd_size(host):
    result = host.run_graph(restore_graph(batch=3, seed=1)).check()
    images = saved_images(host, result)
    assert len(images) == 3 and all(image.shape == (61, 97, 3) for image in images)
    generated = np.array([(GENERATED_COLOR >> 16) & 255, (GENERATED_COLOR >> 8) & 255, GENERATED_COLOR & 255])
    assert all(np.abs(image.astype(int) - generated).mean() < 60 for image in images)  # restored, not replaced
    # The node's own preview (what the frontend shows on it): one temp file per image, the saved pixels.
    previews = result.outputs["5"]["images"]
    assert len(previews) == 3 and all(p["type"] == "temp" for p in previews)
    temp_dir = host.work_dir  # the server's --temp-directory; the host adds its own temp/ folder
    for preview, image in zip(previews, images):
        path = temp_dir / "temp" / preview["subfolder"] / preview["filename"]
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)


def test_all_zero_mask_gives_back_the_reference(host):
    result = host.run_graph(restore_graph(mask_value=0.0, seed=2)).check()
    [image] = saved_images(host, result)
    reference = [(REFERENCE_COLOR >> 16) & 255, (REFERENCE_COLOR >> 8) & 255, REFERENCE_COLOR & 255]
    assert (image == np.array(reference, dtype=np.uint8)).all()


def test_grey_images_are_converted(host):
    result = host.run_graph(restore_graph(channels=1, seed=3)).check()
    [image] = saved_images(host, result)
    assert image.shape == (61, 97, 3)


@pytest.mark.parametrize("graph_args, message, fresh_seed", [
    ({"mask_size": (97, 60)}, "mask is 97x60 but the generated image is 97x61", 10),
    ({"reference_size": (96, 61)}, "reference image is 96x61 but the generated image is 97x61", 11),
    ({"batch": 3, "reference_batch": 2}, "reference image batch has 2 entries but the generated batch has 3", 12),
    ({"channels": 2}, "has 2 channels; DiffRIR restores RGB images", 13),
])
def test_bad_inputs_are_clear_errors_and_the_host_keeps_serving(host, graph_args, message, fresh_seed):
    result = host.run_graph(restore_graph(**graph_args))
    assert not result.ok and message in result.error, result.error
    ok = host.run_graph(restore_graph(seed=fresh_seed)).check()  # a new seed: the host cannot answer from cache
    assert len(saved_images(host, ok)) == 1


def test_unknown_model_says_where_to_put_it(host):
    result = host.run_graph(restore_graph("DiffRIR.pth"))
    assert not result.ok and "DiffRIR.pth" in result.error and "models/diffrir" in result.error.replace("\\", "/")


def test_weights_for_another_config_name_the_keys(host, tiny_models):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mmig_core.diffrir import DiffRIRConfig
    with safe_open(str(tiny_models / TINY_DIFFRIR), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    config = json.loads(metadata["mmig.diffrir.config"])
    metadata["mmig.diffrir.config"] = dataclasses.replace(DiffRIRConfig.from_json(json.dumps(config)),
                                                          dim=16).to_json()
    target = host.scratch_models / "diffrir" / "other-config.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target), metadata=metadata)
    result = host.run_graph(restore_graph("other-config.safetensors"))
    assert not result.ok and "does not fit its DiffRIR config" in result.error
    assert "restorer.decoder1.0.attn.qkv.weight (file [48, 16, 1, 1], config [96, 32, 1, 1])" in result.error
    ok = host.run_graph(restore_graph(seed=99)).check()
    assert len(saved_images(host, ok)) == 1


def write_official_checkpoint(host, name, variant=None):
    """A .pth in the official layout into the host's models/diffrir/: the conformance fixture's small network
    (seeded weights, shared tensors as in a real checkpoint), or random tensors at a manifest entry's shapes."""
    import torch

    from devtools.conformance.diffrir import manifest_entry, official_checkpoint, small_official_checkpoint
    state = small_official_checkpoint() if variant is None else official_checkpoint(manifest_entry(variant))
    target = host.scratch_models / "diffrir" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": state}, target)
    return target


def test_an_official_checkpoint_restores_through_the_nodes(host):
    write_official_checkpoint(host, "official-small.pth")
    graph = restore_graph("official-small.pth", width=56, height=40, seed=21)
    graph["5"]["inputs"]["soft_mask"] = False
    [image] = saved_images(host, host.run_graph(graph).check())
    assert image.shape == (40, 56, 3)
    generated = np.array([(GENERATED_COLOR >> 16) & 255, (GENERATED_COLOR >> 8) & 255, GENERATED_COLOR & 255])
    assert np.abs(image.astype(int) - generated).mean() < 60  # a small residual on the generated image


def test_an_official_x2_checkpoint_is_refused_by_name(host):
    write_official_checkpoint(host, "official-x2.pth", variant="small_x2")
    result = host.run_graph(restore_graph("official-x2.pth"))
    assert not result.ok and "x2 (options/train_DiffRIRS2_x2.yml)" in result.error, result.error
    assert "accepted: the official DiffRIRS2 x1 checkpoint" in result.error
    ok = host.run_graph(restore_graph(seed=22)).check()
    assert len(saved_images(host, ok)) == 1


@pytest.mark.parametrize("soft_mask", [False, True])
def test_a_soft_mask_is_binarised_unless_soft_mask_is_on(host, soft_mask):
    graph = restore_graph(mask_value=0.3, seed=30 + soft_mask)
    graph["5"]["inputs"]["soft_mask"] = soft_mask
    [image] = saved_images(host, host.run_graph(graph).check())
    reference = np.array([(REFERENCE_COLOR >> 16) & 255, (REFERENCE_COLOR >> 8) & 255, REFERENCE_COLOR & 255])
    # 0.3 < 0.5: binarised, nothing counts as generated and the reference comes back exactly; soft, 30 % blends in.
    assert (image == reference.astype(np.uint8)).all() != soft_mask


def test_the_published_x1_checkpoint_loads_and_runs_in_the_host(host):
    """Random tensors with exactly the names and shapes of the official network at inference_diffrir.py's config."""
    import torch

    from devtools.conformance.diffrir import manifest_entry, official_checkpoint
    target = host.scratch_models / "diffrir" / "DiffRIR-x1-published.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params": official_checkpoint(manifest_entry("x1"))}, target)
    graph = restore_graph(target.name, width=40, height=36, seed=40)
    [image] = saved_images(host, host.run_graph(graph).check())
    assert image.shape == (36, 40, 3)
