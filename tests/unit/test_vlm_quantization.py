"""Low VRAM for the VLMs (issue 13, item 8) and the processor set-up at load.

- `quantization` (none / 8-bit / 4-bit NF4 through bitsandbytes): every way it cannot run is a clear error (no CUDA
  device, bitsandbytes missing, a transformers without BitsAndBytesConfig, accelerate missing), `none` never
  imports bitsandbytes, and the BitsAndBytesConfig built for a real tiny model is checked against the model's own
  modules with transformers' own matcher. This machine has no GPU: the real 8-bit / 4-bit load cannot run here,
  so CUDA and bitsandbytes are stood in for where the test says so, and only the configuration is checked.
- a quantized model is pinned: the host's moves and casts leave it where it is; a LoRA is refused on it.
- `dtype`: every tiny family loads in bf16 on the CPU, describes and encodes with finite hidden states; fp16 too.
- Idefics2: a checkpoint that ships do_image_splitting on (idefics2-8b does) gets it turned off at load, so each
  image gives the tokens the pack counts (not 5x).
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools import tiny_idefics2  # noqa: E402
from devtools import tiny_vlm_families as families  # noqa: E402
from devtools.tiny_models import TINY_IDEFICS2  # noqa: E402
from mmig_core import low_vram  # noqa: E402
from mmig_core.mm_prompt import build_prompt  # noqa: E402
from mmig_core.vlm import GenerationSettings, describe, encode_prompts, load_vlm, text_decoder  # noqa: E402

FOUR_BIT, EIGHT_BIT = "4-bit (nf4)", "8-bit"


@pytest.fixture
def cuda_present(monkeypatch):
    """Stands in for a CUDA device (this machine has none): only the checks before a load read it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.fixture
def fake_bitsandbytes(monkeypatch):
    """An importable `bitsandbytes` (not installed here); the tests that use it never quantize anything."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))


@pytest.mark.parametrize("quantization", [FOUR_BIT, EIGHT_BIT])
def test_no_cuda_device_is_a_clear_error(monkeypatch, fake_bitsandbytes, quantization):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(low_vram.QuantizationUnavailable, match="needs a CUDA GPU.*Set quantization to none"):
        low_vram.require_quantization(quantization)


def test_missing_bitsandbytes_says_what_to_install(monkeypatch, cuda_present):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(low_vram.QuantizationUnavailable, match=r"`pip install bitsandbytes`"):
        low_vram.require_quantization(FOUR_BIT)


def test_bitsandbytes_that_fails_at_import_is_named(monkeypatch, cuda_present):
    def broken_import(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise RuntimeError("CUDA Setup failed despite GPU being available")
        return real_import(name, *args, **kwargs)
    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr("builtins.__import__", broken_import)
    with pytest.raises(low_vram.QuantizationUnavailable, match="installed but could not be imported.*CUDA Setup"):
        low_vram.require_quantization(EIGHT_BIT)


def test_transformers_without_bitsandbytes_config_is_a_clear_error(monkeypatch, cuda_present, fake_bitsandbytes):
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))  # a build lacking it
    with pytest.raises(low_vram.QuantizationUnavailable, match="lacks: `pip install -U transformers`"):
        low_vram.require_quantization(FOUR_BIT)


def test_missing_accelerate_is_a_clear_error(monkeypatch, cuda_present, fake_bitsandbytes):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(low_vram.QuantizationUnavailable, match="`pip install accelerate`"):
        low_vram.require_quantization(EIGHT_BIT)


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of none, 8-bit, 4-bit"):
        low_vram.require_quantization("3-bit")


@pytest.fixture(scope="module")
def idefics2(tiny_models):
    return tiny_models / TINY_IDEFICS2


def test_load_refuses_a_quantization_before_reading_the_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(low_vram.QuantizationUnavailable, match="CUDA GPU"):
        load_vlm(tmp_path / "not-even-a-folder", quantization=FOUR_BIT)


def test_none_loads_without_importing_bitsandbytes(monkeypatch, idefics2):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # any import of it would fail the load
    vlm = load_vlm(idefics2, quantization="none")
    assert vlm.quantization == "none" and vlm.dtype == torch.float32
    assert getattr(vlm.model, "quantization_method", None) is None and not getattr(vlm.model, "is_quantized", False)
    assert low_vram.quantized_load_kwargs("none", None, None, torch.float32, text_decoder) == {}


def _matcher():
    """transformers' own rule for llm_int8_skip_modules: 5.x matches from the start (or as a suffix), 4.x as a
    substring of the module name."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
        return lambda name, keep: not should_convert_module(name, keep)
    except ImportError:
        return lambda name, keep: any(key in name for key in keep)


@pytest.mark.parametrize("quantization", [FOUR_BIT, EIGHT_BIT])
def test_bitsandbytes_config_quantizes_the_language_model_only(cuda_present, fake_bitsandbytes, idefics2,
                                                               quantization):
    from transformers import AutoConfig, AutoModelForImageTextToText, BitsAndBytesConfig
    config = AutoConfig.from_pretrained(idefics2, local_files_only=True)
    kwargs = low_vram.quantized_load_kwargs(quantization, AutoModelForImageTextToText, config, torch.bfloat16,
                                            text_decoder)
    assert kwargs["device_map"] == {"": 0}
    bnb = kwargs["quantization_config"]
    assert isinstance(bnb, BitsAndBytesConfig)
    if quantization == FOUR_BIT:
        assert bnb.load_in_4bit and not bnb.load_in_8bit
        assert bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
        assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    else:
        assert bnb.load_in_8bit and not bnb.load_in_4bit
    # the names are checked against the model itself, with transformers' own matching rule
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    decoder = text_decoder(model)
    decoder_linears = {id(m) for m in decoder.modules() if isinstance(m, torch.nn.Linear)}
    skipped = _matcher()
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert decoder_linears and len(linears) > len(decoder_linears)
    for name, module in linears:
        kept = skipped(name, bnb.llm_int8_skip_modules)
        assert kept == (id(module) not in decoder_linears), f"{name}: kept unquantized {kept}"
    assert any("lm_head" in name for name in bnb.llm_int8_skip_modules)
    assert any("vision" in name for name in bnb.llm_int8_skip_modules)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "mllama"])
def test_kept_modules_follow_each_layout(tiny_models, family):
    from transformers import AutoConfig, AutoModelForImageTextToText
    folder = tiny_models / "vlm" / families.folder_name(family)
    if not (folder / "config.json").exists():
        pytest.skip(f"no tiny {family}: this transformers lacks the family")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    keep = low_vram.modules_kept_unquantized(AutoModelForImageTextToText, config, text_decoder)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    decoder = text_decoder(model)
    decoder_params = {id(p) for p in decoder.parameters()}
    skipped = _matcher()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert skipped(name, keep) == (id(module.weight) not in decoder_params), name


def test_a_quantized_model_is_pinned_where_it_was_loaded():
    """The host's memory manager moves a model through its holder's `.to()`: a pinned holder stays put (float64
    on the CPU, which no host would choose), a plain holder moves."""
    from devtools import tiny_sdxl
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from devtools.pack import import_pack_module
    loaded = import_pack_module("nodes._loaded")
    host = import_pack_module("nodes._host")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4)).to(torch.float64)
    patcher = loaded.pinned_patcher(model)
    assert patcher.load_device == patcher.offload_device == torch.device("cpu")
    patcher.model.to(torch.float16)
    patcher.model.to("meta")
    patcher.model.half()
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.float64)}
    assert patcher.model_size() > 0  # the host still counts its memory
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4)).to(torch.float64)
    host.managed(plain).model.to(torch.float16)
    assert {p.dtype for p in plain.parameters()} == {torch.float16}


def test_lora_is_refused_on_a_quantized_vlm(idefics2):
    from devtools.pack import import_pack_module
    loaded = import_pack_module("nodes._loaded")
    vlm = types.SimpleNamespace(vlm=types.SimpleNamespace(quantization=FOUR_BIT), name="idefics2-8b")
    with pytest.raises(ValueError, match="quantization '4-bit.*packed integers.*quantization none"):
        loaded.require_unquantized(vlm, "A VLM LoRA")
    loaded.require_unquantized(types.SimpleNamespace(vlm=types.SimpleNamespace(quantization="none"), name="x"), "LoRA")


def _family_folders(tiny_models):
    folders = {"idefics2": tiny_models / TINY_IDEFICS2}
    for name in families.FAMILY_MODULES:
        family = families.family_module(name).FAMILY
        folders[family] = tiny_models / "vlm" / families.folder_name(family)
    return folders


FAMILIES = ["idefics2"] + [families.family_module(name).FAMILY for name in families.FAMILY_MODULES]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_describes_and_encodes_in_half_precision(tiny_models, family, dtype):
    folder = _family_folders(tiny_models)[family]
    if not (folder / "config.json").exists():
        pytest.skip(f"no tiny {family}: this transformers lacks the family")
    vlm = load_vlm(folder, dtype=dtype, image_resolution=0)
    floating = {p.dtype for p in vlm.model.parameters() if p.is_floating_point()}
    assert vlm.dtype == dtype and dtype in floating and torch.float64 not in floating
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 40, 32, 3, generator=g)
    response, embeds = describe(vlm, build_prompt("<image1> describe this picture", {1: image}),
                                max_new_tokens=GenerationSettings(max_new_tokens=3))
    assert isinstance(response, str)
    assert embeds.hidden_states.dtype == torch.float32 and torch.isfinite(embeds.hidden_states).all()
    encoded = encode_prompts(vlm, [build_prompt("a <image1> fox", {1: image}), build_prompt("a lighthouse", {})])
    assert encoded.hidden_states.shape[0] == 2 and encoded.hidden_states.shape[-1] == vlm.hidden_size
    assert torch.isfinite(encoded.hidden_states[encoded.attention_mask]).all()


def test_idefics2_image_splitting_is_turned_off_at_load(idefics2, tmp_path):
    """idefics2-8b's preprocessor_config.json has do_image_splitting: true; its processor then writes five images'
    worth of tokens per placeholder (4 crops + the whole image) whatever the call says."""
    from transformers import AutoProcessor
    folder = tmp_path / "idefics2-splitting"
    shutil.copytree(idefics2, folder)
    # the hub's folders keep it in preprocessor_config.json, transformers 5 saves processor_config.json
    config_file = next(f for f in (folder / "preprocessor_config.json", folder / "processor_config.json") if f.exists())
    config = json.loads(config_file.read_text())
    config.get("image_processor", config)["do_image_splitting"] = True
    config_file.write_text(json.dumps(config))
    stock = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert stock.image_processor.do_image_splitting
    latents = tiny_idefics2.PERCEIVER_LATENTS
    image_id = stock.tokenizer.convert_tokens_to_ids("<image>")
    from PIL import Image
    stock_ids = stock(text=["<image>"], images=[[Image.new("RGB", (32, 32))]], return_tensors="pt")["input_ids"]
    assert int((stock_ids == image_id).sum()) == 5 * latents  # what the setting does to the text

    for drop, per_image in ((False, latents), (True, (tiny_idefics2.IMAGE_SIZE // tiny_idefics2.PATCH_SIZE) ** 2)):
        vlm = load_vlm(folder, drop_perceiver=drop, image_resolution=448)
        assert vlm.tokens_per_image == per_image
        assert vlm.processor.image_processor.do_image_splitting is False
        prompt = build_prompt("a <image1> man and his <image2> dog", {1: torch.rand(1, 40, 30, 3),
                                                                      2: torch.rand(1, 20, 60, 3)})
        states = encode_prompts(vlm, [prompt])
        text_only = encode_prompts(vlm, [build_prompt("a  man and his  dog", {})])
        added = states.hidden_states.shape[1] - text_only.hidden_states.shape[1]
        assert 2 * per_image <= added <= 2 * per_image + 4  # each image: its tokens and two <fake_token_around_image>


def test_fp16_overflow_is_a_clear_error_naming_bf16_not_nan_passed_on(idefics2):
    """fp16 tops out at 65504: a final norm scaled to 6e4 overflows in fp16 (as Gemma-based models' activations do)
    and stays finite in fp32. Encode and describe refuse the NaN/inf and name the dtype that fixes it."""
    from mmig_core.vlm import VLMNumericsError
    prompt = build_prompt("a lighthouse at night", {})
    for dtype in (torch.float16, torch.float32):
        vlm = load_vlm(idefics2, dtype=dtype)
        with torch.no_grad():
            text_decoder(vlm.model).norm.weight.fill_(6e4)  # fp16 holds 6e4; normalised activations above 1.1 overflow it
        if dtype == torch.float32:
            assert torch.isfinite(encode_prompts(vlm, [prompt]).hidden_states).all()
            continue
        with pytest.raises(VLMNumericsError, match=r"MMIG MUMU Encode, prompt 1.*NaN/inf.*float16.*dtype bf16"):
            encode_prompts(vlm, [prompt])
        with pytest.raises(VLMNumericsError, match=r"MMIG MLLM Describe.*dtype bf16"):
            describe(vlm, prompt, max_new_tokens=GenerationSettings(max_new_tokens=2))
