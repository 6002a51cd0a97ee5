"""MUMU's train-time prompt rules (§5), checked statistically over many per-sample seeds."""
import numpy
import pytest
import torch

from mmig_core.control_images import canny_image, sketch_image
from training.mumu_prompts import Crop, PromptRules, augment_image, sample_prompt

DRAWS = 2000
CAPTION = "a man with a dog, a hat and a ball near a tree"
WORDS = ("man", "dog", "hat", "ball", "tree")


def crops(labels=("person", "dog", "hat", "ball", "tree")):
    generator = torch.Generator().manual_seed(0)
    return [Crop(torch.rand(10 + 3 * i, 14 + 2 * i, 3, generator=generator), CAPTION.index(word), label)
            for i, (word, label) in enumerate(zip(WORDS, labels))]


IMAGE = torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(1))


def render(image, kind):
    return {"canny": canny_image, "sketch": sketch_image}[kind](image)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny ops: two threads on cores shared with other test runs wait on each other at every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def draw(rules, seed, record_crops=None, make_control=render):
    return sample_prompt(CAPTION, IMAGE, crops() if record_crops is None else record_crops, rules,
                         torch.Generator().manual_seed(seed), make_control)


def test_stage1_rates_and_limits_over_2000_draws():
    rules = PromptRules(stage=1)
    draws = [draw(rules, seed, make_control=lambda image, kind: image) for seed in range(DRAWS)]  # rates only
    control = [d.control_kind for d in draws]
    rate = sum(k is not None for k in control) / DRAWS
    assert abs(rate - 0.30) < 0.03, rate
    assert {k for k in control if k} == {"canny", "sketch"}
    assert abs(control.count("canny") - control.count("sketch")) < 0.25 * sum(k is not None for k in control)
    counts = [d.prompt.image_count() for d in draws]
    assert max(counts) == 4 and min(counts) == 3  # 3 objects always (5 available), +1 control image 30 % of the time
    for d in draws:
        objects = [label for label in d.labels if label not in ("canny", "sketch")]
        assert len(objects) <= 3 and len(d.prompt.images) == d.prompt.image_count() == len(d.augmented)
    augmented = [a for d in draws for a in d.augmented]
    assert abs(sum(augmented) / len(augmented) - 0.20) < 0.02, sum(augmented) / len(augmented)


def test_crops_go_before_their_words_and_the_control_image_first():
    rules = PromptRules(stage=1, control_probability=1.0, augment_probability=0.0)
    d = draw(rules, 3)
    segments = d.prompt.segments
    assert segments[0] == 0 and d.labels[0] in ("canny", "sketch")
    for position, segment in enumerate(segments):
        if isinstance(segment, int) and segment > 0:
            word = {"person": "man"}.get(d.labels[segment], d.labels[segment])
            assert segments[position + 1].lstrip().startswith(word)
            assert torch.equal(d.prompt.images[segment], next(c.image for c in crops() if c.label == d.labels[segment]))
    assert d.prompt.text_only.split() == CAPTION.split()  # the caption itself is kept, word for word


def test_stage2_is_a_single_person_or_head_crop_without_control_images():
    rules = PromptRules(stage=2)
    labels = ("person", "dog", "head", "ball", "tree")
    seen = set()
    for seed in range(300):
        d = draw(rules, seed, crops(labels))
        assert d.prompt.image_count() == 1 and d.control_kind is None
        seen.add(d.labels[0])
    assert seen == {"person", "head"}
    assert draw(rules, 0, crops(("dog", "hat", "ball", "tree", "cat"))).prompt.image_count() == 0


def test_same_seed_same_prompt_other_seed_other_draws():
    rules = PromptRules(stage=1, augment_probability=0.5, control_probability=0.5)
    a, b = draw(rules, 42), draw(rules, 42)
    assert a.prompt.segments == b.prompt.segments and a.augmented == b.augmented
    assert all(torch.equal(x, y) for x, y in zip(a.prompt.images, b.prompt.images))
    others = {(tuple(d.augmented), d.control_kind) for d in (draw(rules, s, make_control=lambda image, kind: image)
                                                            for s in range(20))}
    assert len(others) > 3


def test_augmentations_crop_flip_add_noise_and_grayscale():
    rules = PromptRules(op_probability=0.5)
    image = torch.rand(30, 40, 3, generator=torch.Generator().manual_seed(5))
    grays = noisy = smaller = 0
    for seed in range(400):
        out = augment_image(image, rules, torch.Generator().manual_seed(seed))
        h, w = out.shape[:2]
        assert 0.6 * 30 - 1 <= h <= 30 and 0.6 * 40 - 1 <= w <= 40 and out.min() >= 0 and out.max() <= 1
        smaller += (h, w) != (30, 40)
        grays += bool(torch.equal(out[..., 0], out[..., 1]) and torch.equal(out[..., 1], out[..., 2]))
        # a crop of the original, possibly flipped: noise is what no sub-window explains
        noisy += not any(torch.equal(out, v) or torch.equal(out, v.flip(1))
                         for v in [image[t:t + h, l:l + w] for t in range(31 - h) for l in range(41 - w)]
                         ) and not torch.equal(out[..., 0], out[..., 1])
    assert smaller > 360
    assert abs(grays / 400 - 0.5) < 0.1
    assert abs(noisy / 400 - 0.25) < 0.08  # noise without grayscale: 0.5 * 0.5


def test_the_vlm_reads_every_conditioning_image_as_a_black_padded_square(tiny_models):
    from devtools.tiny_models import TINY_IDEFICS2
    from mmig_core.vlm import load_vlm, prompt_inputs, prompt_text_and_images
    vlm = load_vlm(tiny_models / TINY_IDEFICS2, drop_perceiver=True, image_resolution=32)
    rules = PromptRules(stage=1, control_probability=1.0, augment_probability=1.0)
    d = draw(rules, 7)
    _text, pil_images = prompt_text_and_images(vlm, d.prompt)
    assert len(pil_images) == 4
    for image, pil in zip(d.prompt.images, pil_images):
        assert pil.width == pil.height == max(image.shape[:2])
        h, w = image.shape[:2]
        pixels = torch.from_numpy(numpy.asarray(pil, dtype=numpy.float32))
        top, left = (pil.height - h) // 2, (pil.width - w) // 2
        border = torch.ones(pil.height, pil.width, dtype=torch.bool)
        border[top:top + h, left:left + w] = False
        assert border.any() and pixels[border].abs().max() == 0  # black padding
    pixel_values = prompt_inputs(vlm, d.prompt)["pixel_values"]
    assert pixel_values.shape[1:] == (4, 3, 32, 32)


def test_rules_reject_bad_values():
    with pytest.raises(ValueError, match="stage"):
        PromptRules(stage=3)
    with pytest.raises(ValueError, match="augment_probability"):
        PromptRules(augment_probability=1.5)


def test_control_images_trace_the_edges_of_the_whole_input():
    from mmig_core.control_images import control_image
    image = torch.zeros(32, 40, 3)
    image[8:24, 10:30] = torch.tensor([0.9, 0.4, 0.1])  # one block: its outline is the only edge
    canny, sketch = canny_image(image), sketch_image(image)
    assert canny.shape == sketch.shape == image.shape
    inside, outside = (slice(12, 20), slice(14, 26)), (slice(0, 4), slice(0, 6))
    assert canny[8:24, 9:11].max() == 1 and canny[inside].max() == 0 and canny[outside].max() == 0
    assert sketch[8:24, 9:11].min() < 0.5 and sketch[inside].min() > 0.99 and sketch[outside].min() > 0.99
    with pytest.raises(ValueError, match="depth model"):
        control_image(image, "depth")
    with pytest.raises(ValueError, match="unknown control image kind"):
        control_image(image, "pencil")


def test_depth_control_images_come_from_a_local_depth_model(tmp_path):
    """A tiny random Depth Anything saved with save_pretrained, read back through load_depth_model."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    from mmig_core.control_images import control_image, load_depth_model
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            image_size=28, patch_size=14, out_features=["stage1", "stage2"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 16],
                                 reassemble_factors=[2, 1], fusion_hidden_size=8, head_hidden_size=8)
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(tmp_path / "depth")
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False).save_pretrained(tmp_path / "depth")
    depth = control_image(IMAGE, "depth", load_depth_model(tmp_path / "depth"))
    assert depth.shape == IMAGE.shape and depth.min() >= 0 and depth.max() <= 1
    assert torch.equal(depth[..., 0], depth[..., 2])  # one channel, repeated
    with pytest.raises(Exception, match="no config.json"):
        load_depth_model(tmp_path)
