"""LoRA merge cost on the tiny SDXL in the pinned host's code, with a rank-8 LoRA on every transformer linear
(attention, feed-forward, proj_in/out: MUMU's LoRA targets).

- `patched_step_over_plain_step`: MMIG LoRA Merge's own merge (the host's LoRA loader, with the pack's account
  of every module, on a clone) + one sampling step (the host multiplies B·A out while loading), over one step
  of the unpatched model; alternated, median of REPEATS.
- `merge_peak_mem_over_model_size`: (UNet bytes + the peak resident memory the merge adds: reading the
  LoRA, matching it, patching and loading the model) over the UNet bytes, in a fresh process (Linux VmHWM,
  reset via /proc/self/clear_refs after the model is loaded), median of MEMORY_REPEATS. 1.0 would mean no
  extra memory at all; the host keeps a backup of each patched weight while it is patched, so the LoRA'd
  layers count twice.
- `merge_peak_mem_over_host_lora_loader`: the same peak for the host's own LoRA loading
  (comfy.sd.load_lora_for_models, what Load LoRA runs) on the same file, as the anchor: what the host's
  patching itself costs.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import median, write_result

REPEATS = 5
MEMORY_REPEATS = 3
RANK = 8
LATENT = (1, 4, 32, 32)


def transformer_targets(weights: dict) -> list[str]:
    return [m for m, w in weights.items() if w.ndim == 2 and (".transformer_blocks." in m or m.endswith("proj_in")
                                                              or m.endswith("proj_out"))]


def write_bench_lora(folder: Path) -> Path:
    from devtools.tiny_lora import random_lora, unet_weights, write_lora
    from devtools.tiny_models import TINY_SDXL, ensure_tiny_models
    weights = unet_weights(ensure_tiny_models() / TINY_SDXL)
    lora = random_lora(weights, transformer_targets(weights), rank=RANK, alpha=RANK / 2)
    return write_lora(lora, "kohya", folder / "bench-lora.safetensors")


def merged(model, lora_path: Path, strength: float = 1.0):
    """What MMIG LoRA Merge does: the node's own merge (nodes/lora.py, the host's LoRA loader) on a clone."""
    from devtools.pack import import_pack_module

    state_dict, _ = import_pack_module("mmig_core.lora").load_lora_file(lora_path)
    patched, _report = import_pack_module("nodes.lora").merge_lora(model, state_dict, strength, 1.0, "bench:")
    return patched


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def host_lora_loader(model, lora_path: Path):
    import comfy.sd
    import comfy.utils
    patched, _clip = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(lora_path)), 1.0, 0.0)
    return patched


def peak_memory_child(mode: str, lora_path: str) -> None:
    from bench.guidance import load

    model, _clip, _conditioning = load()  # puts the host on the path
    import comfy.model_management
    unet_bytes = sum(v.numel() * v.element_size() for v in model.model.diffusion_model.state_dict().values())
    comfy.model_management.load_models_gpu([model])
    rss = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    patched = (merged if mode == "pack" else host_lora_loader)(model, Path(lora_path))
    comfy.model_management.load_models_gpu([patched])  # the host patches the weights here
    print(unet_bytes, (_status_kib("VmHWM") - rss) * 1024)


def peak_memory(mode: str, lora_path: Path) -> tuple[int, int]:
    child = subprocess.run([sys.executable, "-m", "bench.lora", "--peak", mode, str(lora_path)],
                           capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        raise RuntimeError(child.stderr[-2000:])
    unet_bytes, extra_bytes = map(int, child.stdout.split()[-2:])
    return unet_bytes, extra_bytes


def main() -> None:
    from bench.guidance import load, sample

    with tempfile.TemporaryDirectory() as tmp:
        lora_path = write_bench_lora(Path(tmp))
        model, _clip, conditioning = load()
        sample(model, conditioning, latent_shape=LATENT, steps=1)
        sample(merged(model, lora_path), conditioning, latent_shape=LATENT, steps=1)  # warm-ups
        plain, patched = [], []
        for _ in range(REPEATS):
            start = time.perf_counter()
            sample(model, conditioning, latent_shape=LATENT, steps=1)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            sample(merged(model, lora_path), conditioning, latent_shape=LATENT, steps=1)
            patched.append(time.perf_counter() - start)
        runs = [(peak_memory("pack", lora_path), peak_memory("host", lora_path)) for _ in range(MEMORY_REPEATS)]
        unet_bytes = runs[0][0][0]
        extra_bytes = median([pack[1] for pack, _host in runs])  # RSS peaks are noisy: alternated, median
        host_extra_bytes = median([host[1] for _pack, host in runs])
    result = {
        "patched_step_over_plain_step": round(median(patched) / median(plain), 3),
        "merge_peak_mem_over_model_size": round((unet_bytes + extra_bytes) / unet_bytes, 3),
        "merge_peak_mem_over_host_lora_loader": round((unet_bytes + extra_bytes) / (unet_bytes + host_extra_bytes), 3),
        "setup": {"rank": RANK, "latent": list(LATENT), "repeats": REPEATS, "plain_step_s": round(median(plain), 4),
                  "merge_and_step_s": round(median(patched), 4), "unet_mib": round(unet_bytes / 2 ** 20, 2),
                  "merge_extra_mib": round(extra_bytes / 2 ** 20, 2),
                  "host_lora_loader_extra_mib": round(host_extra_bytes / 2 ** 20, 2)},
    }
    write_result("lora", result, f"merge+step / step {result['patched_step_over_plain_step']}, "
                                 f"merge peak / UNet size {result['merge_peak_mem_over_model_size']} "
                                 f"(ours / host Load LoRA {result['merge_peak_mem_over_host_lora_loader']})")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--peak"]:
        peak_memory_child(sys.argv[2], sys.argv[3])
    else:
        main()
