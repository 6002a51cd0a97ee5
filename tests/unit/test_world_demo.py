"""devtools/world/demo.py, `make demo` on the world models: the flagship graph keeps its nodes and links and gets
the world's inputs, and the scorer's verdict tells an edited scene from an unedited one."""
import json

import numpy as np
import pytest

from devtools.world import caption, render, sample_scene
from devtools.world import demo
from devtools.workflows import api_path


@pytest.fixture
def models_root(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "world_sdxl_full_abc.safetensors").write_bytes(b"")
    return tmp_path


def test_the_demo_edit_is_a_recolour_of_the_circle_of_an_evaluation_scene():
    edit = demo.demo_edit()
    source = sample_scene(demo.DEMO_SCENE_SEED)
    assert demo.DEMO_SCENE_SEED >= 1_000_000  # an evaluation scene: never trained on
    assert edit.instruction == "Make the circle blue."
    assert source.objects[edit.index].shape == "circle" and edit.scene.objects[edit.index].colour == "blue"
    assert caption(source) == "a green circle, a cyan triangle and an orange triangle on a black background"


def test_the_world_graph_is_the_flagship_node_for_node_with_the_world_inputs(models_root):
    api = json.loads(api_path("mmig_full").read_text())
    edit = demo.demo_edit()
    graph = demo.world_graph(api, edit, models_root)
    (added,) = set(graph) - set(api)  # Set Latent Noise Mask: the sampler redraws the mask only (module doc)
    # the VLM prompt's CLIP Text Encode and its Conditioning Concat are left out (module doc)
    (concat,) = [i for i in api if api[i]["class_type"] == "ConditioningConcat"]
    left_out = set(api) - set(graph)
    assert left_out == {concat, api[concat]["inputs"]["conditioning_from"][0]}
    sampler_id = next(i for i in api if api[i]["class_type"] == "KSampler")
    sampler = graph[sampler_id]["inputs"]
    layered_id = next(i for i in api if api[i]["class_type"] == "MMIG_LayeredEmbeddings")
    layered = graph[layered_id]["inputs"]
    assert graph[added] == {"class_type": "SetLatentNoiseMask",
                            "inputs": {"samples": layered["latent"], "mask": layered["mask"]}}
    assert sampler["latent_image"] == [added, 0] and sampler["positive"] == [layered_id, 0]
    mmsm = next(i for i in api if api[i]["class_type"] == "MMIG_MMSMApply")
    assert graph[mmsm]["inputs"]["llm_embeds"] == api[mmsm]["inputs"]["llm_embeds"]  # the VLM still feeds MMSM
    sampler.update(latent_image=layered["latent"], positive=api[sampler_id]["inputs"]["positive"])
    del graph[added]
    api = {i: n for i, n in api.items() if i not in left_out}
    changed_types = {i: (api[i]["class_type"], graph[i]["class_type"]) for i in api
                     if api[i]["class_type"] != graph[i]["class_type"]}
    assert list(changed_types.values()) == [("EmptyImage", "LoadImage")]
    for i, node in api.items():  # every link of the flagship is kept
        links = {k: v for k, v in node["inputs"].items() if isinstance(v, list)}
        assert {k: graph[i]["inputs"][k] for k in links} == links or graph[i]["class_type"] == "LoadImage"
    by_type = {n["class_type"]: n["inputs"] for n in graph.values() if n["class_type"] != "CLIPTextEncode"}
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "world_sdxl_full_abc.safetensors"
    assert by_type["MMIG_MultimodalPrompt"]["text"] == "<image1> Make the circle blue."
    assert by_type["MMIG_AStarGuidance"]["prompt"] == caption(edit.scene)
    assert by_type["MMIG_AStarGuidance"]["concepts"] == "blue circle, cyan triangle, orange triangle"
    texts = {graph[i]["inputs"]["text"] for i in graph if graph[i]["class_type"] == "CLIPTextEncode"
             and not isinstance(graph[i]["inputs"]["text"], list)}
    assert texts == {"a blue circle", "a black background", ""}
    # the Layered Embeddings mask is a box around the edited object, inside the 128 px image
    composite = by_type["MaskComposite"]
    x, y = composite["x"], composite["y"]
    w, h = (graph[composite["source"][0]]["inputs"][k] for k in ("width", "height"))
    obj = edit.scene.objects[edit.index]
    assert x < obj.cx - obj.size / 2 and obj.cx + obj.size / 2 < x + w <= 128
    assert y < obj.cy - obj.size / 2 and obj.cy + obj.size / 2 < y + h <= 128


def test_a_graph_without_the_flagship_nodes_is_refused(models_root):
    api = json.loads(api_path("mmig_full").read_text())
    del api[next(i for i, n in api.items() if n["class_type"] == "MMIG_AStarGuidance")]
    with pytest.raises(ValueError, match="one MMIG_AStarGuidance node"):
        demo.world_graph(api, demo.demo_edit(), models_root)


def test_the_verdict_passes_the_edited_scene_and_fails_the_unedited_one():
    edit = demo.demo_edit()
    edited = demo.verdict(render(edit.scene)[0], caption(edit.scene), edit)
    assert edited.ok and edited.edited and edited.scene_present == 1.0 and edited.caption_describes_image == 1.0
    source = sample_scene(demo.DEMO_SCENE_SEED)
    unedited = demo.verdict(render(source)[0], caption(source), edit)
    assert not unedited.ok and not unedited.edited and not unedited.caption_correct
    assert unedited.scene_present == pytest.approx(2 / 3)  # the two triangles are there, the blue circle is not
    lines = demo.describe(unedited, edit)
    assert lines[-1] == "scorer: NOT a match"
    flat = demo.verdict(np.full((128, 128, 3), 25, np.uint8), "a blue circle on a black background", edit)
    assert not flat.ok and flat.found == [] and flat.caption_describes_image == 0.0
