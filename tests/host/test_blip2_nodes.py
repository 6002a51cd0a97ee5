"""The BLIP-2 nodes inside a real ComfyUI server: listing, captions, and every bad input of the issue."""
import pickle
import shutil

import pytest

from devtools.tiny_models import TINY_BLIP2

pytestmark = pytest.mark.host
TINY_NAME = TINY_BLIP2.split("/")[-1]


def caption_graph(model_name, *, image_node=None, batch=2, prefix="", sampling=False, color=0x3366CC):
    image = image_node or {"class_type": "EmptyImage",
                           "inputs": {"width": 48, "height": 40, "batch_size": batch, "color": color}}
    return {
        "1": image,
        "2": {"class_type": "MMIG_BLIP2Loader", "inputs": {"model_name": model_name, "dtype": "auto"}},
        "3": {"class_type": "MMIG_BLIP2Caption",
              "inputs": {"blip2": ["2", 0], "images": ["1", 0], "max_new_tokens": 8, "num_beams": 2,
                         "sampling": sampling, "seed": 7, "prompt": "", "filename_prefix": prefix}},
    }


def test_the_loader_lists_the_tiny_model(host):
    info = host.object_info()
    assert TINY_NAME in info["MMIG_BLIP2Loader"]["input"]["required"]["model_name"][0]
    assert info["MMIG_BLIP2Caption"]["output_node"] is True


def test_captions_one_per_image_and_saves_file(host):
    result = host.run_graph(caption_graph(TINY_NAME, batch=3, prefix="captions/test")).check()
    captions = result.outputs["3"]["text"]
    assert len(captions) == 3 and all(c.strip() for c in captions)
    [file] = host.output_files(result)
    assert file.read_text().strip().split("\n") == captions


def test_unknown_model_is_refused_with_where_to_put_it(host):
    result = host.run_graph(caption_graph("blip2-opt-2.7b"))
    assert not result.ok
    assert "blip2-opt-2.7b" in result.error and "models/blip2" in result.error.replace("\\", "/")
    assert "Hugging Face" in result.error


def test_incomplete_model_folder_names_the_missing_files(host, tiny_models):
    broken = host.scratch_models / "blip2" / "broken-no-weights"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "config.json").write_text("{}")
    result = host.run_graph(caption_graph("broken-no-weights"))
    assert not result.ok and "safetensors" in result.error and str(broken) in result.error


def test_corrupt_weights_give_a_clear_error(host, tiny_models):
    corrupt = host.scratch_models / "blip2" / "corrupt-weights"
    shutil.rmtree(corrupt, ignore_errors=True)
    shutil.copytree(tiny_models / TINY_BLIP2, corrupt)
    for weights in corrupt.glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])  # truncated download
    result = host.run_graph(caption_graph("corrupt-weights"))
    assert not result.ok and "not a valid safetensors file" in result.error


def test_pickle_renamed_to_safetensors_is_not_unpickled(host, tiny_models):
    disguised = host.scratch_models / "blip2" / "pickle-disguised"
    shutil.rmtree(disguised, ignore_errors=True)
    shutil.copytree(tiny_models / TINY_BLIP2, disguised)
    for weights in disguised.glob("*.safetensors"):
        weights.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    result = host.run_graph(caption_graph("pickle-disguised"))
    assert not result.ok and "not a valid safetensors file" in result.error


def test_empty_image_batch_is_a_clear_error_and_host_keeps_serving(host):
    empty = {"class_type": "MMIGTest_EmptyImageBatch", "inputs": {"width": 32, "height": 32}}
    result = host.run_graph(caption_graph(TINY_NAME, image_node=empty))
    assert not result.ok and "empty IMAGE batch" in result.error
    # The host is still serving, and a valid graph runs after the failed one.
    ok = host.run_graph(caption_graph(TINY_NAME, batch=1, color=0x123456)).check()  # uncached image
    assert ok.outputs["3"]["text"][0].strip()
