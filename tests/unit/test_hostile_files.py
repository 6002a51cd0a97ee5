"""Hostile weight files and configs (issue 15, items 2, 4, 6): every loader refuses NaN/Inf and non-floating
tensors naming the file and the tensor, every config read from metadata is checked (positive, divisible, at most
MAX_PARAMETERS implied) before anything is allocated, an MMSM insertion point the UNet lacks and a NaN
min_matched_fraction are errors. The bad files are real safetensors / torch.save files, written here."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from devtools.pack import import_pack_module as pack_module  # noqa: E402
from devtools.tiny_mmsm import tiny_mmsm_config  # noqa: E402
from mmig_core import model_files  # noqa: E402
from mmig_core.diffrir import DiffRIR, load_diffrir, paper_config, save_diffrir, tiny_config  # noqa: E402
from mmig_core.diffrir.config import DiffRIRConfig  # noqa: E402
from mmig_core.diffrir.weights import read_pth  # noqa: E402
from mmig_core.lora import load_lora_file  # noqa: E402
from mmig_core.mm_adapter import MMAdapterConfig, MMAdapterSet, load_mm_adapters, save_mm_adapters  # noqa: E402
from mmig_core.mmsm import MMSM, MMSMConfig, check_insertion_point, init_mmsm, load_mmsm, save_mmsm  # noqa: E402
from mmig_core.model_files import MAX_PARAMETERS, ModelFilesError, check_tensors  # noqa: E402
from mmig_core.mumu_adapter import (MUMUAdapter, MUMUAdapterConfig, check_sdxl_widths, init_adapter,  # noqa: E402
                                    load_adapter, save_adapter)
from mmig_core import mm_adapter, mmsm as mmsm_core, mumu_adapter  # noqa: E402


def tiny_mmsm_file(path):
    return save_mmsm(init_mmsm(MMSM(tiny_mmsm_config()), seed=0, decoder_std=0.01), path)


def tiny_adapter_file(path):
    return save_adapter(init_adapter(MUMUAdapter(MUMUAdapterConfig(input_dim=24, width=16, num_layers=1,
                                                                   num_heads=2))), path)


def tiny_mm_adapter_file(path):
    return save_mm_adapters(MMAdapterSet(MMAdapterConfig(dim=16, num_layers=2)), path)


def tiny_diffrir_file(path):
    return save_diffrir(DiffRIR(tiny_config()), path)


def spoil(path, key_index: int, how: str):
    """Rewrite a safetensors file with one tensor spoiled (a NaN, an Inf, or cast to int32), metadata kept."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    name = list(state)[key_index]
    tensor = state[name].clone()
    if how == "nan":
        tensor.view(-1)[tensor.numel() // 2] = float("nan")
    elif how == "inf":
        tensor.view(-1)[-1] = float("-inf")
    else:
        tensor = (tensor * 100).to(torch.int32)
    state[name] = tensor
    save_file(state, str(path), metadata=metadata)
    return name


LOADERS = {
    "MMSM": (tiny_mmsm_file, load_mmsm),
    "MUMU adapter": (tiny_adapter_file, load_adapter),
    "MM-Adapter": (tiny_mm_adapter_file, load_mm_adapters),
    "DiffRIR": (tiny_diffrir_file, load_diffrir),
}


@pytest.mark.parametrize("how,words", [("nan", "NaN"), ("inf", "1 Inf"), ("int", "dtype int32")])
@pytest.mark.parametrize("kind", LOADERS)
def test_each_loader_refuses_a_bad_tensor_naming_the_file_and_the_tensor(tmp_path, kind, how, words):
    write, load = LOADERS[kind]
    path = write(tmp_path / "model.safetensors")
    load(path)  # the unspoiled file loads
    name = spoil(path, 1, how)
    with pytest.raises(ModelFilesError) as error:
        load(path)
    message = str(error.value)
    assert str(path) in message and repr(name) in message and words in message, message


def test_diffrir_pth_with_nan_or_integer_tensors_is_refused(tmp_path):
    state = DiffRIR(tiny_config()).state_dict()
    name = next(iter(state))
    bad = dict(state)
    bad[name] = state[name].clone().fill_(float("nan"))
    torch.save({"params_ema": bad}, tmp_path / "nan.pth")
    with pytest.raises(ModelFilesError, match=f"nan.pth: tensor '{name}' holds {state[name].numel()} NaN"):
        read_pth(tmp_path / "nan.pth")
    bad[name] = state[name].to(torch.int64)
    torch.save({"params": bad}, tmp_path / "int.pth")
    with pytest.raises(ModelFilesError, match=f"int.pth: tensor '{name}' has dtype int64"):
        load_diffrir(tmp_path / "int.pth")


def lora_file(tmp_path, **spoiled):
    state = {"lora_unet_a.lora_down.weight": torch.randn(4, 8), "lora_unet_a.lora_up.weight": torch.randn(8, 4),
             "lora_unet_a.alpha": torch.tensor(2.0)}
    state.update(spoiled)
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    return path


def test_a_lora_of_integer_tensors_or_with_nan_inf_is_refused(tmp_path):
    assert len(load_lora_file(lora_file(tmp_path))[0]) == 3
    # An integer alpha scalar is a real-world spelling (the host reads it with .item()); it loads.
    load_lora_file(lora_file(tmp_path, **{"lora_unet_a.alpha": torch.tensor(4)}))
    cases = [({"lora_unet_a.lora_down.weight": torch.randint(-5, 5, (4, 8), dtype=torch.int8)}, "dtype int8"),
             ({"lora_unet_a.lora_up.weight": torch.full((8, 4), float("nan"), dtype=torch.float16)}, "32 NaN"),
             ({"lora_unet_a.lora_up.weight": torch.tensor([[float("inf")] * 4] * 8)}, "32 Inf"),
             ({"lora_unet_a.lora_up.weight": torch.ones(8, 4, dtype=torch.bool)}, "dtype bool"),
             ({"lora_unet_a.alpha": torch.tensor(float("nan"))}, "1 NaN")]
    for spoiled, words in cases:
        name = next(iter(spoiled))
        with pytest.raises(ModelFilesError) as error:
            load_lora_file(lora_file(tmp_path, **spoiled))
        assert "lora.safetensors" in str(error.value) and repr(name) in str(error.value) and words in str(error.value)


def test_the_fast_finiteness_check_is_exact():
    # Large finite float16 values overflow a float16 sum; they are still finite and pass.
    check_tensors({"big": torch.full((4096,), 60000.0, dtype=torch.float16),
                   "huge": torch.full((8,), 3e38, dtype=torch.float32),
                   "empty": torch.empty(0), "bf16": torch.randn(64).bfloat16()}, "f")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = torch.randn(1000, dtype=torch.float64).to(dtype)
        t[-1] = float("nan")
        with pytest.raises(ModelFilesError, match="'x' holds 1 NaN and 0 Inf"):
            check_tensors({"ok": torch.ones(3), "x": t}, "f")
    # Every non-finite bit pattern of the 2-byte floats is found, anywhere in a tensor, and no finite one is.
    for dtype in (torch.float16, torch.bfloat16):
        every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
        finite = torch.isfinite(every.float())
        check_tensors({"finite": every[finite]}, "f")
        for bad in every[~finite][::7]:
            spoiled = torch.zeros(3000, dtype=dtype)
            spoiled[int(bad.view(torch.int16)) % 3000] = bad
            with pytest.raises(ModelFilesError, match="'x' holds"):
                check_tensors({"x": spoiled}, "f")
    if hasattr(torch, "float8_e4m3fn"):
        check_tensors({"f8": torch.ones(8).to(torch.float8_e4m3fn)}, "f")
        with pytest.raises(ModelFilesError, match="'f8' holds"):
            check_tensors({"f8": torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)}, "f")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64]
                         + [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)])
def test_the_file_level_check_counts_every_non_finite_value_in_place(tmp_path, dtype):
    from mmig_core.model_files import check_safetensors_values
    width = torch.tensor([], dtype=dtype).element_size() * 8
    patterns = (torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32) if width >= 16 else
                torch.arange(-128, 128, dtype=torch.int32))
    if width == 16:
        every = patterns.to(torch.int16).view(dtype)
    elif width == 8:
        every = patterns.to(torch.int8).view(dtype)
    else:  # a spread of bit patterns, the specials included
        every = torch.cat([torch.randn(5000, dtype=dtype), torch.tensor([float("nan"), float("inf"), -float("inf"),
                                                                        -0.0, 1e-310 if width == 64 else 1e-40])])
    finite = torch.isfinite(every.float())
    good = {"a": every[finite].clone(), "b": torch.ones(3, dtype=dtype)}
    save_file(good, str(tmp_path / "good.safetensors"))
    check_safetensors_values(tmp_path / "good.safetensors")
    values = every.float()
    nan, inf = int(torch.isnan(values).sum()), int(torch.isinf(values).sum())
    save_file({**good, "c": every.clone(), "d": torch.zeros(2, dtype=dtype)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFilesError, match=f"tensor 'c' holds {nan} NaN and {inf} Inf values"):
        check_safetensors_values(tmp_path / "bad.safetensors")


def test_the_strict_from_pretrained_refuses_nan_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path / "vlm"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)).save_pretrained(folder)
    [weights] = sorted(folder.glob("*.safetensors"))
    model_files.from_pretrained_strict(GPT2LMHeadModel, folder, torch.float32)
    state = load_file(str(weights))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)
    spoil(weights, list(state).index(name), "nan")
    with pytest.raises(ModelFilesError, match=f"the weights in {folder}: tensor '.*' holds 1 NaN"):
        model_files.from_pretrained_strict(GPT2LMHeadModel, folder, torch.float32)


# --- Configs in metadata --------------------------------------------------------------------------------------

def config_file(tmp_path, module_format: str, config: dict, key: str = "config"):
    path = tmp_path / "hostile.safetensors"
    metadata = {"format": module_format, "format_version": "2" if module_format == mm_adapter.FORMAT else "1",
                key: json.dumps(config)}
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    return path


MMSM_OK = {"text_dim": 24, "feature_channels": 64, "width": 32, "num_heads": 2, "mlp_hidden": 64}
ADAPTER_OK = {"input_dim": 24, "width": 16, "num_layers": 1, "num_heads": 2}
MM_ADAPTER_OK = {"dim": 16, "num_layers": 2}

CONFIG_CASES = [
    # (loader, format, good config, change, words in the error)
    ("MMSM", {"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ("MMSM", {"width": 33}, "width 33 is not divisible by num_heads 2"),
    ("MMSM", {"width": -32}, "width must be a positive integer, got -32"),
    ("MMSM", {"mlp_hidden": "64"}, "mlp_hidden must be a positive integer, got '64'"),
    ("MMSM", {"insertion_index": 1.5}, "insertion point ('output', 1.5)"),
    ("MMSM", {"text_dim": 200_000, "mlp_hidden": 200_000}, "B parameters"),
    ("MUMU adapter", {"num_heads": 0}, "num_heads must be a positive integer, got 0"),
    ("MUMU adapter", {"width": 15}, "width 15 is not divisible by num_heads 2"),
    ("MUMU adapter", {"mlp_ratio": float("nan")}, "mlp_ratio must be a finite number > 0, got nan"),
    ("MUMU adapter", {"width": 65536, "num_layers": 2000}, "B parameters"),
    ("MM-Adapter", {"groups": 0}, "groups must be a positive integer, got 0"),
    ("MM-Adapter", {"hidden": 9}, "hidden 9 is not divisible by groups 2"),
    ("MM-Adapter", {"temperature": 0}, "temperature must be a finite number > 0, got 0"),
    ("MM-Adapter", {"dim": 3_000_000, "hidden": 8000}, "B parameters"),
    ("DiffRIR", {"heads": [0, 2, 4, 8]}, "heads[0] must be a positive integer, got 0"),
    ("DiffRIR", {"heads": [3, 2, 4, 8]}, "width 64 at level 1 is not divisible by its 3 heads"),
    ("DiffRIR", {"num_blocks": [1, 1, 1]}, "num_blocks must list 4 levels"),
    ("DiffRIR", {"unshuffle": 3}, "unshuffle must be a power of 2, got 3"),
    ("DiffRIR", {"dim": 8192, "num_blocks": [40, 40, 40, 40]}, "B parameters"),
]


def write_config_case(tmp_path, kind, change):
    if kind == "MMSM":
        return config_file(tmp_path, mmsm_core.FORMAT, {**MMSM_OK, **change}), load_mmsm
    if kind == "MUMU adapter":
        return config_file(tmp_path, mumu_adapter.FORMAT, {**ADAPTER_OK, **change}), load_adapter
    if kind == "MM-Adapter":
        return config_file(tmp_path, mm_adapter.FORMAT, {**MM_ADAPTER_OK, **change}), load_mm_adapters
    from dataclasses import asdict
    from mmig_core.diffrir.weights import CONFIG_KEY
    path = tmp_path / "hostile.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={CONFIG_KEY: json.dumps({**asdict(paper_config()), **change})})
    return path, load_diffrir


@pytest.mark.parametrize("kind,change,words", CONFIG_CASES, ids=[f"{c[0]}-{next(iter(c[1]))}" for c in CONFIG_CASES])
def test_a_hostile_config_is_refused_before_allocation_naming_file_field_and_value(tmp_path, kind, change, words,
                                                                                   monkeypatch):
    path, load = write_config_case(tmp_path, kind, change)
    # Nothing may be built: any module construction would fail this test.
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda *a, **k: pytest.fail("a module was built"))
    with pytest.raises(ModelFilesError) as error:
        load(path)
    message = str(error.value)
    assert str(path) in message and words in message, message


def test_the_parameter_counts_match_the_built_modules():
    configs = [
        (MMSMConfig(**MMSM_OK), MMSM), (tiny_mmsm_config(width=48, num_heads=3), MMSM),
        (MUMUAdapterConfig(**ADAPTER_OK), MUMUAdapter), (MUMUAdapterConfig(input_dim=8, width=12, num_layers=3,
                                                                          num_heads=3, mlp_ratio=2.5, context_dim=20,
                                                                          pooled_dim=10), MUMUAdapter),
        (MMAdapterConfig(**MM_ADAPTER_OK), MMAdapterSet), (MMAdapterConfig(dim=12, num_layers=3, hidden=6, groups=3),
                                                           MMAdapterSet),
        (tiny_config(), DiffRIR), (paper_config(), DiffRIR),
        (DiffRIRConfig(dim=8, num_blocks=(1, 2, 1, 1), num_refinement_blocks=2, bias=True, layernorm_with_bias=True,
                       unshuffle=2, prior_features=8, prior_res_blocks=0, denoise_res_blocks=2), DiffRIR),
    ]
    for config, module in configs:
        built = module(config)
        assert config.parameter_count() == sum(p.numel() for p in built.parameters()), config
    # The real sizes are far below the bound: MUMU's adapter at its paper depth over a 4096-d VLM.
    assert MUMUAdapterConfig(input_dim=4096).parameter_count() < MAX_PARAMETERS / 50


def test_an_adapter_for_a_768_d_context_is_refused_for_sdxl_naming_both_widths():
    check_sdxl_widths(MUMUAdapterConfig(input_dim=8, width=8, num_layers=1, num_heads=1), "ok")
    with pytest.raises(ValueError, match="outputs 768-d context tokens and a 1280-d pooled.*takes 2048-d context"):
        check_sdxl_widths(MUMUAdapterConfig(input_dim=8, width=8, num_layers=1, num_heads=1, context_dim=768),
                          "sd15.safetensors")


# --- In the host's model: an MMSM insertion point past the blocks, a NaN LoRA guard -------------------------------

@pytest.fixture(scope="module")
def host_unet(load_tiny_sdxl_in_host):
    return load_tiny_sdxl_in_host()[0]


def test_an_mmsm_inserted_past_the_unets_output_blocks_is_an_error_naming_the_points(host_unet):
    nodes, core, vlm = pack_module("nodes.mmsm"), pack_module("mmig_core.mmsm"), pack_module("mmig_core.vlm")
    blocks = len(host_unet.model.diffusion_model.output_blocks)
    embeds = vlm.LLMEmbeds(hidden_states=torch.zeros(1, 3, MMSM_OK["text_dim"]),
                           attention_mask=torch.ones(1, 3, dtype=torch.bool))
    last = core.MMSM(core.MMSMConfig(**{**MMSM_OK, "feature_channels": 64, "insertion_index": blocks - 1}))
    nodes.MMIG_MMSMApply().apply(host_unet, nodes.LoadedMMSM(last, "last.safetensors"), embeds, 1.0)
    past = core.MMSM(core.MMSMConfig(**{**MMSM_OK, "insertion_index": blocks}))
    with pytest.raises(ValueError) as error:
        nodes.MMIG_MMSMApply().apply(host_unet, nodes.LoadedMMSM(past, "past.safetensors"), embeds, 1.0)
    assert (f"'past.safetensors' is inserted at ('output', {blocks})" in str(error.value)
            and f"has {blocks} output blocks" in str(error.value)
            and f"('output', 0) to ('output', {blocks - 1})" in str(error.value)), str(error.value)
    with pytest.raises(ValueError, match="has 9 output blocks"):
        check_insertion_point(MMSMConfig(**{**MMSM_OK, "insertion_index": 9}), 9, "x")


@pytest.mark.parametrize("fraction", [float("nan"), -0.5, 1.5])
def test_a_nan_or_out_of_range_min_matched_fraction_does_not_switch_off_the_lora_guard(host_unet, fraction):
    lora = pack_module("nodes.lora")
    # A LoRA that matches nothing of the model: the guard must refuse it whatever the threshold says.
    state = {"lora_unet_nowhere.lora_down.weight": torch.randn(4, 8),
             "lora_unet_nowhere.lora_up.weight": torch.randn(8, 4)}
    with pytest.raises(Exception, match=r"min_matched_fraction must be a number from 0 to 1, got (nan|-0.5|1.5)"):
        lora.merge_lora(host_unet, state, 1.0, fraction, "LoRA x:")
    with pytest.raises(Exception, match="none of its 1 UNet modules can be applied"):
        lora.merge_lora(host_unet, state, 1.0, 0.0, "LoRA x:")


@pytest.mark.parametrize("threaded", [False, True])
def test_the_checked_reader_gives_safetensors_tensors_and_names_the_first_bad_one(tmp_path, monkeypatch, threaded):
    # Small check jobs (64 bytes) so that tensors span several, checked on the second thread or inline.
    monkeypatch.setattr(model_files, "_JOB_BYTES", 64)
    monkeypatch.setattr(model_files, "_READ_BYTES", 100)
    monkeypatch.setattr(model_files, "_THREAD_MIN_BYTES", 0 if threaded else 1 << 62)
    state = {"a": torch.randn(300), "b": torch.randn(7, 9).half(), "c": torch.randn(33).bfloat16(),
             "d": torch.randn(50, dtype=torch.float64), "e": torch.empty(0), "f.alpha": torch.tensor(4),
             "g": torch.randn(3).half()}
    save_file(state, str(tmp_path / "good.safetensors"), metadata={"k": "v"})
    tensors, metadata = model_files.load_safetensors_checked(tmp_path / "good.safetensors", integer_scalars=(".alpha",))
    reference = load_file(str(tmp_path / "good.safetensors"))
    assert metadata == {"k": "v"} and set(tensors) == set(reference)
    for name, tensor in reference.items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name
    # A NaN late in 'b' and one early in 'g' (after 'b' in the file): 'b' is named, with its own count.
    state["b"].view(-1)[-2] = float("nan")
    state["g"][0] = float("inf")
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFilesError, match="tensor 'b' holds 1 NaN and 0 Inf values \\(of 63\\)"):
        model_files.load_safetensors_checked(tmp_path / "bad.safetensors", integer_scalars=(".alpha",))
    state["b"].view(-1)[-2] = 1.0
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFilesError, match="tensor 'g' holds 0 NaN and 1 Inf values \\(of 3\\)"):
        model_files.load_safetensors_checked(tmp_path / "bad.safetensors", integer_scalars=(".alpha",))
