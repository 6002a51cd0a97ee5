"""LLMGA generation-prompt extraction with both tag spellings (mmig_core.llmga_tags)."""
import pytest

from mmig_core.llmga_tags import extract_generation_prompt, strip_tags


@pytest.mark.parametrize("response, expected", [
    ("Sure! <gen_img>a red fox in the snow</gen_img> Enjoy.", "a red fox in the snow"),        # the paper's
    ("Here: <gen_image> a red fox,\n detailed fur </gen_image>", "a red fox, detailed fur"),   # the code's
    ("<GEN_IMAGE>Upper case</GEN_IMAGE>", "Upper case"),
    ("<gen_img>mixed spellings</gen_image>", "mixed spellings"),
    ("<gen_img>first</gen_img> and <gen_img>second</gen_img>", "first"),                     # repeated
    ("<gen_img>outer <gen_image>inner</gen_image> rest</gen_img>", "outer inner rest"),       # nested
    ("</gen_img>stray close <gen_img>kept</gen_img>", "kept"),
])
def test_extracts_the_first_complete_block(response, expected):
    assert extract_generation_prompt(response) == expected


@pytest.mark.parametrize("response", ["no tags at all", "<gen_img>never closed", "<gen_img>a <gen_img>b</gen_img>"])
def test_missing_or_unbalanced_tags_give_none(response):
    assert extract_generation_prompt(response) is None


def test_strip_tags_keeps_the_words():
    assert strip_tags("<gen_img>never closed  text") == "never closed text"
