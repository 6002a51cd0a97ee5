"""Every shipped workflow fits the real host's nodes, runs there on the tiny models, and opens in the
frontend's Template Browser as a user would want it: stage groups, a note, no overlapping nodes, a
`models` list naming every model file, a thumbnail."""
import copy
import json

import pytest
from PIL import Image

from devtools.run import run_workflow
from devtools.workflow_layout import FRONTEND_ONLY, layout_problems, models_problems, node_rect
from devtools.workflows import (EXAMPLES_DIR, LEGACY_DIR, WORKFLOWS_DIR, api_path, build_example, example_names,
                                ui_matches_api, validate_api, validate_ui, workflow_names)

pytestmark = pytest.mark.host
NAMES = workflow_names()


def _ui(name):
    return json.loads((EXAMPLES_DIR / f"{name}.json").read_text())


def test_every_workflow_has_its_ui_twin_and_thumbnail():
    assert NAMES, "no workflows shipped"
    assert example_names() == NAMES, "example_workflows/ and workflows/api/ name different workflows"
    # The host's template route also lists `workflows/*.json` (an accepted folder name), so an API twin
    # there would show as a broken template.
    assert sorted(p.name for p in LEGACY_DIR.iterdir()) == ["api"], "only workflows/api/ may be in workflows/"
    for name in NAMES:
        with Image.open(EXAMPLES_DIR / f"{name}.jpg") as thumb:
            assert thumb.format == "JPEG" and thumb.size == (512, 512), f"{name}.jpg"
            low, high = thumb.convert("L").getextrema()
            assert high - low > 30, f"{name}.jpg is blank"


def test_make_run_names_resolve_to_the_api_twin(tmp_path):
    twin = WORKFLOWS_DIR / "txt2img_caption.api.json"
    for given in ("workflows/txt2img_caption.json", "example_workflows/txt2img_caption.json",
                  "workflows/api/txt2img_caption.api.json", "txt2img_caption", str(twin)):
        assert api_path(given) == twin, given
    own = tmp_path / "mine.api.json"
    own.write_text("{}")
    assert api_path(own) == own.resolve()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_fits_object_info(host, name):
    object_info = host.object_info()
    api = json.loads((WORKFLOWS_DIR / f"{name}.api.json").read_text())
    ui = _ui(name)
    assert validate_api(api, object_info) == []
    assert validate_ui(ui, object_info) == []
    assert ui_matches_api(ui, api, object_info) == []


@pytest.mark.parametrize("name", NAMES)
def test_example_workflow_is_laid_out_for_the_frontend(host, name):
    object_info = host.object_info()
    ui = _ui(name)
    assert layout_problems(ui, object_info) == []
    assert models_problems(ui, object_info) == []
    assert len(ui["groups"]) >= 2
    notes = [n for n in ui["nodes"] if n["type"] in FRONTEND_ONLY]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    for model in ui["models"]:
        assert model["name"] in text and f"models/{model['directory']}/" in text
    # Left to right: the note first, then the groups in their order.
    xs = [g["bounding"][0] for g in ui["groups"]]
    assert xs == sorted(xs) and node_rect(notes[0])[2] < xs[0]
    # The committed file is what the generator makes (run `python -m devtools.workflows regenerate`).
    built = build_example(name, object_info)
    for key in ("groups", "models", "extra"):
        assert ui[key] == built[key], f"{name}: {key} differs from the generator's: regenerate"
    assert [(n["id"], n["pos"], n["size"]) for n in ui["nodes"]] == \
        [(n["id"], n["pos"], n["size"]) for n in built["nodes"]], f"{name}: layout differs: regenerate"


def test_layout_checks_catch_overlaps_strays_and_missing_models(host):
    object_info = host.object_info()
    ui = _ui("txt2img_caption")
    nodes = {n["type"]: n for n in ui["nodes"]}
    moved = copy.deepcopy(ui)
    sampler = next(n for n in moved["nodes"] if n["type"] == "KSampler")
    decode = next(n for n in moved["nodes"] if n["type"] == "VAEDecode")
    decode["pos"] = [sampler["pos"][0] + 20, sampler["pos"][1] + 20]
    problems = "\n".join(layout_problems(moved, object_info))
    assert "overlap" in problems and "runs right to left" in problems
    small = copy.deepcopy(ui)
    next(n for n in small["nodes"] if n["type"] == "KSampler")["size"] = [100, 60]
    assert "smaller than" in "\n".join(layout_problems(small, object_info))
    stray = copy.deepcopy(ui)
    next(n for n in stray["nodes"] if n["type"] == "KSampler")["pos"] = [-2000, 0]
    assert "inside 0 groups" in "\n".join(layout_problems(stray, object_info))
    unlisted = copy.deepcopy(ui)
    unlisted["models"] = [m for m in unlisted["models"] if m["directory"] != "blip2"]
    assert "blip2-opt-2.7b, missing from the workflow's models list" in \
        "\n".join(models_problems(unlisted, object_info))
    assert nodes["MMIG_BLIP2Loader"]["properties"]["models"][0]["directory"] == "blip2"


def test_regenerate_moves_a_workflow_written_in_the_old_layout(tmp_path, monkeypatch):
    # Another issue's workflow may land as workflows/<name>.api.json + workflows/<name>.json.
    from devtools import workflows
    legacy, api_dir = tmp_path / "workflows", tmp_path / "workflows" / "api"
    legacy.mkdir()
    (legacy / "new_one.api.json").write_text("{}")
    (legacy / "new_one.json").write_text('{"nodes": [], "links": []}')
    graph = {"1": {"class_type": "EmptyImage", "inputs": {}}}
    (legacy / "api_only.json").write_text(json.dumps(graph))  # an API graph saved without .api
    monkeypatch.setattr(workflows, "LEGACY_DIR", legacy)
    monkeypatch.setattr(workflows, "WORKFLOWS_DIR", api_dir)
    assert workflows.migrate_legacy() == ["api_only", "new_one"]
    assert sorted(p.name for p in legacy.iterdir()) == ["api"]
    assert sorted(p.name for p in api_dir.iterdir()) == ["api_only.api.json", "new_one.api.json"]
    assert json.loads((api_dir / "api_only.api.json").read_text()) == graph


def test_validator_catches_broken_graphs(host):
    object_info = host.object_info()
    api = json.loads((WORKFLOWS_DIR / "txt2img_caption.api.json").read_text())
    broken = copy.deepcopy(api)
    broken["5"]["inputs"]["sampler_name"] = "no_such_sampler"
    broken["6"]["inputs"]["samples"] = ["1", 0]  # a MODEL into a LATENT input
    broken["9"]["class_type"] = "MMIG_NoSuchNode"
    problems = "\n".join(validate_api(broken, object_info))
    assert "no_such_sampler" in problems and "expects LATENT" in problems and "MMIG_NoSuchNode" in problems
    ui = _ui("txt2img_caption")
    ui["links"][0][5] = "IMAGE"
    ui["nodes"][0]["widgets_values"] = []
    problems = "\n".join(validate_ui(ui, object_info))
    assert "link 1" in problems and "widget values" in problems


def test_workflows_saved_before_new_optional_inputs_still_validate(host):
    # Node inputs added later go at the end as optional; older saved workflows lack their values.
    object_info = host.object_info()
    ui = _ui("mumu_multimodal_prompt")
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


def test_template_browser_route_lists_every_example_with_its_thumbnail(host):
    # The route the Template Browser reads (hosts since late 2024): pack folder -> template names, and
    # each template's .json and .jpg served beside it.
    import urllib.error
    import urllib.request
    try:
        listing = host.get("/workflow_templates")
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise
        pytest.skip("this host has no Template Browser route (e.g. the pinned 2024-03 host); "
                    "set COMFYUI_PATH to a newer ComfyUI to check it")
    from devtools.host import PACK_DIR_NAME
    assert sorted(listing[PACK_DIR_NAME]) == NAMES
    for name in NAMES:
        base = f"{host.url}/api/workflow_templates/{PACK_DIR_NAME}/{name}"
        with urllib.request.urlopen(f"{base}.json", timeout=30) as response:
            assert json.loads(response.read()) == _ui(name)
        with urllib.request.urlopen(f"{base}.jpg", timeout=30) as response:
            assert response.read(3) == b"\xff\xd8\xff", f"{name}.jpg is not a JPEG"
