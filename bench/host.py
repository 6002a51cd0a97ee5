"""The pack's cost inside the host: its import time, and a tiny txt2img graph with vs without it.

A server with the pack and one without run the same 4-step 64x64 graph alternately, several times;
the ratio of their median times is `graph_with_pack_over_without` (1.0 means the pack costs nothing
when none of its nodes are in the graph).
"""
from devtools.host import HostServer
from devtools.tiny_models import TINY_SDXL, ensure_tiny_models

from bench._common import median, write_result

REPEATS = 7


def txt2img_graph(seed: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_SDXL.split("/")[-1]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox in the snow", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def main() -> None:
    models = ensure_tiny_models()
    with HostServer([models], with_tiny_support=True) as with_pack, \
            HostServer([models], with_tiny_support=True, with_pack=False) as without_pack:
        for server in (with_pack, without_pack):  # warm-up: model load and first-call costs
            server.run_graph(txt2img_graph(0)).check()
        times = {"with": [], "without": []}
        for i in range(1, REPEATS + 1):  # a new seed each time, so the sampler really runs
            times["with"].append(with_pack.run_graph(txt2img_graph(i)).check().seconds)
            times["without"].append(without_pack.run_graph(txt2img_graph(i)).check().seconds)
        import_seconds = with_pack.pack_import_seconds()
    ratio = median(times["with"]) / median(times["without"])
    write_result("host", {
        "import_seconds": import_seconds,
        "graph_with_pack_over_without": ratio,
        "graph_seconds_median": {k: median(v) for k, v in times.items()},
        "repeats": REPEATS,
    }, f"pack import {import_seconds} s; tiny txt2img with pack / without = {ratio:.3f} "
       f"(medians of {REPEATS})")
