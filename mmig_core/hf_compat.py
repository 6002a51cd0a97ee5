"""Which transformers the pack runs on, and the few places where the versions' APIs differ.

The pack supports transformers from `MIN_TRANSFORMERS` (the oldest release the VLM and BLIP-2 tests pass
with; requirements.txt and pyproject.toml say the same, a unit test keeps them equal) to the newest 5.x.
`make test-transformers` runs those tests at the floor, at 4.57 (the last 4.x) and at the newest 5.x.
Every version branch of the pack lives here, so a later floor bump deletes code in one file.
transformers is imported inside the functions: importing this module stays cheap.
"""
from __future__ import annotations

from functools import lru_cache

from .model_files import ModelFilesError

# The oldest transformers the pack's VLM and BLIP-2 code paths pass their tests with (`make test-transformers`).
# 4.46 passes them too, but reads a chat template only from chat_template.json / tokenizer_config.json: the
# chat_template.jinja that newer transformers write (and hub folders ship) is ignored there, and a VLM would run
# without its template. Before 4.46 AutoModelForImageTextToText is missing.
MIN_TRANSFORMERS = "4.47.0"

# model_type -> the first transformers release (major.minor) whose AutoModelForImageTextToText maps it: read from
# modeling_auto.py's MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES in the last patch release of every minor from 4.45
# to 5.24 (tests/unit/test_hf_compat.py checks it against the installed release). Types already there in 4.46-4.47 need
# only the floor and are left out. ("pixtral" left that mapping in 5.6: Pixtral checkpoints are "llava" folders.)
FAMILY_MIN_TRANSFORMERS = {
    "aria": "4.48", "emu3": "4.48",
    "got_ocr2": "4.49", "qwen2_5_vl": "4.49",
    "aya_vision": "4.50", "gemma3": "4.50", "mistral3": "4.50", "shieldgemma2": "4.50", "smolvlm": "4.50",
    "llama4": "4.51",
    "internvl": "4.52", "janus": "4.52", "llava_next_video": "4.52",
    "gemma3n": "4.53", "glm4v": "4.53",
    "deepseek_vl": "4.54", "deepseek_vl_hybrid": "4.54", "evolla": "4.54", "perception_lm": "4.54",
    "cohere2_vision": "4.55",
    "florence2": "4.56", "glm4v_moe": "4.56", "kosmos-2.5": "4.56", "ovis2": "4.56",
    "lfm2_vl": "4.57", "qwen3_vl": "4.57", "qwen3_vl_moe": "4.57",
    "ernie4_5_vl_moe": "5.0", "fast_vlm": "5.0", "glm46v": "5.0", "instructblipvideo": "5.0", "lighton_ocr": "5.0",
    "paddleocr_vl": "5.0", "t5gemma2": "5.0", "video_llama_3": "5.0", "video_llava": "5.0",
    "glm_ocr": "5.1",
    "qwen3_5": "5.2", "qwen3_5_moe": "5.2",
    "mistral4": "5.4", "pi0": "5.4", "pp_chart2table": "5.4",
    "gemma4": "5.5",
    "qianfan_ocr": "5.6", "qwen2_5_omni_thinker": "5.6", "qwen3_omni_moe_thinker": "5.6",
    "minicpmv4_6": "5.7",
    "exaone4_5": "5.8", "granite4_vision": "5.8", "pp_formulanet": "5.8",
    "deepseek_ocr2": "5.10", "gemma4_unified": "5.10", "glmga": "5.10",
    "cosmos3_omni": "5.11", "diffusion_gemma": "5.11",
    "minimax_m3_vl": "5.12",
    "hunyuan_vl": "5.13", "kimi_k25": "5.13",
    "inkling_mm_model": "5.14",
    "cosmos3_edge": "5.15", "muse_glimmer": "5.15",
    "cohere_compass": "5.16", "glm5_next": "5.16", "qwen4_exp": "5.16", "step3p7": "5.16",
    "hyperclovax_vision_v2": "5.18", "minicpmv4_7": "5.18", "nemotron_h_omni": "5.18",
    "molmo2": "5.20", "muse_spark": "5.20", "unlimited_ocr": "5.20",
    "minicpm_ocr": "5.21",
    "mistral_large4": "5.22",
    "dots3_note": "5.23", "granite_docling": "5.23", "inkling2": "5.23", "lfm3_vl": "5.23",
    "apertus1p5": "5.24", "hy_v4_vl": "5.24", "inkling2_loop": "5.24",
}
# How users know the families the pack is tested with (the rest are named by their model_type).
FAMILY_NAMES = {
    "idefics2": "Idefics2", "idefics3": "Idefics3", "smolvlm": "SmolVLM", "llava": "LLaVA", "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision", "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL",
    "qwen3_vl_moe": "Qwen3-VL-MoE", "gemma3": "Gemma3", "paligemma": "PaliGemma", "mllama": "Mllama",
    "internvl": "InternVL", "mistral3": "Mistral3", "blip-2": "BLIP-2", "florence2": "Florence-2",
}


def _release(version: str) -> tuple[int, ...]:
    """"4.57.6" / "5.0.0rc1" / "4.50.0.dev0" -> (4, 57, 6) / (5, 0, 0) / (4, 50, 0): the numeric release only."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):  # "0rc1": a pre-release of that number; stop there
            break
    return tuple(parts)


@lru_cache(maxsize=1)
def transformers_version() -> str:
    """The installed transformers' version string ("" when transformers is not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("transformers")
    except PackageNotFoundError:
        return ""


def at_least(minimum: str, installed: str | None = None) -> bool:
    """Whether the installed transformers (or `installed`) is `minimum` or newer, by release numbers."""
    have = _release(transformers_version() if installed is None else installed)
    need = _release(minimum)
    width = max(len(have), len(need))
    return have + (0,) * (width - len(have)) >= need + (0,) * (width - len(need))


def _upgrade(minimum: str) -> str:
    return f'pip install -U "transformers>={minimum}" in the Python that runs ComfyUI'


def require_transformers(what: str, minimum: str = MIN_TRANSFORMERS) -> None:
    """Raise a ModelFilesError naming the version needed when the installed transformers is older than `minimum`."""
    installed = transformers_version()
    if not installed:
        raise ModelFilesError(f"{what}: the transformers library (>= {minimum}) is needed and not installed: "
                              f"{_upgrade(minimum)}.")
    if not at_least(minimum, installed):
        raise ModelFilesError(f"{what}: transformers >= {minimum} is needed; this ComfyUI has transformers "
                              f"{installed}. Update it ({_upgrade(minimum)}); the model files are fine.")


def family_requirement(model_type: str, installed: str | None = None) -> str | None:
    """A message naming the family and the transformers it needs when the installed one (or `installed`) is too
    old for `model_type`; None when it is new enough or the type is not in FAMILY_MIN_TRANSFORMERS."""
    model_type = str(model_type or "")
    minimum = FAMILY_MIN_TRANSFORMERS.get(model_type) or FAMILY_MIN_TRANSFORMERS.get(model_type.replace("_", "-"))
    installed = transformers_version() if installed is None else installed
    if minimum is None or at_least(minimum, installed):
        return None
    name = FAMILY_NAMES.get(model_type, model_type)
    return (f"{name} models (model_type '{model_type}') need transformers >= {minimum}; this ComfyUI has "
            f"transformers {installed or 'not installed'}. Update it ({_upgrade(minimum)}); the model files are fine.")


def folder_family_requirement(folder) -> str | None:
    """`family_requirement` for the model_type in `folder`/config.json (None when it cannot be read: the loader's
    own config error then says what is wrong with the file). Read before transformers parses the config, which
    on an older release fails with "does not recognize this architecture"."""
    import json
    from pathlib import Path
    try:
        model_type = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return family_requirement(model_type) if isinstance(model_type, str) else None


def dtype_kwarg() -> str:
    """from_pretrained's dtype argument: transformers 5 names it `dtype`, 4.x `torch_dtype`."""
    return "dtype" if at_least("5") else "torch_dtype"


def token_text(token) -> str:
    """A processor's special token as text: 4.46-4.51 processors (Idefics2's, BLIP-2's) hold an AddedToken."""
    return str(getattr(token, "content", token))


def prompt_images(images: list) -> list:
    """One prompt's images as a processor call takes them: nested (`[images]`, one list per text) from 4.49, whose
    image processors flatten it; a flat list before, where CLIP's and SigLIP's image processors (LLaVA, PaliGemma)
    refuse a nested one. Every processor pairs a flat list with the one text by its image tokens."""
    return [list(images)] if at_least("4.49") else list(images)


def text_only_by_tokenizer(model_type: str) -> bool:
    """Whether a prompt without images goes to the tokenizer itself, not the processor: 4.47's Idefics3 processor
    refuses one (it compares the text's [0] images with the [] given; 4.48 mends it)."""
    return model_type == "idefics3" and not at_least("4.48")


def no_legacy_image_expansion(model) -> None:
    """4.47's LLaVA-family forwards take a prompt with fewer image tokens than config.image_seq_length as an
    unexpanded (legacy) one, and crash on a text-only prompt there; the pack's processors always expand, so the
    guess is turned off (4.48 removed it)."""
    if not at_least("4.48") and hasattr(model.config, "image_seq_length"):
        model.config.image_seq_length = 0


def images_kwargs(**kwargs) -> dict:
    """Image-processor arguments for a processor call, nested as `images_kwargs`: every version routes those to the
    image processor, while a flat argument the processor's typed kwargs do not list (Idefics2's do_image_splitting)
    goes to the tokenizer and raises on 4.46-4.47, and is dropped with a warning from 4.48 to 4.57."""
    return {"images_kwargs": dict(kwargs)} if kwargs else {}
