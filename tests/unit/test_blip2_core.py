"""mmig_core.blip2 on a tiny random-weight BLIP-2 saved to disk like a real one."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.tiny_blip2 import build_tiny_blip2  # noqa: E402
from mmig_core.blip2 import caption_images, load_blip2  # noqa: E402
from mmig_core.model_files import ModelFilesError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return build_tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny-blip2", seed=0)


@pytest.fixture(scope="session")
def captioner(tiny_folder):
    return load_blip2(tiny_folder)


@pytest.fixture
def images():
    return torch.rand(3, 40, 48, 3, generator=torch.Generator().manual_seed(0))


def test_captions_batch_deterministic(captioner, images):
    first = caption_images(captioner, images, max_new_tokens=12)
    assert len(first) == 3
    assert all(isinstance(c, str) and c.strip() for c in first)
    assert caption_images(captioner, images, max_new_tokens=12) == first
    assert captioner.model.training is False


def test_beam_search(captioner, images):
    captions = caption_images(captioner, images[:2], num_beams=2, max_new_tokens=8)
    assert len(captions) == 2 and all(c.strip() for c in captions)


def test_sampling_repeats_with_seed(captioner, images):
    a = caption_images(captioner, images[:2], do_sample=True, seed=7, max_new_tokens=8)
    b = caption_images(captioner, images[:2], do_sample=True, seed=7, max_new_tokens=8)
    assert a == b and all(c.strip() for c in a)
    assert caption_images(captioner, images[:2], do_sample=True, seed=8, max_new_tokens=8) != a


def test_sampling_leaves_global_rng_alone(captioner, images):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    caption_images(captioner, images[:1], do_sample=True, seed=1, max_new_tokens=4)
    assert torch.equal(torch.rand(3), expected)


def test_prompt_is_prefix(captioner, images):
    captions = caption_images(captioner, images[:2], prompt="a photo of", max_new_tokens=6)
    for caption in captions:
        assert caption.startswith("a photo of") and len(caption) > len("a photo of")


def test_typed_image_token_is_removed(captioner, images):
    # Blip2Processor keeps its image token as an AddedToken: str.replace on it raises TypeError, and a typed
    # "<image>" left in the prompt adds an image row the model has no query embeddings for.
    from tokenizers import AddedToken
    from mmig_core.blip2 import image_token_text, strip_image_token
    processor = captioner.processor
    assert isinstance(processor.image_token, (AddedToken, str))  # AddedToken on 4.45+ and 5.x
    assert image_token_text(processor) == "<image>"
    assert strip_image_token(processor, "<image> a photo <image>of") == "a photo of"
    expected = caption_images(captioner, images[:1], prompt="a photo of", max_new_tokens=6)
    assert caption_images(captioner, images[:1], prompt="<image>a photo of", max_new_tokens=6) == expected


def test_channels_and_progress(captioner, images):
    done = []
    rgba = torch.cat([images, torch.ones_like(images[..., :1])], dim=-1)
    assert caption_images(captioner, rgba, on_image_done=done.append, max_new_tokens=6) == \
        caption_images(captioner, images, max_new_tokens=6)
    assert done == [0, 1, 2]
    gray = caption_images(captioner, images[:1, ..., :1], max_new_tokens=6)
    assert len(gray) == 1 and gray[0].strip()


def test_interrupt_stops(captioner, images):
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")

    done = []
    with pytest.raises(KeyboardInterrupt):
        caption_images(captioner, images, check_interrupt=check, on_image_done=done.append, max_new_tokens=4)
    assert done == [0]


def test_bad_batches(captioner):
    with pytest.raises(ValueError, match="empty"):
        caption_images(captioner, torch.zeros(0, 32, 32, 3))
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        caption_images(captioner, torch.zeros(32, 32, 3))
    with pytest.raises(ValueError, match="channels"):
        caption_images(captioner, torch.zeros(1, 3, 32, 32))


def test_works_under_inference_mode(captioner, images):
    expected = caption_images(captioner, images[:1], max_new_tokens=6)
    with torch.inference_mode():
        assert caption_images(captioner, images[:1], max_new_tokens=6) == expected


def test_tokenizer_size(captioner, tiny_folder):
    tok = captioner.processor.tokenizer
    built = json.loads((tiny_folder / "config.json").read_text())
    assert len(tok) == built["text_config"]["vocab_size"] == built["image_token_index"] + 1
    assert len(tok) > 300
    assert tok.convert_tokens_to_ids("<image>") == built["image_token_index"]
    assert tok.bos_token_id == tok.eos_token_id == 2 and tok.pad_token_id == 1
    assert tok.decode(tok("a dog on a beach").input_ids, skip_special_tokens=True) == "a dog on a beach"


def test_tiny_model_small_and_deterministic(tiny_folder, tmp_path):
    size = sum(p.stat().st_size for p in tiny_folder.iterdir())
    assert size < 5_000_000
    again = build_tiny_blip2(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (tiny_folder / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (tiny_folder / "tokenizer.json").read_bytes()


def test_missing_folder(tmp_path):
    folder = tmp_path / "no-such-blip2"
    with pytest.raises(ModelFilesError) as err:
        load_blip2(folder, searched=[str(tmp_path)])
    assert str(folder) in str(err.value) and "config.json" in str(err.value)
    assert "Salesforce/blip2" in str(err.value)


def _copy_config(tiny_folder, dest):
    dest.mkdir()
    for name in os.listdir(tiny_folder):
        if not name.endswith(".safetensors"):
            shutil.copy(tiny_folder / name, dest / name)
    return dest


def test_pickled_weights_refused(tiny_folder, tmp_path):
    folder = _copy_config(tiny_folder, tmp_path / "pickled")
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelFilesError, match="safetensors"):
        load_blip2(folder)


def test_truncated_weights_refused(tiny_folder, tmp_path):
    folder = _copy_config(tiny_folder, tmp_path / "truncated")
    data = (tiny_folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFilesError, match="truncated"):
        load_blip2(folder)
    (folder / "model.safetensors").write_bytes(b"\x80\x04garbage that is no safetensors")
    with pytest.raises(ModelFilesError, match="safetensors"):
        load_blip2(folder)


def test_incomplete_weights_refused(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_config(tiny_folder, tmp_path / "incomplete")
    tensors = load_file(tiny_folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("qformer.")}, folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelFilesError, match="qformer"):
        load_blip2(folder)


def test_missing_tokenizer_is_model_files_error(tiny_folder, tmp_path):
    folder = _copy_config(tiny_folder, tmp_path / "no-tokenizer")
    shutil.copy(tiny_folder / "model.safetensors", folder / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json"):  # which of them exist depends on the transformers version
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelFilesError) as err:  # offline, transformers would load an empty tokenizer
        load_blip2(folder)
    assert str(folder) in str(err.value) and "tokenizer" in str(err.value)


def test_import_is_cheap():
    code = "import sys, mmig_core.blip2; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
