"""Placeholder parsing of interleaved text-and-image prompts (mmig_core.mm_prompt)."""
import pytest
import torch

from mmig_core.mm_prompt import PromptError, build_prompt, cut_out


def image(h=20, w=30, value=0.5):
    return torch.full((1, h, w, 3), value)


def test_numbered_placeholders_keep_text_and_order():
    p = build_prompt("a <image1> man and his <image2> dog", {1: image(value=0.1), 2: image(value=0.9)})
    assert p.segments == ("a ", 0, " man and his ", 1, " dog")
    assert [float(i.mean()) for i in p.images] == pytest.approx([0.1, 0.9])
    assert p.text_only == "a  man and his  dog"


def test_numbers_may_come_in_any_order_and_repeat():
    p = build_prompt("<image2> next to <image1>, and <image2> again", {1: image(value=0.1), 2: image(value=0.9)})
    assert p.segments == (0, " next to ", 1, ", and ", 0, " again")
    assert float(p.images[0].mean()) == pytest.approx(0.9)  # images in order of first mention
    assert p.image_count() == 3


def test_bare_placeholders_take_connected_images_in_order():
    p = build_prompt("<image> meets <image>", {1: image(value=0.2), 3: image(value=0.7)})
    assert p.segments == (0, " meets ", 1)
    assert [float(i.mean()) for i in p.images] == pytest.approx([0.2, 0.7])


def test_text_only_prompt_is_valid():
    p = build_prompt("a watercolour lighthouse", {})
    assert p.segments == ("a watercolour lighthouse",) and p.images == ()


@pytest.mark.parametrize("text, images, message", [
    ("   ", {}, "prompt is empty"),
    ("a <image1> and <image2>", {1: image()}, "<image2> but that input is not connected"),
    ("a <image1>", {1: image(), 2: image()}, "image2 is connected but the prompt has no <image2>"),
    ("<image> and <image1>", {1: image()}, "mixes numbered"),
    ("<image> and <image>", {1: image()}, "2 <image> placeholder(s) but 1 image(s)"),
    ("<image1>", {1: torch.rand(2, 8, 8, 3)}, "batch of 2 images"),
])
def test_bad_prompts_say_what_to_fix(text, images, message):
    with pytest.raises(PromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_prompt(text, images)


def test_mask_cuts_object_out_and_is_resized():
    mask = torch.zeros(1, 10, 15)
    mask[:, :, :5] = 1  # left third of the image is the object
    p = build_prompt("<image1>", {1: image(20, 30, 0.8)}, {1: mask})
    cut = p.images[0]
    assert cut.shape == (20, 30, 3)
    assert torch.allclose(cut[:, :8], torch.full_like(cut[:, :8], 0.8))
    assert float(cut[:, 12:].abs().max()) == 0.0  # background blackened


def test_mask_without_image_or_empty_mask_is_refused():
    with pytest.raises(PromptError, match="mask2 is connected but image2 is not"):
        build_prompt("<image1>", {1: image()}, {2: torch.ones(1, 4, 4)})
    with pytest.raises(PromptError, match="empty"):
        cut_out(image()[0], torch.zeros(1, 20, 30))
