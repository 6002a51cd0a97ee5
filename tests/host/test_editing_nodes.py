"""MMIG Direct Inversion + MMIG Prompt-to-Prompt inside a real ComfyUI server, on the tiny SD1.x: a real image in,
both latents decoded and saved; each bad input an error naming what to fix, the host serving after it."""
import pytest

from devtools.tiny_models import TINY_SD15, TINY_SDXL

pytestmark = pytest.mark.host
SD15, SDXL = TINY_SD15.split("/")[-1], TINY_SDXL.split("/")[-1]
SOURCE, TARGET = "a photo of a cat", "a photo of a dog"


def graph(target=TARGET, p2p_model=("1", 0), steps=3, **p2p_inputs):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": SOURCE, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": target, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 128, "height": 128, "batch_size": 1, "color": 0x8040c0}},
        "6": {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "MMIG_DirectInversion",
              "inputs": {"model": ["1", 0], "latent": ["6", 0], "source": ["2", 0], "steps": steps}},
        "8": {"class_type": "MMIG_PromptToPrompt",
              "inputs": {"model": list(p2p_model), "inversion": ["7", 0], "source": ["2", 0], "target": ["3", 0],
                         "clip": ["1", 1], "source_prompt": SOURCE, "target_prompt": target, "negative": ["4", 0],
                         "cfg": 7.5, "mode": "replace", "cross_replace_steps": 0.4, "self_replace_steps": 0.6,
                         **p2p_inputs}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"filename_prefix": "edit/edited", "images": ["9", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 1], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"filename_prefix": "edit/source", "images": ["11", 0]}},
    }
    return g


def test_the_nodes_are_served_with_their_defaults_sourced(host):
    info = host.object_info()
    inversion, p2p = info["MMIG_DirectInversion"], info["MMIG_PromptToPrompt"]
    assert inversion["output"] == ["MMIG_INVERSION", "LATENT"] and p2p["output"] == ["LATENT", "LATENT"]
    required = p2p["input"]["required"]
    assert list(required)[:5] == ["model", "inversion", "source", "target", "clip"]
    for name, default in (("cfg", 7.5), ("cross_replace_steps", 0.4), ("self_replace_steps", 0.6)):
        assert required[name][1]["default"] == default and "PnPInversion" in required[name][1]["tooltip"]
    assert required["mode"][0] == ["replace", "refine", "reweight"]
    assert p2p["input"]["optional"]["blend_threshold"][1]["default"] == 0.3
    assert "PnPInversion" in inversion["input"]["required"]["steps"][1]["tooltip"]


def test_an_edit_runs_and_saves_both_images(host):
    result = host.run_graph(graph(blend_words="cat, dog")).check()
    files = host.output_files(result)
    assert len(files) == 2 and all(f.stat().st_size > 0 for f in files)


@pytest.mark.parametrize("change, words", [
    (dict(target="a photo of a fluffy dog"), ("mode replace", "Use mode refine", "'fluffy'")),
    (dict(blend_words="zebra"), ("blend word 'zebra'", "not in the source or target prompt", "'photo'")),
    (dict(mode="reweight", reweight_words="cat"), ("reweight word 'cat'", "not in the target prompt")),
    (dict(start_latent=["13", 0]), ("start_latent is [1, 4, 8, 8]", "[1, 4, 16, 16]")),
    (dict(p2p_model=("14", 0)), ("another MODEL",)),
], ids=["replace-token-counts", "blend-word", "reweight-word", "latent-size", "other-model"])
def test_bad_input_is_an_error_naming_what_to_fix_and_the_host_keeps_serving(host, change, words):
    g = graph(**{k: v for k, v in change.items() if k in ("target", "p2p_model")},
              **{k: v for k, v in change.items() if k not in ("target", "p2p_model")})
    g["13"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["14"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL}}
    result = host.run_graph(g)
    assert not result.ok
    missing = [w for w in words if w not in result.error]
    assert not missing, f"the error lacks {missing}:\n{result.error}"
    assert host.run_graph(graph(steps=2)).ok
