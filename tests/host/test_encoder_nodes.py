"""The multimodal prompt encoder nodes inside a real ComfyUI server, on the tiny Idefics2, adapter and SDXL."""
import shutil

import pytest

from devtools.tiny_models import TINY_IDEFICS2, TINY_MUMU_ADAPTER, TINY_SDXL

pytestmark = pytest.mark.host
VLM = TINY_IDEFICS2.split("/")[-1]
ADAPTER = TINY_MUMU_ADAPTER.split("/")[-1]


def image(width, height, color):
    return {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": 1, "color": color}}


def mumu_graph(text="a <image1> man and his <image2> dog", *, vlm=VLM, adapter=ADAPTER, color=0x3366CC,
               sample=True, extra_prompt=None):
    """Two reference images -> MUMU encode -> (KSampler with a CLIP Text Encode negative -> VAE decode)."""
    graph = {
        "1": image(48, 40, color), "2": image(24, 64, 0xCC6633),
        "3": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": text, "image1": ["1", 0], "image2": ["2", 0]}},
        "4": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": vlm, "dtype": "auto", "drop_perceiver": True,
                                                         "image_resolution": 448}},
        "5": {"class_type": "MMIG_AdapterLoader", "inputs": {"adapter_name": adapter, "dtype": "auto"}},
        "6": {"class_type": "MMIG_MUMUEncode", "inputs": {"vlm": ["4", 0], "adapter": ["5", 0], "mm_prompt": ["3", 0],
                                                          "width": 1024, "height": 768}},
        "7": {"class_type": "MMIGTest_ConditioningInfo", "inputs": {"conditioning": ["6", 0]}},
    }
    if extra_prompt is not None:  # a second prompt chained after the first
        graph["13"] = {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": extra_prompt, "previous": ["3", 0]}}
        graph["6"]["inputs"]["mm_prompt"] = ["13", 0]
    if sample:
        graph.update({
            "8": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
            "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["8", 1]}},
            "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "11": {"class_type": "KSampler", "inputs": {
                "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                "model": ["8", 0], "positive": ["6", 0], "negative": ["9", 0], "latent_image": ["10", 0]}},
            "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["8", 2]}},
            "14": {"class_type": "PreviewImage", "inputs": {"images": ["12", 0]}},
        })
    return graph


def conditioning_info(result, node="7"):
    return result.outputs[node]["conditioning"]


def test_the_loaders_list_the_tiny_models(host):
    info = host.object_info()
    assert VLM in info["MMIG_VLMLoader"]["input"]["required"]["model_name"][0]
    assert ADAPTER in info["MMIG_AdapterLoader"]["input"]["required"]["adapter_name"][0]


def test_mumu_conditioning_is_sdxl_shaped_and_samples_with_a_text_negative(host):
    result = host.run_graph(mumu_graph()).check()
    [info] = conditioning_info(result)
    assert info["shape"][0] == 1 and info["shape"][2] == 2048 and info["shape"][1] % 77 == 0
    assert info["pooled_shape"] == [1, 1280]
    assert info["extra"] == {"width": 1024, "height": 768, "crop_w": 0, "crop_h": 0,
                             "target_width": 1024, "target_height": 768}
    assert result.outputs["14"]["images"], "the KSampler -> VAE decode branch produced no image"


def test_requeued_graph_runs_nothing_again(host):
    graph = mumu_graph("<image2> beside a <image1> house", color=0x224466)
    first = host.run_graph(graph).check()
    second = host.run_graph(graph).check()
    assert conditioning_info(second) == conditioning_info(first)
    messages = host.get(f"/history/{second.prompt_id}")[second.prompt_id]["status"]["messages"]
    cached = next(data["nodes"] for kind, data in messages if kind == "execution_cached")
    assert {"3", "4", "5", "6", "11"} <= set(cached)


def test_text_only_and_batched_prompts_keep_their_order(host):
    alone_a = conditioning_info(host.run_graph(mumu_graph(sample=False)).check())[0]
    only_text = {"3": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "a lighthouse at night"}},
                 **{k: v for k, v in mumu_graph(sample=False).items() if k not in ("1", "2", "3")}}
    alone_b = conditioning_info(host.run_graph(only_text).check())[0]
    batch = conditioning_info(host.run_graph(mumu_graph(sample=False, extra_prompt="a lighthouse at night")).check())[0]
    assert batch["shape"][0] == 2
    assert batch["means"] == pytest.approx([alone_a["means"][0], alone_b["means"][0]], rel=1e-4, abs=1e-6)


def test_long_description_is_chunked_by_the_host_clip_encoder(host):
    description = " ".join(["a red fox"] * 67)  # 201 words, over 200 CLIP tokens
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"text": description, "clip": ["1", 1]}},
             "3": {"class_type": "MMIGTest_ConditioningInfo", "inputs": {"conditioning": ["2", 0]}}}
    [info] = conditioning_info(host.run_graph(graph).check(), "3")
    assert info["shape"][1] % 77 == 0 and info["shape"][1] // 77 >= 3


def describe_graph(mode="llmga prompt", when_missing="use whole response", prefix="", color=0x778899, **extra):
    return {
        "1": image(40, 32, color),
        "2": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "<image1> make it a winter scene",
                                                                "image1": ["1", 0]}},
        "3": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": VLM, "dtype": "auto", "drop_perceiver": False,
                                                         "image_resolution": 0}},
        "4": {"class_type": "MMIG_MLLMDescribe", "inputs": {
            "vlm": ["3", 0], "mm_prompt": ["2", 0], "mode": mode, "when_tags_missing": when_missing,
            "max_new_tokens": 12, "history": "User: hello\nAssistant: hi, send me an image",
            "filename_prefix": prefix, **extra}},
    }


def test_describe_saves_the_description(host):
    result = host.run_graph(describe_graph(mode="describe", prefix="mmig/describe_test")).check()
    [description] = result.outputs["4"]["text"]
    assert description.strip()
    [file] = host.output_files(result)
    assert file.read_text().strip() == description.strip()


def test_llmga_missing_tags_error_option(host):
    # A random-weight model never writes <gen_image> tags: 'error' must say so, and name the fix.
    result = host.run_graph(describe_graph(when_missing="error", color=0x112233))
    assert not result.ok and "<gen_image>" in result.error and "when_tags_missing" in result.error


def test_llmga_edit_task_runs_two_turns_in_the_released_format(host):
    """prompt_style llmga and task edit: 'Generate a similar image' with the image, then the prompt's text as the
    instruction; the response output holds both turns in the history format, which another Describe reads."""
    graph = describe_graph(prompt_style="llmga", task="edit", color=0x445566)
    graph["5"] = {"class_type": "MMIG_MLLMDescribe", "inputs": {
        "vlm": ["3", 0], "mm_prompt": ["2", 0], "mode": "describe", "when_tags_missing": "use whole response",
        "max_new_tokens": 4, "history": ["4", 1], "prompt_style": "pack"}}
    result = host.run_graph(graph).check()
    assert result.outputs["4"]["text"][0].strip() and "5" in result.outputs
    inpaint = host.run_graph(describe_graph(prompt_style="llmga", task="inpaint", color=0x445566)).check()
    assert inpaint.outputs["4"]["text"][0].strip()
    assert not host.run_graph(describe_graph(prompt_style="llmga", task="rewrite", color=0x445566)).ok
    assert host.run_graph(describe_graph(mode="describe", color=0x445567)).ok  # old graphs: no new inputs


@pytest.mark.parametrize("text, message", [
    ("a <image1> man, a <image2> dog and a <image3> cat", "<image3> but that input is not connected"),
    ("a <image1> man", "image2 is connected but the prompt has no <image2>"),
    ("   ", "the prompt is empty"),
])
def test_bad_prompts_are_clear_errors_and_host_keeps_serving(host, text, message):
    result = host.run_graph(mumu_graph(text, sample=False))
    assert not result.ok and message in result.error
    assert host.run_graph(mumu_graph("<image1> and <image2>", sample=False, color=0x010203)).ok


def test_adapter_width_mismatch_names_both_sizes(host):
    from mmig_core.mumu_adapter import MUMUAdapter, MUMUAdapterConfig, init_adapter, save_adapter
    wrong = init_adapter(MUMUAdapter(MUMUAdapterConfig(input_dim=96, width=16, num_layers=1, num_heads=2)))
    save_adapter(wrong, host.scratch_models / "mmig" / "adapter-for-another-vlm.safetensors")
    result = host.run_graph(mumu_graph(adapter="adapter-for-another-vlm.safetensors", sample=False))
    assert not result.ok and "96" in result.error and "hidden size 64" in result.error


def test_vlm_without_image_support_is_refused(host, tiny_models):
    text_only = host.scratch_models / "vlm" / "text-only-llm"
    shutil.rmtree(text_only, ignore_errors=True)
    from transformers import MistralConfig, MistralForCausalLM
    MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).save_pretrained(text_only)
    result = host.run_graph(mumu_graph(vlm="text-only-llm", sample=False))
    assert not result.ok and "no vision tower" in result.error and "text-only-llm" in result.error


def test_untrained_mm_adapter_is_listed_apart_and_changes_nothing(host):
    from mmig_core.mm_adapter import MMAdapterConfig, MMAdapterSet, save_mm_adapters
    save_mm_adapters(MMAdapterSet(MMAdapterConfig(dim=64, num_layers=2)), host.scratch_models / "mmig" / "mm-fresh.safetensors")
    info = host.object_info()
    assert "mm-fresh.safetensors" in info["MMIG_VLMLoader"]["input"]["optional"]["mm_adapter_name"][0]
    assert "mm-fresh.safetensors" not in info["MMIG_AdapterLoader"]["input"]["required"]["adapter_name"][0]
    assert ADAPTER not in info["MMIG_VLMLoader"]["input"]["optional"]["mm_adapter_name"][0]
    plain = conditioning_info(host.run_graph(mumu_graph(sample=False, color=0x445566)).check())
    with_adapter = mumu_graph(sample=False, color=0x445566)
    with_adapter["4"]["inputs"]["mm_adapter_name"] = "mm-fresh.safetensors"
    assert conditioning_info(host.run_graph(with_adapter).check()) == plain


def test_mm_adapter_in_the_old_layout_is_refused_with_the_retrain_command_and_the_host_keeps_serving(host):
    import torch

    from mmig_core.mm_adapter import FORMAT
    from mmig_core.model_files import save_safetensors_atomic
    old = {f"adapters.0.experts.{e}.down.weight": torch.zeros(8, 64, 1) for e in range(2)}  # the v1 layout
    save_safetensors_atomic(old, host.scratch_models / "mmig" / "mm-v1.safetensors",
                            {"format": FORMAT, "config": '{"dim": 64, "num_layers": 2}'})
    graph = mumu_graph(sample=False, color=0x556677)
    graph["4"]["inputs"]["mm_adapter_name"] = "mm-v1.safetensors"
    result = host.run_graph(graph)
    assert not result.ok and "layout version 1" in result.error and "python -m training mmig" in result.error
    assert host.run_graph(mumu_graph(sample=False, color=0x556677)).ok

def test_vlm_lora_changes_the_conditioning_and_strength_zero_does_not(host, tiny_models):
    from devtools.tiny_models import TINY_MUMU_BUNDLE
    loras = host.scratch_models / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_models / TINY_MUMU_BUNDLE / "vlm_lora.safetensors", loras / "tiny-vlm-lora.safetensors")
    assert "tiny-vlm-lora.safetensors" in host.object_info()["MMIG_VLMLoader"]["input"]["optional"]["lora_name"][0]

    def with_lora(strength):
        graph = mumu_graph(sample=False, color=0x665544)
        graph["4"]["inputs"].update(lora_name="tiny-vlm-lora.safetensors", lora_strength=strength)
        return conditioning_info(host.run_graph(graph).check())

    plain = conditioning_info(host.run_graph(mumu_graph(sample=False, color=0x665544)).check())
    assert with_lora(0.0) == plain
    assert with_lora(1.0) != plain
    # A LoRA for another model (the UNet's) matches nothing: a clear error, and the host keeps serving.
    shutil.copy(tiny_models / TINY_MUMU_BUNDLE / "unet_lora.safetensors", loras / "unet-lora.safetensors")
    graph = mumu_graph(sample=False, color=0x665544)
    graph["4"]["inputs"].update(lora_name="unet-lora.safetensors", lora_strength=1.0)
    result = host.run_graph(graph)
    assert not result.ok and "match" in result.error
    assert host.run_graph(mumu_graph(sample=False, color=0x112233)).ok


def test_quantization_lists_its_choices_and_none_is_the_plain_load(host):
    optional = host.object_info()["MMIG_VLMLoader"]["input"]["optional"]
    assert optional["quantization"][0] == ["none", "8-bit", "4-bit (nf4)"]
    assert list(optional)[-1] == "quantization"  # new inputs go at the end
    plain = conditioning_info(host.run_graph(mumu_graph(sample=False, color=0x336699)).check())
    graph = mumu_graph(sample=False, color=0x336699)
    graph["4"]["inputs"]["quantization"] = "none"
    assert conditioning_info(host.run_graph(graph).check()) == plain


@pytest.mark.parametrize("quantization", ["8-bit", "4-bit (nf4)"])
def test_quantization_without_cuda_is_a_clear_error_and_the_host_keeps_serving(host, quantization):
    """This host runs on the CPU: bitsandbytes' weights need CUDA, and the loader says so before the graph runs."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the error under test is the one without it")
    graph = mumu_graph(sample=False, color=0x996633)
    graph["4"]["inputs"]["quantization"] = quantization
    result = host.run_graph(graph)
    assert not result.ok and f"quantization '{quantization}' needs a CUDA GPU" in result.error
    assert "Set quantization to none" in result.error
    assert host.run_graph(mumu_graph(sample=False, color=0x996634)).ok
