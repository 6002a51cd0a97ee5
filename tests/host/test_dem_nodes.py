"""The DEM nodes (A-STAR guidance, layered embeddings) inside a real ComfyUI server, on the tiny SDXL."""
import pytest

from devtools.tiny_models import TINY_SDXL

pytestmark = pytest.mark.host
CKPT = TINY_SDXL.split("/")[-1]
PROMPT = "a photo of a cat and a dog"


def base_graph():
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def astar_node(concepts="cat, dog", **extra):
    return {"class_type": "MMIG_AStarGuidance",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT, "concepts": concepts,
                       "guided_steps": 2, "scale_factor": 20.0, "threshold": 0.5, **extra}}


def saved(graph, samples, node_id, prefix):
    graph[f"{node_id}d"] = {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": ["1", 2]}}
    graph[f"{node_id}s"] = {"class_type": "SaveImage",
                            "inputs": {"filename_prefix": prefix, "images": [f"{node_id}d", 0]}}


def guided_graph(concepts="cat, dog", **extra):
    graph = base_graph()
    graph["5"] = astar_node(concepts, **extra)
    graph["6"] = {"class_type": "KSampler",
                  "inputs": {"seed": 1, "steps": 3, "cfg": 5.0, "sampler_name": "euler_ancestral",
                             "scheduler": "normal", "denoise": 1.0, "model": ["5", 0], "positive": ["2", 0],
                             "negative": ["3", 0], "latent_image": ["4", 0]}}
    saved(graph, ["6", 0], "6", "dem/ksampler")
    return graph


def layered_graph(mask_size=(64, 64)):
    graph = base_graph()
    graph["5"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": mask_size[0], "height": mask_size[1]}}
    graph["7"] = {"class_type": "MMIG_LayeredEmbeddings",
                  "inputs": {"model": ["1", 0], "latent": ["4", 0], "mask": ["5", 0], "foreground": ["2", 0],
                             "background": ["3", 0], "steps": 2, "learning_rate": 0.01, "alpha": 0.7, "seed": 0}}
    graph["8"] = {"class_type": "KSampler",
                  "inputs": {"seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "normal",
                             "denoise": 1.0, "model": ["1", 0], "positive": ["7", 0], "negative": ["3", 0],
                             "latent_image": ["4", 0]}}
    saved(graph, ["8", 0], "8", "dem/layered")
    return graph


def test_the_nodes_outputs(host):
    info = host.object_info()
    assert info["MMIG_AStarGuidance"]["output"] == ["MODEL"]
    assert info["MMIG_LayeredEmbeddings"]["output"] == ["CONDITIONING"] * 3


def test_guided_model_samples_through_ksampler_and_sampler_custom(host):
    graph = guided_graph()
    graph["20"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}}
    graph["21"] = {"class_type": "BasicScheduler",
                   "inputs": {"model": ["5", 0], "scheduler": "normal", "steps": 3, "denoise": 1.0}}
    graph["22"] = {"class_type": "SamplerCustom",
                   "inputs": {"model": ["5", 0], "add_noise": True, "noise_seed": 1, "cfg": 5.0,
                              "positive": ["2", 0], "negative": ["3", 0], "sampler": ["20", 0],
                              "sigmas": ["21", 0], "latent_image": ["4", 0]}}
    saved(graph, ["22", 0], "22", "dem/custom")
    result = host.run_graph(graph).check()
    files = host.output_files(result)
    assert len(files) == 2 and all(f.stat().st_size > 0 for f in files)


def test_layered_embeddings_feed_a_sampler(host):
    result = host.run_graph(layered_graph()).check()
    assert [f.stat().st_size > 0 for f in host.output_files(result)] == [True]


def test_a_concept_not_in_the_prompt_lists_the_tokens_and_the_host_keeps_serving(host):
    result = host.run_graph(guided_graph("cat, horse"))
    assert not result.ok
    assert "'horse' is not in the prompt" in result.error and "5:cat" in result.error and "8:dog" in result.error
    bad_indices = host.run_graph(guided_graph(token_indices="0,5"))
    assert not bad_indices.ok and "token_indices [0]" in bad_indices.error
    host.run_graph(guided_graph()).check()


@pytest.mark.parametrize("options", [
    # max_refine_iters 2: the tiny SDXL's near-uniform maps never reach A&E's thresholds, the cap stops it
    {"mode": "attend_and_excite", "max_refine_iters": 2},
    {"mode": "attend_and_excite", "refine_at_steps": "0,1", "refine_thresholds": "0.05,0.5", "max_refine_iters": 2},
    {"mode": "a_star", "normalise_maps": False, "reuse_prediction": True, "refine_at_steps": "0"},
], ids=["attend_and_excite", "attend_and_excite-own-refinement", "a_star-options"])
def test_each_mode_samples_through_ksampler(host, options):
    result = host.run_graph(guided_graph(**options)).check()
    assert [f.stat().st_size > 0 for f in host.output_files(result)] == [True]


def test_the_mode_input_is_optional_and_last_with_a_star_as_default(host):
    optional = host.object_info()["MMIG_AStarGuidance"]["input"]["optional"]
    assert list(optional)[4:] == ["mode", "refine_thresholds", "normalise_maps", "reuse_prediction",
                                  "start_percent", "end_percent"]
    assert optional["mode"][0] == ["a_star", "attend_and_excite"] and optional["mode"][1]["default"] == "a_star"


def test_start_and_end_percent_run_and_bad_ones_are_refused_clearly(host):
    optional = host.object_info()["MMIG_AStarGuidance"]["input"]["optional"]
    assert (optional["start_percent"][1]["default"], optional["end_percent"][1]["default"]) == (0.0, 1.0)
    host.run_graph(guided_graph(start_percent=0.2, end_percent=0.7)).check()
    result = host.run_graph(guided_graph(start_percent=0.7, end_percent=0.2))
    assert not result.ok and "start_percent <= end_percent" in result.error
    host.run_graph(guided_graph(start_percent=0.1)).check()


def test_unpaired_refine_thresholds_are_refused_and_the_host_keeps_serving(host):
    result = host.run_graph(guided_graph(mode="attend_and_excite", refine_at_steps="0,1", refine_thresholds="0.5"))
    assert not result.ok and "one refine_threshold per refine_at_steps step" in result.error
    host.run_graph(guided_graph(mode="attend_and_excite", max_refine_iters=2)).check()


def test_one_concept_runs_with_a_warning(host):
    host.run_graph(guided_graph("cat")).check()
    assert "fewer than two concepts" in host.log()


def test_a_mask_of_another_shape_is_refused_and_the_host_keeps_serving(host):
    result = host.run_graph(layered_graph((64, 32)))
    assert not result.ok and "64x32 px but the latent is 8x8" in result.error
    host.run_graph(layered_graph((48, 48))).check()  # the same aspect ratio at another size is resized


def test_a_star_guides_in_mmig_full(host):
    # mmig_full guides the MODEL from MMIG MMSM Apply: A-STAR's gradient pass runs through MMSM's patch, whose
    # weights and LLM embedding were made under the host's inference mode (it used to skip every guided step).
    import json

    import numpy as np
    from PIL import Image

    from devtools.run import run_workflow
    from devtools.workflows import WORKFLOWS_DIR
    api = json.loads((WORKFLOWS_DIR / "mmig_full.api.json").read_text())
    assert api["17"]["inputs"]["model"] == ["16", 0] and api["16"]["class_type"] == "MMIG_AStarGuidance"
    assert api["16"]["inputs"]["model"] == ["7", 0] and api["7"]["class_type"] == "MMIG_MMSMApply"
    bypassed = json.loads(json.dumps(api))
    bypassed["17"]["inputs"]["model"] = ["7", 0]
    images = []
    for graph in (api, bypassed):
        log_start, messages = len(host.log()), []
        code, files = run_workflow(host, graph, tiny=True, log=messages.append)
        assert code == 0, "\n".join(messages) + "\n" + host.log_tail()
        assert "A-STAR" not in host.log()[log_start:]
        [image] = [f for f in files if f.suffix == ".png"]
        images.append(np.asarray(Image.open(image), dtype=np.float32))
    assert np.abs(images[0] - images[1]).max() > 0  # A-STAR moved the latent (the tiny VAE decodes near-flat grey)
