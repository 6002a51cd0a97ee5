"""The MUMU encoder's cost: encode over a raw VLM forward, tokens per image, and a re-queued graph.

- `encode_over_vlm_forward`: what MMIG MUMU Encode does (prompt -> processor -> VLM -> adapter) over the
  VLM forward alone on the same prepared inputs. The VLM and adapter are
  Idefics2-8B and MUMU's 16-layer adapter scaled down together (widths / 8, depths / 8) and fed MUMU's real
  sequence: two images at 448 px without the perceiver. The shrink does not keep the two's cost ratio exactly:
  attention costs scale with the width, the linear layers with its square, so over ~2000 tokens the scaled adapter
  weighs about twice its real share (`adapter_over_text_model_flops_scaled` vs `..._real`, estimated from the
  configs); the measured ratio overstates the real encode overhead accordingly.
- `tokens_per_image_with_perceiver` / `..._without_perceiver`: per image at 448 px with Idefics2's
  64-latent perceiver, and with it removed (14 px patches).
- `describe_over_generate`: what MMIG MLLM Describe does for one image + instruction (chat turn -> processor ->
  generation with its hidden states as e_llm) over a bare greedy `model.generate` of the same prepared tokens
  on the same model (the scaled Idefics2 with its perceiver), `DESCRIBE_TOKENS` new tokens, medians.
- `requeue_over_first_run`: a MUMU graph through the real host on the tiny models, re-queued unchanged,
  over its first run (the host's cache must answer it without running anything), wall-clock medians.

How the in-process ratios are measured, so that a busy machine (other processes on the same cores) moves them
little: torch runs on one thread, the pair (node's work, bare model call) runs interleaved in rounds whose order
alternates (A B, B A, ...) after `WARMUP` rounds, each call is timed on the process's CPU clock
(`time.process_time`: the work done, which other processes do not add to) and on the wall clock, and a ratio is the
median over rounds of that round's ratio. `*_wall` keys give the same ratios on the wall clock.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench._common import median, write_result  # noqa: E402

REPEATS = 9          # rounds of the in-process pairs
WARMUP = 2
REQUEUE_REPEATS = 5  # host graphs (seconds each)
DESCRIBE_TOKENS = 32
# Idefics2-8B / 8: vision 1152 x 27 layers, text 4096 x 32 layers (Mistral-7B), perceiver 64 latents.
VISION = dict(hidden_size=144, intermediate_size=540, num_hidden_layers=3, num_attention_heads=2, image_size=980,
              patch_size=14)
PERCEIVER = dict(hidden_size=512, resampler_n_latents=64, resampler_depth=1, resampler_n_heads=4,
                 resampler_head_dim=32, num_key_value_heads=2)
TEXT = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1)
ADAPTER = dict(width=128, num_layers=2, num_heads=2)  # MUMU's 16 layers at width 1024, / 8
REAL_TEXT = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8)  # Mistral-7B, Idefics2-8B's language model
REAL_ADAPTER = dict(width=1024, num_layers=16, mlp_ratio=4.0)


def flops_per_token(tokens: int, text: dict, adapter: dict) -> tuple[float, float]:
    """(text model, adapter) multiply-adds per token over a `tokens`-long sequence: linear layers and attention
    scores + weighted sums (norms, activations left out)."""
    w, kv = text["hidden_size"], text["hidden_size"] * text["num_key_value_heads"] // text["num_attention_heads"]
    text_layer = w * (2 * w + 2 * kv) + 3 * w * text["intermediate_size"] + 2 * tokens * w
    a = adapter["width"]
    adapter_layer = 4 * a * a + 2 * a * int(a * adapter.get("mlp_ratio", 4.0)) + 2 * tokens * a
    return text["num_hidden_layers"] * text_layer, adapter["num_layers"] * adapter_layer


def interleaved(fns: dict, repeats: int = REPEATS, warmup: int = WARMUP) -> dict:
    """{name: {"cpu": [s, ...], "wall": [s, ...]}}: each function once per round, the order reversed every other
    round, after `warmup` untimed rounds."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: {"cpu": [], "wall": []} for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def paired_ratio(times: dict, a: str, b: str, clock: str = "cpu") -> float:
    """The median over rounds of a's time over b's in the same round."""
    return median([x / y for x, y in zip(times[a][clock], times[b][clock])])


def one_thread():
    """torch on one thread for the measurement (restored after): the CPU clock then counts this work alone."""
    import contextlib

    import torch

    @contextlib.contextmanager
    def scope():
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    return scope()


def encoder_ratio(folder: Path) -> dict:
    import torch

    from devtools.tiny_idefics2 import build_tiny_idefics2
    from mmig_core.mm_prompt import build_prompt
    from mmig_core.mumu_adapter import MUMUAdapter, MUMUAdapterConfig, init_adapter
    from mmig_core.vlm import encode_prompts, hidden_states, load_vlm, prompt_inputs

    build_tiny_idefics2(folder, vision=VISION, perceiver=PERCEIVER, text=TEXT, init_std=0.02)
    with_perceiver = load_vlm(folder, drop_perceiver=False, image_resolution=448)
    vlm = load_vlm(folder, drop_perceiver=True, image_resolution=448)
    adapter = init_adapter(MUMUAdapter(MUMUAdapterConfig(input_dim=TEXT["hidden_size"], **ADAPTER))).eval()
    g = torch.Generator().manual_seed(0)
    prompt = build_prompt("a <image1> man and his <image2> dog in an animated style",
                          {1: torch.rand(1, 600, 400, 3, generator=g), 2: torch.rand(1, 480, 640, 3, generator=g)})
    inputs = prompt_inputs(vlm, prompt)

    def encode():  # MMIG_MUMUEncode's work, without the host
        embeds = encode_prompts(vlm, [prompt])
        with torch.no_grad():
            adapter(embeds.hidden_states, embeds.attention_mask)

    def forward():
        hidden_states(vlm, inputs)

    states = hidden_states(vlm, inputs).float()
    with torch.inference_mode(), one_thread():
        times = interleaved({"encode": encode, "forward": forward,
                             # where the difference goes: preprocessing (pad, processor) and the adapter
                             "preprocess": lambda: prompt_inputs(vlm, prompt), "adapter": lambda: adapter(states)})
    from mmig_core.vlm import GenerationSettings, chat_inputs, describe
    described = build_prompt("<image1> describe this picture in detail", {1: prompt.images[0][None]})
    chat = chat_inputs(with_perceiver, described)
    settings = GenerationSettings(max_new_tokens=DESCRIBE_TOKENS)

    def describe_node():  # MMIG_MLLMDescribe's work, without the host
        describe(with_perceiver, described, max_new_tokens=settings)

    def bare_generate():
        with_perceiver.model.generate(**chat, max_new_tokens=DESCRIBE_TOKENS, do_sample=False)

    with torch.inference_mode(), one_thread():
        times.update(interleaved({"describe": describe_node, "generate": bare_generate}))

    def cpu(name):
        return median(times[name]["cpu"])
    return {"encode_over_vlm_forward": paired_ratio(times, "encode", "forward"),
            "describe_over_generate": paired_ratio(times, "describe", "generate"),
            "encode_over_vlm_forward_wall": paired_ratio(times, "encode", "forward", "wall"),
            "describe_over_generate_wall": paired_ratio(times, "describe", "generate", "wall"),
            "describe_cpu_seconds_median": cpu("describe"), "generate_cpu_seconds_median": cpu("generate"),
            "encode_cpu_seconds_median": cpu("encode"), "vlm_forward_cpu_seconds_median": cpu("forward"),
            "preprocess_cpu_seconds_median": cpu("preprocess"), "adapter_cpu_seconds_median": cpu("adapter"),
            "preprocess_over_vlm_forward": paired_ratio(times, "preprocess", "forward"),
            "adapter_over_vlm_forward": paired_ratio(times, "adapter", "forward"),
            "sequence_tokens": int(inputs["input_ids"].shape[1]),
            **{f"adapter_over_text_model_flops_{kind}": (lambda f: f[1] / f[0])(
                flops_per_token(int(inputs["input_ids"].shape[1]), text, adapter_config))
               for kind, text, adapter_config in (("scaled", TEXT, {**ADAPTER, "mlp_ratio": adapter.config.mlp_ratio}),
                                                  ("real", REAL_TEXT, REAL_ADAPTER))},
            "tokens_per_image_with_perceiver": with_perceiver.tokens_per_image,
            "tokens_per_image_without_perceiver": vlm.tokens_per_image}


def requeue_ratio() -> dict:
    from devtools.host import HostServer
    from devtools.tiny_models import TINY_IDEFICS2, TINY_MUMU_ADAPTER, TINY_SDXL, ensure_tiny_models

    def graph(color: int) -> dict:
        return {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 40, "batch_size": 1, "color": color}},
            "2": {"class_type": "MMIG_MultimodalPrompt", "inputs": {"text": "a <image1> fox", "image1": ["1", 0]}},
            "3": {"class_type": "MMIG_VLMLoader", "inputs": {"model_name": TINY_IDEFICS2.split("/")[-1], "dtype": "auto",
                                                             "drop_perceiver": True, "image_resolution": 448}},
            "4": {"class_type": "MMIG_AdapterLoader", "inputs": {"adapter_name": TINY_MUMU_ADAPTER.split("/")[-1],
                                                                 "dtype": "auto"}},
            "5": {"class_type": "MMIG_MUMUEncode", "inputs": {"vlm": ["3", 0], "adapter": ["4", 0], "mm_prompt": ["2", 0],
                                                              "width": 1024, "height": 1024}},
            "6": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["6", 1]}},
            "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "9": {"class_type": "KSampler", "inputs": {
                "seed": 1, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
                "model": ["6", 0], "positive": ["5", 0], "negative": ["7", 0], "latent_image": ["8", 0]}},
            "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["6", 2]}},
            "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
        }

    first, again = [], []
    with HostServer([ensure_tiny_models()], with_tiny_support=True) as host:
        for i in range(REQUEUE_REPEATS):  # a new image each time, so the first run really encodes
            g = graph(0x102030 + i)
            first.append(host.run_graph(g).check().seconds)
            again.append(host.run_graph(g).check().seconds)
    return {"requeue_over_first_run": median(again) / median(first), "first_run_seconds_median": median(first),
            "requeue_seconds_median": median(again)}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mmig-bench-vlm-") as tmp:
        result = encoder_ratio(Path(tmp) / "idefics2-8b-scaled")
    result.update(requeue_ratio())
    result.update(repeats=REPEATS, warmup=WARMUP, requeue_repeats=REQUEUE_REPEATS)
    write_result("encoder", result,
                 f"MUMU encode / VLM forward = {result['encode_over_vlm_forward']:.3f} "
                 f"({result['sequence_tokens']} tokens); tokens per image {result['tokens_per_image_with_perceiver']} "
                 f"with perceiver, {result['tokens_per_image_without_perceiver']} without; MLLM describe / generate = "
                 f"{result['describe_over_generate']:.3f}; re-queued graph / first run "
                 f"= {result['requeue_over_first_run']:.3f} (CPU-clock medians of {REPEATS} interleaved rounds; "
                 f"wall clock {result['encode_over_vlm_forward_wall']:.3f} / {result['describe_over_generate_wall']:.3f})")
