"""Every shipped workflow fits the real host's nodes, and runs there on the tiny models."""
import copy
import json

import pytest

from devtools.run import run_workflow
from devtools.workflows import WORKFLOWS_DIR, ui_matches_api, validate_api, validate_ui, workflow_names

pytestmark = pytest.mark.host
NAMES = workflow_names()


def test_every_workflow_has_both_twins():
    assert NAMES, "no workflows shipped"
    for name in NAMES:
        assert (WORKFLOWS_DIR / f"{name}.json").is_file(), f"{name}: UI-format twin missing"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_fits_object_info(host, name):
    object_info = host.object_info()
    api = json.loads((WORKFLOWS_DIR / f"{name}.api.json").read_text())
    ui = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    assert validate_api(api, object_info) == []
    assert validate_ui(ui, object_info) == []
    assert ui_matches_api(ui, api, object_info) == []


def test_validator_catches_broken_graphs(host):
    object_info = host.object_info()
    api = json.loads((WORKFLOWS_DIR / "txt2img_caption.api.json").read_text())
    broken = copy.deepcopy(api)
    broken["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    broken["6"]["inputs"]["samples"] = ["1", 0]  # a MODEL into a LATENT input
    broken["9"]["class_type"] = "MMIG_NoSuchNode"
    problems = "\n".join(validate_api(broken, object_info))
    assert "no_such_sampler" in problems and "expects LATENT" in problems and "MMIG_NoSuchNode" in problems
    ui = json.loads((WORKFLOWS_DIR / "txt2img_caption.json").read_text())
    ui["links"][0][5] = "IMAGE"
    ui["nodes"][0]["widgets_values"] = []
    problems = "\n".join(validate_ui(ui, object_info))
    assert "link 1" in problems and "widget values" in problems


def test_workflows_saved_before_new_optional_inputs_still_validate(host):
    # Node inputs added later go at the end as optional; older saved workflows lack their values.
    object_info = host.object_info()
    ui = json.loads((WORKFLOWS_DIR / "mumu_multimodal_prompt.json").read_text())
    loader = next(n for n in ui["nodes"] if n["type"] == "MMIG_VLMLoader")
    loader["widgets_values"] = loader["widgets_values"][:-2]  # saved before lora_name, lora_strength
    assert validate_ui(ui, object_info) == []
    loader["widgets_values"] = loader["widgets_values"][:1]  # a required widget's value missing
    assert "widget values" in "\n".join(validate_ui(ui, object_info))


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_on_tiny_models(host, name):
    api = json.loads((WORKFLOWS_DIR / f"{name}.api.json").read_text())
    messages = []
    code, files = run_workflow(host, api, tiny=True, log=messages.append)
    assert code == 0, "\n".join(messages) + "\n" + host.log_tail()
    assert files and all(f.stat().st_size > 0 for f in files)


def test_tools_read_both_combo_forms_and_control_widgets():
    # Newer hosts describe V3 nodes' combos as ("COMBO", {"options": [...]}) beside V1 bare lists,
    # and the newest frontend adds control widgets after combos and honours control_after_generate:
    # false on a seed. No host needed: these hosts' /object_info shapes, written out.
    from devtools.run import swap_to_tiny
    from devtools.workflows import api_to_ui

    object_info = {
        "V1Loader": {"input": {"required": {"ckpt_name": [["mmig-tiny-a.safetensors", "real.safetensors"], {}]}},
                     "output": ["MODEL"], "output_name": ["MODEL"]},
        "V3Sampler": {"input": {"required": {
            "model": ["MODEL", {}],
            "vlm_name": ["COMBO", {"options": ["mmig-tiny-vlm", "big-vlm"]}],
            "mode": ["COMBO", {"options": ["a", "b"], "control_after_generate": True}],
            "seed": ["INT", {"default": 0, "min": 0, "max": 9, "control_after_generate": False}],
            "noise_seed": ["INT", {"default": 0, "min": 0, "max": 9}]}},
            "output": ["LATENT"], "output_name": ["LATENT"]},
    }
    api = {"1": {"class_type": "V1Loader", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
           "2": {"class_type": "V3Sampler", "inputs": {"model": ["1", 0], "vlm_name": "big-vlm", "mode": "b",
                                                       "seed": 3, "noise_seed": 4}}}
    assert validate_api(api, object_info) == []
    assert validate_api({**api, "2": {**api["2"], "inputs": {**api["2"]["inputs"], "mode": "z"}}},
                        object_info) != []
    swapped = copy.deepcopy(api)
    assert len(swap_to_tiny(swapped, object_info)) == 2
    assert swapped["1"]["inputs"]["ckpt_name"] == "mmig-tiny-a.safetensors"
    assert swapped["2"]["inputs"]["vlm_name"] == "mmig-tiny-vlm"
    ui = api_to_ui(api, object_info)
    sampler = next(n for n in ui["nodes"] if n["type"] == "V3Sampler")
    # combo value, its control and filter list; seed without control; noise_seed with its control.
    assert sampler["widgets_values"] == ["big-vlm", "b", "fixed", "", 3, 4, "fixed"]
    assert validate_ui(ui, object_info) == []
