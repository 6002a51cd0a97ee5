"""The real-shape run (issue 18 items 2 and 6): `make bench-real` (CPU, 512x512) and bench/gpu.sh (CUDA, 1024x1024).

Not part of `make bench` (bench/__main__.py skips modules starting with "_"): it writes multi-GB checkpoints and
takes minutes. For each family (SD1.5, SDXL):

- a real single-file checkpoint at the published architecture with seeded random weights, written once under
  .cache/bench-real/ (fp16 on disk, ~2 GB for SD1.5 and ~7 GB for SDXL): the UNet, the text encoder(s) and the
  VAE built from the host's own classes and configs, their keys turned into the original single-file names by the
  host's own `process_*_state_dict_for_saving` (what its Save Checkpoint writes), streamed to disk one tensor at a
  time;
- loaded through the host's own checkpoint loader (comfy.sd.load_checkpoint_guess_config, what Load Checkpoint
  runs; CLIP and VAE not instantiated: the run feeds random conditioning of the real widths), in the dtype and on
  the device the host picks (fp32 on a CPU, fp16 on CUDA);
- one sampler step (euler, CFG 5, a cond+uncond batch) at the size asked, each of: plain; A-STAR with the lean
  graph and without it (AStarSettings.lean_graph, nodes/_guidance.py); the same for the attend_and_excite mode
  (its update step, no refinement iterations); Layered Embeddings (one optimisation step, batch 1); MMSM Apply's
  patch; a rank-8 LoRA on every transformer linear merged by MMIG LoRA Merge's own code (the host patches the
  weights while it loads the model) + one step;
- for SD1.5, diffusers' StableDiffusionAttendAndExcitePipeline with random weights at the same shape, one step
  (max_iter_to_alter 1, no refinement), over a plain CFG forward of the same diffusers UNet.

Time: median of --repeats runs of each. Memory: the peak over each run, of the process's resident memory sampled
every 2 ms in a thread (CPU; glibc is told to return freed blocks: MALLOC_MMAP_THRESHOLD_ is set by the Makefile
target, malloc_trim before each run) or torch.cuda.max_memory_allocated (CUDA). Both as the peak itself
(`peak_mem_*_over_plain`: weights included, what decides whether it fits) and as the peak over the memory held
before the run (`added_mem_*_over_plain`: activations and graph alone).

    python -m bench._real [--families sd15,sdxl] [--size 512] [--repeats 3] [--out .cache/bench/real.json]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from devtools.paths import CACHE_DIR  # noqa: E402

# The host's own UNet configs of the two architectures (comfy/model_detection.py, unet_config_from_diffusers_unet:
# SD15 and SDXL), checked against the host's detection of the written file (check_checkpoint).
UNET_CONFIGS = {
    "sd15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
             "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False},
    "sdxl": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
             "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
             "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
             "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
             "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
             "use_temporal_attention": False, "use_temporal_resblock": False},
}
HOST_CLASS = {"sd15": "SD15", "sdxl": "SDXL"}
POOLED = {"sd15": None, "sdxl": 1280}
# MMSM at its published insertion point (the mid-block output, output block 0) with a Mistral-7B-wide LLM input.
MMSM_TEXT_DIM, MMSM_TEXT_TOKENS = 4096, 64
LORA_RANK = 8
CONCEPTS, WORDS = [[2], [5]], list(range(1, 8))  # "a cat and a dog"-like: two concepts among seven word tokens
SAMPLE_EVERY_S = 0.002
SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}


def log(message: str) -> None:
    print(f"[bench-real {time.strftime('%H:%M:%S')}] {message}", flush=True)


def import_host() -> None:
    from devtools import tiny_sdxl
    tiny_sdxl.import_host()


# -- the checkpoint ------------------------------------------------------------------------------------------------

def checkpoint_path(family: str) -> Path:
    return CACHE_DIR / "bench-real" / f"{family}-random-seed0-fp16.safetensors"


def checkpoint_layout(family: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{single-file key: (shape, dtype)} of the whole checkpoint, from the host's classes built on the meta device."""
    import_host()
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(UNET_CONFIGS[family], dtype=torch.float16)
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    if model_config is None or type(model_config).__name__ != HOST_CLASS[family]:
        raise RuntimeError(f"the host does not take the {family} config for {HOST_CLASS[family]}: {model_config}")
    with torch.device("meta"), torch.no_grad():
        unet = UNetModel(**config, operations=comfy.ops.disable_weight_init)
        clip = model_config.clip_target().clip(device="meta", dtype=torch.float16)
        vae = AutoencoderKL(ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                                      "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                                      "attn_resolutions": [], "dropout": 0.0}, embed_dim=4)
    parts = [model_config.process_unet_state_dict_for_saving(unet.state_dict()),
             model_config.process_clip_state_dict_for_saving(clip.state_dict()),
             model_config.process_vae_state_dict_for_saving(vae.state_dict())]
    layout = {}
    for part in parts:
        for key, tensor in part.items():
            dtype = torch.int64 if not tensor.dtype.is_floating_point else torch.float16
            layout[key] = (tuple(tensor.shape), dtype)
    return layout


def _value(key: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A seeded value: norms' weights 1, biases 0, position ids 0..n-1, other weights N(0, 1/fan_in) (so each
    layer keeps its input's scale and nothing overflows in fp16), the CLIP logit scale log(100)."""
    if not dtype.is_floating_point:
        return torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous() if shape else torch.zeros((), dtype=dtype)
    if key.endswith("logit_scale"):
        return torch.full(shape, math.log(100.0), dtype=dtype)
    if len(shape) <= 1:
        return (torch.ones if key.endswith("weight") and len(shape) == 1 else torch.zeros)(shape, dtype=dtype)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dtype)


def write_checkpoint(family: str, seed: int = 0) -> Path:
    """Stream the checkpoint to disk (header first, then one tensor at a time: memory stays at one tensor)."""
    path = checkpoint_path(family)
    if path.exists():
        return path
    return stream_safetensors(path, checkpoint_layout(family), seed,
                              f"{family} architecture, random weights, seed {seed}")


def stream_safetensors(path: Path, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int,
                       description: str) -> Path:
    """A safetensors file of `_value`s for `layout` (0-d tensors included), written tensor by tensor, then renamed."""
    header, offset = {}, 0
    for key, (shape, dtype) in layout.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "mmig_bench_real": description}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    log(f"writing {path.name}: {len(layout)} tensors, {offset / 2 ** 30:.2f} GiB")
    gen = torch.Generator().manual_seed(seed)
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, (shape, dtype) in layout.items():
            # reshape(-1): a 0-d tensor (CLIP's logit_scale) cannot be viewed as bytes
            f.write(_value(key, shape, dtype, gen).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    partial.rename(path)
    return path


def check_checkpoint(family: str, path: Path) -> str:
    """The host's own detection on the written file's keys and shapes (meta tensors: nothing is read)."""
    import comfy.model_detection
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    meta = {k: torch.empty(v["shape"], device="meta") for k, v in header.items()}
    config = comfy.model_detection.model_config_from_unet(meta, "model.diffusion_model.")
    if config is None or type(config).__name__ != HOST_CLASS[family]:
        raise RuntimeError(f"the host detects {path} as {config}, not {HOST_CLASS[family]}")
    return type(config).__name__


# -- measuring -----------------------------------------------------------------------------------------------------

class Peak:
    """The peak memory over a block: torch.cuda.max_memory_allocated on CUDA, else the resident set sampled."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        import psutil
        return psutil.Process().memory_info().rss

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
        self.base = self.peak = self.current()
        self._stop = threading.Event()
        if not self.cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        import psutil
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(SAMPLE_EVERY_S)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.current())
        return False


def measure(name: str, run, device: torch.device, repeats: int, warm_up: bool = True) -> dict:
    """Median seconds of `repeats` runs and the highest peak among them, after one warm-up run (weights loaded,
    the guidance's one-time copy of inference-mode weights made, caches filled) unless warm_up is False."""
    if warm_up:
        run()
    times, peaks = [], []
    for _ in range(repeats):
        with Peak(device) as peak:
            start = time.perf_counter()
            result = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append((peak.peak, peak.base))
        if torch.is_tensor(result) and not torch.isfinite(result).all():
            raise RuntimeError(f"{name}: the result holds NaN/Inf")
        del result
    peak, base = max(p for p, _ in peaks), min(b for _, b in peaks)
    out = {"s": round(statistics.median(times), 3), "peak_gib": round(peak / 2 ** 30, 3),
           "added_gib": round(max(p - b for p, b in peaks) / 2 ** 30, 3)}
    log(f"  {name}: {out}")
    return out


# -- the runs ------------------------------------------------------------------------------------------------------

def load(family: str):
    import_host()
    import comfy.sd
    path = write_checkpoint(family)
    detected = check_checkpoint(family, path)
    log(f"loading {path.name} through comfy.sd.load_checkpoint_guess_config (detected as {detected})")
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=False,
                                                      embedding_directory=None)[0]
    return model, path


def conditioning(family: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    width = UNET_CONFIGS[family]["context_dim"]
    cond, neg = torch.randn(1, 77, width, generator=gen), torch.randn(1, 77, width, generator=gen)
    extra = {} if POOLED[family] is None else {"pooled_output": torch.randn(1, POOLED[family], generator=gen)}
    neg_extra = {} if POOLED[family] is None else {"pooled_output": torch.randn(1, POOLED[family], generator=gen)}
    return [[cond, extra]], [[neg, neg_extra]]


def sample_once(model, cond, latent_shape):
    import comfy.sample
    latent = torch.zeros(latent_shape)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed=0)
        return comfy.sample.sample(model, noise, 1, 5.0, "euler", "normal", *cond, latent, seed=0, disable_pbar=True)


def pack(name: str):
    from devtools.pack import import_pack_module
    return import_pack_module(name)


def guided(model, mode: str, lean: bool):
    g = pack("nodes._guidance")
    extra = {"refine_at_steps": (10 ** 6,), "refine_thresholds": (0.5,)} if mode == "attend_and_excite" else {}
    settings = g.AStarSettings(CONCEPTS, WORDS, guided_steps=1, scale_factor=20.0, mode=mode, lean_graph=lean,
                               **extra)
    patched, guidance = g.guided_model(model, settings)
    return patched, guidance


def mmsm_model(model, family: str):
    from mmig_core.mmsm import MMSM, MMSMConfig, OutputBlockPatch, init_mmsm
    channels = model.model.diffusion_model.middle_block[-1].out_layers[-1].out_channels
    mmsm = init_mmsm(MMSM(MMSMConfig(text_dim=MMSM_TEXT_DIM, feature_channels=channels)), seed=0, decoder_std=0.02)
    text = torch.randn(1, MMSM_TEXT_TOKENS, MMSM_TEXT_DIM, generator=torch.Generator().manual_seed(1))
    patched = model.clone()
    patched.set_model_output_block_patch(OutputBlockPatch(mmsm.eval(), text, None, 1.0))
    return patched


def lora_file(model, family: str) -> Path:
    from devtools.tiny_lora import random_lora, write_lora
    path = checkpoint_path(family).with_name(f"{family}-random-lora-r{LORA_RANK}.safetensors")
    if not path.exists():
        weights = {k[:-len(".weight")]: v for k, v in model.model.diffusion_model.state_dict().items()
                   if k.endswith(".weight") and v.ndim == 2 and (".transformer_blocks." in k or "proj_in" in k
                                                                  or "proj_out" in k)}
        write_lora(random_lora(weights, list(weights), rank=LORA_RANK, alpha=LORA_RANK / 2), "kohya", path)
    return path


def layered_step(model, latent_shape, family: str):
    import comfy.model_management
    from mmig_core import layered_embeddings as layered
    comfy.model_management.load_models_gpu([model])
    device = comfy.model_management.get_torch_device()
    gen = torch.Generator().manual_seed(2)
    width = UNET_CONFIGS[family]["context_dim"]
    extra = {} if POOLED[family] is None else {"pooled_output": torch.randn(1, POOLED[family], generator=gen)}
    fg, bg = (torch.randn(1, 77, width, generator=gen), extra), (torch.randn(1, 77, width, generator=gen), extra)
    latent = torch.randn(latent_shape, generator=gen)
    mask = torch.zeros(latent_shape[0], 1, *latent_shape[-2:])
    mask[..., latent_shape[-2] // 4:-latent_shape[-2] // 4, latent_shape[-1] // 4:-latent_shape[-1] // 4] = 1
    result, _ = layered.optimise_for_model(model.model, device, latent, mask, fg, bg, steps=1, learning_rate=0.05,
                                           seed=0, probes=0)
    return result.e_opt


def run_family(family: str, size: int, repeats: int) -> dict:
    import_host()
    import comfy.model_management
    log(f"{family} at {size}x{size}: free memory {_available_gib():.1f} GiB")
    model, path = load(family)
    device = comfy.model_management.get_torch_device()
    cond = conditioning(family)
    latent_shape = (1, 4, size // 8, size // 8)
    unet = model.model.diffusion_model
    runs = {"plain": lambda: sample_once(model, cond, latent_shape)}
    for mode, label in (("a_star", "a_star"), ("attend_and_excite", "attend_excite")):
        for lean in (False, True):
            patched, _ = guided(model, mode, lean)
            runs[f"{label}_{'lean' if lean else 'full'}"] = (lambda p=patched: sample_once(p, cond, latent_shape))
    runs["layered_embeddings"] = lambda: layered_step(model, latent_shape, family)
    mmsm = mmsm_model(model, family)
    runs["mmsm"] = lambda: sample_once(mmsm, cond, latent_shape)
    lora = lora_file(model, family)

    def merged_step():
        state_dict, _ = pack("mmig_core.lora").load_lora_file(lora)
        patched, _ = pack("nodes.lora").merge_lora(model, state_dict, 1.0, 1.0, "bench-real:")
        out = sample_once(patched, cond, latent_shape)  # the host merges B·A into the weights while loading
        comfy.model_management.load_models_gpu([model])  # and restores them for the next run
        return out
    runs["lora_merge"] = merged_step
    results = {}
    warm = {"plain", "a_star_full", "layered_embeddings", "lora_merge"}  # first of a kind; the rest run on the same
    for name, run in runs.items():
        results[name] = measure(name, run, device, repeats, warm_up=name in warm or device.type == "cuda")
    plain = results["plain"]

    def ratio(key, name):
        if key == "added_gib":
            return round(results[name][key] / max(plain[key], 1e-9), 3)
        return round(results[name][key] / plain[key], 3)
    figures = {}
    for name in results:
        if name != "plain":
            figures[f"{name}_step_over_plain_step"] = ratio("s", name)
            figures[f"peak_mem_{name}_over_plain"] = ratio("peak_gib", name)
            figures[f"added_mem_{name}_over_plain"] = ratio("added_gib", name)
    out = {"family": family, "size": size, "device": str(device), "unet_dtype": str(model.model.get_dtype()),
           "unet_parameters": sum(p.numel() for p in unet.parameters()), "checkpoint": str(path),
           "checkpoint_gib": round(path.stat().st_size / 2 ** 30, 2), "repeats": repeats,
           "capture_blocks": [list(b) for b in pack("mmig_core.astar").capture_blocks(unet)],
           "runs": results, "figures": figures}
    del runs, mmsm, model
    gc.collect()
    comfy.model_management.soft_empty_cache()
    if family == "sd15":
        out["diffusers_attend_and_excite"] = diffusers_attend_excite(size, repeats, device)
    return out


def diffusers_attend_excite(size: int, repeats: int, device: torch.device) -> dict:
    """diffusers' StableDiffusionAttendAndExcitePipeline on SD1.5's UNet shape (random weights, fp16 on CUDA), one
    step, max_iter_to_alter 1 and no refinement, over one CFG forward of the same UNet without gradients."""
    try:
        from diffusers import DDIMScheduler, StableDiffusionAttendAndExcitePipeline, UNet2DConditionModel
    except ImportError as exc:
        return {"skipped": f"diffusers is not installed ({exc})"}
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=size // 8, cross_attention_dim=768, attention_head_dim=8)
    unet = unet.to(device=device, dtype=dtype).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=True, steps_offset=1)
    pipe = StableDiffusionAttendAndExcitePipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                                  scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    embeds, negative = (torch.randn(1, 77, 768, generator=gen).to(device, dtype) for _ in range(2))
    latents = torch.randn(1, 4, size // 8, size // 8, generator=gen).to(device, dtype)
    side = size // 32

    def attend_excite():
        return pipe(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative, token_indices=[2, 5],
                    height=size, width=size, num_inference_steps=1, guidance_scale=5.0, latents=latents.clone(),
                    max_iter_to_alter=1, thresholds={}, attn_res=(side, side), output_type="latent").images

    def plain():
        with torch.no_grad():
            return unet(torch.cat([latents] * 2), torch.tensor([999], device=device),
                        encoder_hidden_states=torch.cat([negative, embeds])).sample

    runs = {"plain_cfg_forward": measure("diffusers plain CFG forward", plain, device, repeats),
            "attend_and_excite": measure("diffusers attend_and_excite", attend_excite, device, repeats)}
    p, g = runs["plain_cfg_forward"], runs["attend_and_excite"]
    return {"runs": runs, "unet_requires_grad": any(q.requires_grad for q in unet.parameters()),
            "guided_step_over_plain_step": round(g["s"] / p["s"], 3),
            "peak_mem_guided_over_plain": round(g["peak_gib"] / p["peak_gib"], 3),
            "added_mem_guided_over_plain": round(g["added_gib"] / max(p["added_gib"], 1e-9), 3)}


def _available_gib() -> float:
    import psutil
    return psutil.virtual_memory().available / 2 ** 30


# Resident memory a family's run needs on a CPU (fp32 UNet + the checkpoint read whole by the host's loader +
# activations at 512 px), to refuse early instead of swapping a shared machine to death.
NEEDS_GIB = {"sd15": 8.0, "sdxl": 20.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd15,sdxl")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(CACHE_DIR / "bench" / "real.json"))
    parser.add_argument("--force", action="store_true", help="run even when free memory looks too small")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("BENCH_REAL_THREADS", "0")) or 99)))
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.setdefault("families", {})
    failed = 0
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        key = f"{family}_{args.size}"
        on_cuda = torch.cuda.is_available()
        if not on_cuda and not args.force and _available_gib() < NEEDS_GIB[family]:
            message = (f"skipped: {_available_gib():.1f} GiB available, {family} on a CPU needs about "
                       f"{NEEDS_GIB[family]:.0f} GiB (--force runs it anyway)")
            log(f"{family}: {message}")
            result["families"][key] = {"skipped": message}
            failed += 1
            continue
        try:
            result["families"][key] = run_family(family, args.size, args.repeats)
        except Exception as exc:  # one failed family must not hide the other's figures
            log(f"{family}: FAILED: {type(exc).__name__}: {exc}")
            result["families"][key] = {"failed": f"{type(exc).__name__}: {exc}"}
            failed += 1
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out_path}")
    for key, family in result["families"].items():
        figures = family.get("figures")
        if figures:
            summary = ", ".join(f"{k} {figures[k]}" for k in (
                "a_star_full_step_over_plain_step", "a_star_lean_step_over_plain_step",
                "peak_mem_a_star_full_over_plain", "peak_mem_a_star_lean_over_plain"))
            print(f"bench-real/{key}: {summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
