"""The VLM loader's image geometry and token counts at the real image sizes, from the published configs
(data/idefics2-8b, data/qwen2.5-vl-3b-instruct, data/blip2-opt-2.7b):

- `image_plan` on each published config + image processor, at the sizes users ask for (MUMU's 448 px, the towers'
  own, beyond their limits), and the image tokens the processor then really writes (`measure_tokens_per_image`,
  over the real image processor; the tokenizer is the tiny one, with the real image tokens);
- `load_vlm` on folders of the published configs with one layer per stack and a small vocabulary, real widths
  elsewhere (Idefics2: the 1152-wide, 980 px SigLIP tower with MUMU's perceiver bypass; Qwen2.5-VL: the whole
  model, 1280-wide vision into the 2048-wide decoder), encoding a 448 px image: the token counts and e_llm's width;
- BLIP-2 OPT-2.7b's caption length budget (32 query tokens in 2048 positions), from its config."""
from __future__ import annotations

import copy
import types

import pytest
import torch
from realshape_helpers import DATA, load_json

from mmig_core import vlm as core
from mmig_core.mm_prompt import build_prompt

IDEFICS2 = load_json("idefics2-8b/config.json")
IDEFICS2_IMAGES = load_json("idefics2-8b/preprocessor_config.json")
QWEN = load_json("qwen2.5-vl-3b-instruct/config.json")
QWEN_IMAGES = load_json("qwen2.5-vl-3b-instruct/preprocessor_config.json")
BLIP2 = load_json("blip2-opt-2.7b/config.json")


def _image_processor(cls_name: str, facts: dict):
    import transformers
    kwargs = {k: v for k, v in facts.items() if k not in ("image_processor_type", "processor_class")}
    return getattr(transformers, cls_name)(**kwargs)


def idefics2_config(**changes):
    from transformers import Idefics2Config
    raw = copy.deepcopy(IDEFICS2)
    for part, values in changes.items():
        raw[part].update(values)
    return Idefics2Config(**{k: v for k, v in raw.items() if k != "architectures"})


def qwen_config(**changes):
    import transformers
    if not hasattr(transformers, "Qwen2_5_VLConfig"):
        pytest.skip("Qwen2.5-VL needs transformers >= 4.49")
    raw = copy.deepcopy(QWEN)
    vision = {**raw.pop("vision_config"), **changes.pop("vision_config", {})}
    text = {k: raw.pop(k) for k in list(raw) if k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "max_position_embeddings", "rms_norm_eps", "rope_theta", "sliding_window", "use_sliding_window",
        "max_window_layers", "hidden_act", "vocab_size", "rope_scaling", "attention_dropout")}
    text.update(changes.pop("text_config", {}))
    ids = {k: v for k, v in raw.items() if k.endswith("_token_id")}
    from devtools.tiny_vlm_families import qwen2_vl
    return qwen2_vl.make_config(transformers.Qwen2_5_VLConfig, vision, text, ids)


# --- the plan on the published configs ------------------------------------------------------------------------

@pytest.mark.parametrize("requested, side", [(448, 448), (0, 980), (980, 980), (1000, 980), (500, 490), (10, 14)])
def test_idefics2_8b_images_are_square_whole_patches_at_most_the_towers_980(requested, side):
    plan = core.image_plan(idefics2_config(), _image_processor("Idefics2ImageProcessor", IDEFICS2_IMAGES), requested)
    assert (plan.mode, plan.resolution) == ("square", side)
    assert plan.kwargs == {"size": {"height": side, "width": side}, "do_image_splitting": False}


@pytest.mark.parametrize("requested, side", [(448, 448), (1024, 1008), (5000, 3584), (30, 56)])
def test_qwen2_5_vl_3b_images_fit_its_pixel_budget_in_whole_merged_patches(requested, side):
    processor = _image_processor("Qwen2VLImageProcessor", QWEN_IMAGES)
    plan = core.image_plan(qwen_config(), processor, requested)
    # the published budget: 3136 .. 12845056 px (56x56 .. 3584x3584), 28 px per token (14 px patches, 2x2 merged)
    assert (plan.mode, plan.resolution) == ("pixel budget", side)
    assert plan.kwargs == {"size": {"shortest_edge": side * side, "longest_edge": side * side}}
    assert plan.note.startswith(f"{side}x{side} px ({(side // 28) ** 2} tokens), budget 56..3584")


def _counting_vlm(config, processor, plan, placeholder, image_token, perceiver_dropped=False):
    """What measure_tokens_per_image reads of a loaded VLM, without weights: the config (its image token id set to
    the tiny tokenizer's) and the processor."""
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    return core.VLM(model=types.SimpleNamespace(config=config), processor=processor, model_type=config.model_type,
                    image_resolution=plan.resolution, tokens_per_image=0, perceiver_dropped=perceiver_dropped,
                    images=plan, placeholder=placeholder)


@pytest.mark.parametrize("requested, drop, tokens", [(448, True, 1024), (980, True, 4900), (448, False, 64)])
def test_idefics2_8b_tokens_per_image_at_the_real_sizes(requested, drop, tokens):
    from transformers import Idefics2Processor

    from devtools.tiny_idefics2 import CHAT_TEMPLATE, build_tokenizer
    config = idefics2_config()
    image_processor = _image_processor("Idefics2ImageProcessor", IDEFICS2_IMAGES)
    plan = core.image_plan(config, image_processor, requested)
    seq = (plan.resolution // config.vision_config.patch_size) ** 2 if drop else \
        load_json("idefics2-8b/processor_config.json")["image_seq_len"]  # what load_vlm tells the processor
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=build_tokenizer(), image_seq_len=seq,
                                  chat_template=CHAT_TEMPLATE)
    vlm = _counting_vlm(config, processor, plan, "<image>", "<image>", drop)
    assert core.measure_tokens_per_image(vlm) == tokens


@pytest.mark.parametrize("requested, tokens", [(448, 256), (1024, 1296), (5000, 16384)])
def test_qwen2_5_vl_3b_tokens_per_image_at_the_real_sizes(requested, tokens):
    import transformers

    from devtools.tiny_vlm_families import qwen2_vl
    config = qwen_config()
    image_processor = _image_processor("Qwen2VLImageProcessor", QWEN_IMAGES)
    plan = core.image_plan(config, image_processor, requested)
    processor = transformers.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=qwen2_vl.tokenizer(),
                                                 chat_template=qwen2_vl.CHAT_TEMPLATE,
                                                 **qwen2_vl.video_processor_kwargs("Qwen2VLVideoProcessor"))
    vlm = _counting_vlm(config, processor, plan, "<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>")
    assert core.measure_tokens_per_image(vlm) == tokens


# --- load_vlm on the published configs, one layer per stack -----------------------------------------------------

def _save(model, processor, folder, tok):
    from devtools.tiny_vlm_families import _common
    _common.random_init(model, tok, seed=0, std=0.02)
    return _common.save(model, processor, folder)


def _encode(vlm, side=448):
    image = torch.rand(side, side, 3, generator=torch.Generator().manual_seed(0))
    prompt = build_prompt("a <image1> on a table", {1: image})
    return core.encode_prompts(vlm, [prompt])


def test_idefics2_8b_loads_with_the_real_vision_tower_and_mumu_gives_1024_tokens_at_448(tmp_path):
    from transformers import Idefics2ForConditionalGeneration, Idefics2Processor

    from devtools.tiny_idefics2 import CHAT_TEMPLATE, build_tokenizer
    tok = build_tokenizer()
    # Real: the vision tower's 1152 width, 980 px and 14 px patches. Shrunk: one layer per stack, the text width
    # (the perceiver's MLP alone is 4 x 4096^2 x 3 at the real one) and the vocabulary (the tiny tokenizer).
    config = idefics2_config(
        vision_config=dict(num_hidden_layers=1),
        perceiver_config=dict(resampler_depth=1, resampler_n_heads=2, resampler_head_dim=32, num_key_value_heads=1),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tok)))
    config.image_token_id = tok.convert_tokens_to_ids("<image>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Idefics2ForConditionalGeneration(config).eval()
    processor = Idefics2Processor(image_processor=_image_processor("Idefics2ImageProcessor", IDEFICS2_IMAGES),
                                  tokenizer=tok, image_seq_len=64, chat_template=CHAT_TEMPLATE)
    folder = _save(model, processor, tmp_path / "idefics2-8b-1layer", tok)
    del model
    vlm = core.load_vlm(folder, drop_perceiver=True, image_resolution=448)
    assert vlm.model.config.vision_config.hidden_size == 1152 and vlm.model.config.vision_config.image_size == 980
    assert (vlm.image_resolution, vlm.tokens_per_image) == (448, 1024)
    embeds = _encode(vlm)
    image_tokens = int((core.prompt_inputs(vlm, build_prompt("a <image1>", {1: torch.rand(448, 448, 3)}))
                        ["input_ids"] == config.image_token_id).sum())
    assert image_tokens == 1024
    assert embeds.hidden_states.shape[-1] == 64 and embeds.hidden_states.shape[1] > 1024
    assert torch.isfinite(embeds.hidden_states).all()
    # the same folder asked for more than the tower's 980 px is clamped, not run past its position table
    assert core.load_vlm(folder, drop_perceiver=True, image_resolution=1200).tokens_per_image == 4900


def test_qwen2_5_vl_3b_loads_at_its_real_widths_and_gives_256_tokens_at_448(tmp_path):
    import transformers

    from devtools.tiny_vlm_families import qwen2_vl
    tok = qwen2_vl.tokenizer()
    ids = tok.convert_tokens_to_ids
    # Real: vision width 1280, 14 px patches, 2x2 merge, window 112, merger into the 2048-wide decoder with its
    # 16 heads / 2 KV heads and M-RoPE sections. Shrunk: one layer per stack, the MLP widths, the vocabulary.
    config = qwen_config(vision_config=dict(depth=1, fullatt_block_indexes=[0], intermediate_size=256),
                         text_config=dict(num_hidden_layers=1, intermediate_size=256, vocab_size=len(tok),
                                          max_window_layers=1))
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(config, name, ids({"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                                   "vision_start_token_id": "<|vision_start|>",
                                   "vision_end_token_id": "<|vision_end|>"}[name]))
    text = config.get_text_config()
    text.bos_token_id = text.pad_token_id = ids("<|endoftext|>")
    text.eos_token_id = ids("<|im_end|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    processor = transformers.Qwen2_5_VLProcessor(
        image_processor=_image_processor("Qwen2VLImageProcessor", QWEN_IMAGES), tokenizer=tok,
        chat_template=qwen2_vl.CHAT_TEMPLATE, **qwen2_vl.video_processor_kwargs("Qwen2VLVideoProcessor"))
    folder = _save(model, processor, tmp_path / "qwen2.5-vl-3b-1layer", tok)
    del model
    vlm = core.load_vlm(folder, image_resolution=448)
    assert vlm.hidden_size == QWEN["hidden_size"] == 2048
    assert (vlm.images.mode, vlm.image_resolution, vlm.tokens_per_image) == ("pixel budget", 448, 256)
    embeds = _encode(vlm)
    assert embeds.hidden_states.shape[-1] == 2048 and embeds.hidden_states.shape[1] > 256
    assert torch.isfinite(embeds.hidden_states).all()


# --- BLIP-2 OPT-2.7b --------------------------------------------------------------------------------------------

def test_blip2_opt_2_7b_caption_budget_from_its_config():
    from transformers import Blip2Config

    from mmig_core.generation import cap_new_tokens, max_positions
    config = Blip2Config(**{k: v for k, v in BLIP2.items() if k != "architectures"})
    positions = max_positions(config)
    assert positions == 2048 and config.num_query_tokens == 32
    # the image: 224 px in 14 px patches (+ class token) read by the Q-Former's 32 queries, projected 768 -> 2560
    vision = config.vision_config
    assert ((vision.image_size // vision.patch_size) ** 2 + 1, config.qformer_config.encoder_hidden_size) == (257, 1408)
    assert (config.qformer_config.hidden_size, config.text_config.hidden_size) == (768, 2560)
    prompt_budget = (positions - config.num_query_tokens - 2) // 2  # what caption_images cuts a prompt to
    assert prompt_budget == 1007
    assert cap_new_tokens(30, 32 + 10, positions, what="t") == 30
    assert cap_new_tokens(4000, 32 + prompt_budget, positions, what="t") == 2048 - 32 - prompt_budget
