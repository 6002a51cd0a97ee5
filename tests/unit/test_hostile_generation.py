"""Hostile inputs to generation and to the files the pack reads and writes (issue 15, items 5, 7, 8, 9 and
"hang and crash"): a stop request ends generation at the next token, lengths are capped at the model's
positions, over-long prompts are cut, tiny DiffRIR tiles are refused, text files never overwrite, bundle names
stay inside models/mmig/, and malformed histories, BLIP-2 folders and chat templates give errors that name
what to fix."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import logging  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.tiny_models import TINY_BLIP2, TINY_IDEFICS2, TINY_MUMU_BUNDLE  # noqa: E402
from mmig_core import mm_prompt  # noqa: E402
from mmig_core.blip2 import caption_images, load_blip2  # noqa: E402
from mmig_core.generation import GenerationStopped, cap_new_tokens  # noqa: E402
from mmig_core.mm_prompt import build_prompt  # noqa: E402
from mmig_core.model_files import ModelFilesError  # noqa: E402
from mmig_core.vlm import describe, load_vlm, parse_history, prompt_inputs  # noqa: E402


@pytest.fixture(scope="module")
def captioner(tiny_models):
    return load_blip2(tiny_models / TINY_BLIP2)


@pytest.fixture(scope="module")
def vlm(tiny_models):
    return load_vlm(tiny_models / TINY_IDEFICS2, image_resolution=0)


def one_image(seed=0):
    return torch.rand(1, 32, 40, 3, generator=torch.Generator().manual_seed(seed))


class FlipAfter:
    """A stop request that turns true at its (n+1)-th poll; counts the polls."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self):
        self.calls += 1
        return self.calls > self.n


def count_forward_calls(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


# --- item 8: generation stops at once on request --------------------------------------------------------

@pytest.mark.parametrize("num_beams", [1, 3])
def test_blip2_generation_stops_at_the_first_token_after_the_request(captioner, num_beams):
    stop = FlipAfter(3)
    calls, handle = count_forward_calls(captioner.model.language_model)
    try:
        with pytest.raises(GenerationStopped):
            caption_images(captioner, one_image(), max_new_tokens=100, num_beams=num_beams, stop_requested=stop)
    finally:
        handle.remove()
    # The criterion is polled after each generated token: the 4th poll says stop, and no token follows it
    # (one more poll after generate() returns tells caption_images to raise).
    assert stop.calls == 5
    assert len(calls) == 4, len(calls)  # one language-model forward per generated token, none after the stop
    # Without a stop request the same call generates on (the tiny model has no end token it prefers).
    calls, handle = count_forward_calls(captioner.model.language_model)
    try:
        caption_images(captioner, one_image(), max_new_tokens=20, num_beams=num_beams, stop_requested=lambda: False)
    finally:
        handle.remove()
    assert len(calls) > 4


def test_describe_stops_at_the_first_token_after_the_request(vlm):
    prompt = build_prompt("<image1> describe it", {1: one_image()})
    stop = FlipAfter(2)
    started = time.monotonic()
    with pytest.raises(GenerationStopped):
        describe(vlm, prompt, max_new_tokens=2000, stop_requested=stop)
    assert stop.calls == 4 and time.monotonic() - started < 10  # 2000 tokens would take far longer
    response, _ = describe(vlm, prompt, max_new_tokens=4, stop_requested=lambda: False)
    assert isinstance(response, str)


# --- item 9: lengths fit the model's positions; long prompts are cut ------------------------------------

def test_blip2_max_new_tokens_past_the_positions_is_capped_with_a_log_line(captioner, caplog):
    positions = captioner.model.config.text_config.max_position_embeddings
    with caplog.at_level(logging.WARNING, logger="ComfyUI-MMIG"):
        [caption] = caption_images(captioner, one_image(), max_new_tokens=positions * 4, num_beams=2)
    assert isinstance(caption, str)
    assert f"max_new_tokens={positions * 4} is past the model's {positions} positions" in caplog.text


def test_blip2_ten_thousand_character_prompt_is_cut_with_a_log_line(captioner, caplog):
    prompt = "a photo of a red house " * 435  # 10,005 characters
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="ComfyUI-MMIG"):
        [caption] = caption_images(captioner, one_image(), max_new_tokens=5, prompt=prompt)
    assert time.monotonic() - started < 5
    assert "the prompt is" in caplog.text and "keeping its first" in caplog.text
    assert caption.startswith("a photo of a red house") and len(caption) < 2000


def test_describe_max_new_tokens_is_capped_at_the_positions(vlm, monkeypatch, caplog):
    prompt = build_prompt("<image1> describe it", {1: one_image()})
    length = prompt_inputs(vlm, prompt)["input_ids"].shape[1] + 40  # the chat turn adds a few tokens
    monkeypatch.setattr(vlm.model.config.get_text_config(), "max_position_embeddings", length + 3)
    calls, handle = count_forward_calls(vlm.model)
    try:
        with caplog.at_level(logging.WARNING, logger="ComfyUI-MMIG"):
            describe(vlm, prompt, max_new_tokens=500)
    finally:
        handle.remove()
    assert "max_new_tokens=500 is past the model's" in caplog.text
    assert len(calls) < 60  # generation plus one hidden-state pass, not 500 tokens


def test_cap_new_tokens_refuses_a_prompt_that_fills_the_positions():
    assert cap_new_tokens(10, 5, 100, what="x") == 10
    assert cap_new_tokens(10, 95, 100, what="x") == 5
    assert cap_new_tokens(10, 95, None, what="x") == 10
    with pytest.raises(ValueError, match="shorten the prompt"):
        cap_new_tokens(10, 100, 100, what="MMIG MLLM Describe")


def test_sixty_thousand_character_mumu_prompt_is_cut_with_a_log_line_and_keeps_its_images(vlm, caplog):
    text = "<image1> " + "a man and his dog " * 3334 + "<image2>"
    with caplog.at_level(logging.WARNING, logger="ComfyUI-MMIG"):
        prompt = build_prompt(text, {1: one_image(1), 2: one_image(2)})
    assert len(text) > 60000 and "keeping its first" in caplog.text
    assert len(prompt.text_only) == mm_prompt.MAX_TEXT_CHARS
    assert [s for s in prompt.segments if isinstance(s, int)] == [0, 1]  # both images, in order
    tokens = prompt_inputs(vlm, prompt)["input_ids"].shape[1]
    assert tokens < 2 * vlm.tokens_per_image + mm_prompt.MAX_TEXT_CHARS // 2
    short = build_prompt("<image1> a man", {1: one_image(1)})
    assert short.segments == (0, " a man")  # a normal prompt is untouched


# --- item 9: DiffRIR tiles below the working minimum ----------------------------------------------------

def test_diffrir_tile_below_the_minimum_is_an_error_naming_tile_size(tiny_models):
    from devtools.tiny_models import TINY_DIFFRIR
    from mmig_core.diffrir import load_diffrir
    from mmig_core.diffrir.restore import DiffRIRInputError, restore_images
    model = load_diffrir(tiny_models / TINY_DIFFRIR)
    images, reference, mask = torch.rand(1, 64, 64, 3), torch.rand(1, 64, 64, 3), torch.zeros(1, 64, 64)
    started = time.monotonic()
    for tile in (1, 31, -5):
        with pytest.raises(DiffRIRInputError, match=f"tile_size {tile} is below DiffRIR's working minimum"):
            restore_images(model, images, reference, mask, tile=tile)
    assert time.monotonic() - started < 1
    minimum = model.config.multiple
    assert restore_images(model, images, reference, mask, tile=minimum, overlap=8).shape == (1, 64, 64, 3)


# --- hang and crash -------------------------------------------------------------------------------------

def test_history_without_a_role_first_is_the_users_turn():
    assert parse_history("what is in the picture?") == [("user", "what is in the picture?")]
    assert parse_history("a question\non two lines\nAssistant: an answer\nUser: more") == [
        ("user", "a question\non two lines"), ("assistant", "an answer"), ("user", "more")]
    assert parse_history("") == [] and parse_history("\n  \n") == []


def test_describe_reads_a_history_without_user_first(vlm):
    prompt = build_prompt("<image1> and now?", {1: one_image()})
    response, _ = describe(vlm, prompt, history="hello there\nAssistant: hi", max_new_tokens=3)
    assert isinstance(response, str)


def test_blip2_folder_loaded_as_a_vlm_names_the_family_and_the_blip2_loader(tiny_models):
    with pytest.raises(ModelFilesError) as info:
        load_vlm(tiny_models / TINY_BLIP2)
    message = str(info.value)
    assert "BLIP-2 captioner" in message and "MMIG BLIP-2 Loader" in message and TINY_BLIP2.split("/")[-1] in message


def test_chat_template_the_sandbox_refuses_names_the_folder_and_the_template(tiny_models, tmp_path):
    folder = tmp_path / "bad-template-vlm"
    shutil.copytree(tiny_models / TINY_IDEFICS2, folder)
    (folder / "chat_template.jinja").write_text("{{ cycler.__init__.__globals__.os.system('echo pwned') }}")
    bad = load_vlm(folder, image_resolution=0)
    prompt = build_prompt("<image1> describe it", {1: one_image()})
    with pytest.raises(ModelFilesError) as info:
        describe(bad, prompt, max_new_tokens=2)
    message = str(info.value)
    assert "SecurityError" in message and "chat_template" in message and str(folder) in message


# --- items 5 and 7: through the pack's node helpers, in-process with the host's folder_paths ------------

@pytest.fixture
def host_modules(tmp_path, monkeypatch):
    from devtools import tiny_sdxl
    from devtools.pack import import_pack_module as pack_module
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import folder_paths
    host_helpers, lora_nodes = pack_module("nodes._host"), pack_module("nodes.lora")
    output = tmp_path / "output"
    output.mkdir()
    monkeypatch.setattr(folder_paths, "output_directory", str(output))
    return folder_paths, host_helpers, lora_nodes, output


def test_text_files_never_overwrite_and_escaping_prefixes_are_refused(host_modules, monkeypatch):
    folder_paths, host_helpers, _, output = host_modules
    first = host_helpers.save_text_file("one", "captions/cap")
    second = host_helpers.save_text_file("two", "captions/cap")
    assert (first["filename"], second["filename"]) == ("cap_00001_.txt", "cap_00002_.txt")
    assert (output / "captions" / "cap_00001_.txt").read_text() == "one\n"
    # A name taken after the host counted (another writer) moves to the next counter instead of overwriting.
    (output / "captions" / "cap_00003_.txt").write_text("someone else's\n")
    real = folder_paths.get_save_image_path
    monkeypatch.setattr(folder_paths, "get_save_image_path",
                        lambda prefix, out, *a: (*real(prefix, out, *a)[:2], 3, *real(prefix, out, *a)[3:]))
    third = host_helpers.save_text_file("three", "captions/cap")
    assert third["filename"] == "cap_00004_.txt"
    assert (output / "captions" / "cap_00003_.txt").read_text() == "someone else's\n"
    monkeypatch.setattr(folder_paths, "get_save_image_path", real)
    for prefix in ("captions/..", "..", ".", "captions/", "../outside", "a/../../outside", "/tmp/abs", "a/./.."):
        with pytest.raises(ValueError, match="filename_prefix"):
            host_helpers.save_text_file("x", prefix)
    assert not (output.parent / "outside_00001_.txt").exists()
    assert host_helpers.save_text_file("ok", "a/../b")["filename"] == "b_00001_.txt"  # stays inside: normalised


def test_bundle_names_outside_models_mmig_are_refused_and_symlinks_inside_work(host_modules, tiny_models, tmp_path,
                                                                              monkeypatch):
    folder_paths, _, lora_nodes, _ = host_modules
    models = tmp_path / "models"
    (models / "mmig").mkdir(parents=True)
    (models / "input").mkdir()
    shutil.copytree(tiny_models / TINY_MUMU_BUNDLE, models / "mmig" / "real-bundle")
    shutil.copytree(tiny_models / TINY_MUMU_BUNDLE, models / "input" / "uploaded")
    elsewhere = tmp_path / "elsewhere" / "linked-bundle"
    shutil.copytree(tiny_models / TINY_MUMU_BUNDLE, elsewhere)
    (models / "mmig" / "linked-bundle").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "mmig", ([str(models / "mmig")], set()))

    assert lora_nodes.bundle_names() == ["linked-bundle", "real-bundle"]
    assert lora_nodes.find_bundle("real-bundle") == str(models / "mmig" / "real-bundle")
    assert lora_nodes.find_bundle("linked-bundle") == str(models / "mmig" / "linked-bundle")
    for name in (str(models / "input" / "uploaded"), "../input/uploaded", "../../input/uploaded",
                 "../mmig/real-bundle", "./real-bundle", "real-bundle/.", "..", ".", "", "sub/real-bundle",
                 "..\\input\\uploaded"):
        assert lora_nodes.find_bundle(name) is None, name
        message = lora_nodes.MMIG_MUMULoader.VALIDATE_INPUTS(bundle_name=name)  # by name, as the host calls it
        assert isinstance(message, str) and "bundle_name" in message and "no '..'" in message
    assert lora_nodes.MMIG_MUMULoader.VALIDATE_INPUTS(bundle_name="real-bundle") is True
