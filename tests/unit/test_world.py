"""The scene world (devtools/world): deterministic scenes, and a scorer that reads its own renders back exactly
and refuses images that do not match."""
import numpy as np
import pytest

from devtools.world import COLOURS, SHAPES, Scene, WorldObject, caption, dataset, render, sample_scene
from devtools.world.score import caption_matches, detect, masked_psnr, names_objects, parse_caption, score


def test_scenes_are_deterministic_and_round_trip_as_data():
    assert sample_scene(7) == sample_scene(7)
    assert sample_scene(7) != sample_scene(8)
    assert Scene.from_dict(sample_scene(7).to_dict()) == sample_scene(7)
    one, _ = render(sample_scene(11))
    two, _ = render(sample_scene(11))
    assert one.shape == (128, 128, 3) and one.dtype == np.uint8 and np.array_equal(one, two)


def test_the_scorer_reads_every_render_back_exactly():
    for scene, image, masks, text in dataset(range(60)):
        assert len(masks) == len(scene.objects) and all(m.sum() > 300 for m in masks)
        assert score(image, text)["exact"], (text, detect(image))
        assert score(image, scene)["exact"]
        assert caption_matches(text, scene)


def test_every_shape_and_colour_is_told_apart():
    for colour in COLOURS:
        for shape in SHAPES:
            scene = Scene((WorldObject(shape, colour, 64, 64, 34),), "grey")
            found = detect(render(scene)[0])
            assert [(d.colour, d.shape) for d in found] == [(colour, shape)], found


def test_the_scorer_refuses_wrong_images():
    scene = Scene((WorldObject("circle", "red", 40, 64, 36), WorldObject("square", "blue", 95, 64, 36)), "grey")
    image, masks = render(scene)
    text = caption(scene)
    assert text == "a red circle and a blue square on a grey background"
    blank = np.full_like(image, 128)
    assert score(blank, text) == {"present": 0.0, "colours_present": 0.0, "all_present": False,
                                  "exact": False, "extra": [], "background": True}
    assert not score(np.full_like(image, 235), text)["background"]  # white, not grey
    two_tone = render(Scene(scene.objects, "black", "white"))[0]
    assert score(two_tone, "a red circle on a black and white background")["background"]
    assert not score(two_tone, "a red circle on a white and black background")["background"]
    recoloured = image.copy()
    recoloured[masks[0]] = COLOURS["green"]
    result = score(recoloured, text)
    assert result["present"] == 0.5 and not result["all_present"] and result["extra"] == ["green"]
    wrong_shape = render(Scene((WorldObject("triangle", "red", 40, 64, 36), scene.objects[1]), "grey"))[0]
    assert score(wrong_shape, text)["colours_present"] == 1.0 and score(wrong_shape, text)["present"] == 0.5
    assert not caption_matches("a red circle on a grey background", scene)
    assert names_objects("I see a blue square and a red circle.", scene)
    assert not names_objects("a red circle", scene)
    with pytest.raises(ValueError, match="no world object"):
        score(image, "a picture")


def test_caption_parsing_and_masked_psnr():
    assert parse_caption("An orange triangle, a red circle and a cyan square on a black and white background") == (
        [("orange", "triangle"), ("red", "circle"), ("cyan", "square")], ("black", "white"))
    image, masks = render(sample_scene(5))
    other = image.copy()
    other[masks[0]] = 0
    outside = ~masks[0]
    assert masked_psnr(image, other, outside) == float("inf")
    assert masked_psnr(image, other, masks[0]) < 20
    with pytest.raises(ValueError, match="selects no pixel"):
        masked_psnr(image, other, np.zeros_like(outside))
