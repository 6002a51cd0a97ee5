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


def test_llmga_checkpoints_are_detected_from_config_or_name():
    from mmig_core.llmga_tags import is_llmga, resolve_prompt_style
    llava = {"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
             "mm_projector_type": "mlp2x_gelu"}
    assert is_llmga(llava) and is_llmga({"model_type": "llava_Qwen2"})
    assert is_llmga({"model_type": "llama", "mm_vision_tower": "x", "mm_projector_type": "linear"})
    assert is_llmga({"model_type": "idefics2"}, "llmga-idefics2-finetune")
    assert not is_llmga({"model_type": "idefics2"}, "idefics2-8b")
    assert resolve_prompt_style("auto", {"model_type": "idefics2"}, "idefics2-8b") == "pack"
    assert resolve_prompt_style("auto", llava, "any") == "llmga"
    assert resolve_prompt_style("pack", llava) == "pack" and resolve_prompt_style("llmga", {}) == "llmga"
    with pytest.raises(ValueError, match="auto, llmga, pack"):
        resolve_prompt_style("llava", {})
