"""The transformers range: the floor written in one place, the per-family table checked against the installed
transformers, and loaders that name the version needed instead of blaming the files.

`make test-transformers` runs this module under the floor, 4.57 and the newest 5.x, so the table is checked
against each of them."""
import json
import re
from pathlib import Path

import pytest

from mmig_core import hf_compat
from mmig_core.model_files import ModelFilesError

ROOT = Path(__file__).resolve().parents[2]


def test_the_floor_is_written_once():
    """requirements.txt, pyproject.toml and MIN_TRANSFORMERS give the same lower bound, and it is installed here."""
    requirement = re.compile(r'^\s*"?transformers>=([0-9][0-9.]*)"?,?\s*(#.*)?$')
    found = {}
    for name in ("requirements.txt", "pyproject.toml"):
        bounds = [m.group(1) for line in (ROOT / name).read_text().splitlines() if (m := requirement.match(line))]
        assert len(bounds) == 1, f"{name}: expected one transformers>= line, found {bounds}"
        found[name] = bounds[0]
    assert found == {"requirements.txt": hf_compat.MIN_TRANSFORMERS, "pyproject.toml": hf_compat.MIN_TRANSFORMERS}
    assert hf_compat.at_least(hf_compat.MIN_TRANSFORMERS), hf_compat.transformers_version()


@pytest.mark.parametrize("installed,minimum,expected", [
    ("4.57.6", "4.57", True), ("4.56.2", "4.57", False), ("5.0.0", "4.57", True), ("4.46.1", "4.46.1", True),
    ("4.46.0", "4.46.1", False), ("4.47.0", "4.47", True), ("4.50.0.dev0", "4.50", True), ("5.0.0rc1", "5", True), ("4.9.0", "4.46", False),
    ("5.24.0+local", "5.24", True)])
def test_versions_compare_by_release_numbers(installed, minimum, expected):
    assert hf_compat.at_least(minimum, installed) is expected


def test_the_family_table_matches_the_installed_transformers():
    """Every model_type whose listed first version is installed is in this transformers' image-text-to-text
    mapping, and every one listed as newer is not: the table is what the releases shipped."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as mapping
    installed = hf_compat.transformers_version()
    for model_type, minimum in hf_compat.FAMILY_MIN_TRANSFORMERS.items():
        if hf_compat.at_least(minimum, installed):
            assert model_type in mapping, f"{model_type} listed from {minimum}, missing in {installed}"
            assert hf_compat.family_requirement(model_type) is None
        else:
            assert model_type not in mapping, f"{model_type} listed from {minimum}, already in {installed}"
            assert f">= {minimum}" in hf_compat.family_requirement(model_type)
    # A type the table leaves out needs nothing beyond the floor.
    for model_type in ("idefics2", "llava", "qwen2_vl", "mllama", "paligemma", "blip-2"):
        assert model_type in mapping and model_type not in hf_compat.FAMILY_MIN_TRANSFORMERS


def test_family_requirement_names_the_family_and_the_version():
    message = hf_compat.family_requirement("qwen3_vl", installed="4.50.3")
    assert "Qwen3-VL" in message and "qwen3_vl" in message and ">= 4.57" in message and "4.50.3" in message
    assert hf_compat.family_requirement("qwen3_vl", installed="4.57.6") is None
    assert hf_compat.family_requirement("kosmos-2.5", installed="4.55.4").count(">= 4.56") == 1
    assert hf_compat.family_requirement("idefics2", installed="4.47.0") is None
    assert hf_compat.family_requirement("no_such_family", installed="4.47.0") is None


def _old_transformers(monkeypatch, version):
    monkeypatch.setattr(hf_compat, "transformers_version", lambda: version)


def test_a_too_old_transformers_names_the_version_not_the_files(tiny_models, monkeypatch):
    from devtools.tiny_models import TINY_BLIP2, TINY_IDEFICS2
    from mmig_core.blip2 import load_blip2
    from mmig_core.vlm import load_vlm
    _old_transformers(monkeypatch, "4.45.2")
    for load, folder in ((load_vlm, TINY_IDEFICS2), (load_blip2, TINY_BLIP2)):
        with pytest.raises(ModelFilesError) as caught:
            load(tiny_models / folder)
        message = str(caught.value)
        assert f"transformers >= {hf_compat.MIN_TRANSFORMERS}" in message and "4.45.2" in message, message
        assert "config" not in message and "download" not in message, message


def test_a_family_newer_than_the_installed_transformers_says_so(tiny_models, tmp_path, monkeypatch):
    """A Qwen3-VL folder under a transformers before 4.57: the loader names the family and 4.57, before transformers
    fails on an architecture it does not know."""
    from devtools.tiny_models import TINY_IDEFICS2
    from mmig_core.vlm import load_vlm
    folder = tmp_path / "qwen3-vl"
    folder.mkdir()
    for file in (tiny_models / TINY_IDEFICS2).iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen3_vl"}))
    _old_transformers(monkeypatch, "4.56.2")
    with pytest.raises(ModelFilesError, match=r"Qwen3-VL models \(model_type 'qwen3_vl'\) need transformers >= 4\.57"):
        load_vlm(folder)


def test_image_processor_arguments_reach_the_image_processor(tiny_models):
    """do_image_splitting nested as images_kwargs reaches Idefics2's image processor on every version (flat, 4.46
    hands it to the tokenizer and 4.48-4.57 drop it)."""
    from transformers import AutoProcessor
    from PIL import Image

    from devtools.tiny_models import TINY_IDEFICS2
    processor = AutoProcessor.from_pretrained(tiny_models / TINY_IDEFICS2, local_files_only=True)
    image, text = Image.new("RGB", (40, 40)), ["User:<image>hi<end_of_utterance>\n"]
    crops = {split: processor(text=text, images=[[image]], return_tensors="pt",
                              **hf_compat.images_kwargs(do_image_splitting=split))["pixel_values"].shape[1]
             for split in (True, False)}
    assert crops == {True: 5, False: 1}


def test_a_chat_template_in_chat_template_jinja_is_the_one_used(tiny_models, tmp_path):
    """Newer transformers save a processor's template as chat_template.jinja, and hub folders ship it so: the floor
    reads it (4.46 does not, and would render without it), and it wins over nothing else in the folder."""
    from devtools.tiny_models import TINY_IDEFICS2
    from mmig_core.mm_prompt import MMPrompt
    from mmig_core.vlm import chat_messages, load_vlm
    folder = tmp_path / "jinja-only"
    folder.mkdir()
    for file in (tiny_models / TINY_IDEFICS2).iterdir():
        if file.name in ("chat_template.json", "chat_template.jinja"):
            continue
        if file.suffix == ".json":
            data = json.loads(file.read_text())
            data.pop("chat_template", None) if isinstance(data, dict) else None
            (folder / file.name).write_text(json.dumps(data))
        else:
            (folder / file.name).write_bytes(file.read_bytes())
    template = "{% for m in messages %}JINJA-{{ m['role'] }}:{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    (folder / "chat_template.jinja").write_text(template)
    vlm = load_vlm(folder)
    assert vlm.processor.chat_template == template
    messages, _ = chat_messages(vlm, MMPrompt(segments=("hello",), images=()))
    assert vlm.processor.apply_chat_template(messages, add_generation_prompt=True) == "JINJA-user:A:"
