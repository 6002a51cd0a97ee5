"""MMSM's sampling cost, and the whole MMIG pipeline's wall time by node, on the tiny models.

- `step_with_mmsm_over_without`: in-process, with the pinned host's code: comfy.sample.sample (what KSampler
  runs), euler, STEPS steps at a LATENT latent, with the tiny MMSM patched at output block 0 over the same run
  without it; the two alternate, median of REPEATS. Target <= 1.05.
- `pipeline_seconds_by_node`: `workflows/mmig_full` run through a real host on the tiny models (as
  `make run TINY=1` runs it: 128 px, 4 steps), median over PIPELINE_REPEATS cold runs (fresh node ids, so
  every node re-runs, loaders included) of each node's time, keyed "<class>: <title>". Node times come from
  the host's websocket (`HostServer.run_graph_timed`).
- `ksampler_split_seconds`: KSampler's time includes the MMSM hook and the A-STAR guidance, which run inside
  its steps. They are split off by difference, in warm runs where only the KSampler and what follows it
  re-run (new seed, upstream cached), SPLIT_REPEATS times, alternating three graphs: the full one, one
  whose KSampler takes its model from before MMSM Apply (no MMSM hook) and one from before A-STAR Guidance
  (no guidance). A hook's share is the median KSampler time with it minus the median without it; the
  rest is the UNet's own sampling. (A difference may come out slightly negative when it is within noise.)
- `pipeline_seconds_by_stage`: nodes grouped into VLM, MMSM, guidance, sampling, caption and other, with the
  hooks' seconds moved from sampling to MMSM and guidance (negative differences count as 0, and no more than
  the cold KSampler time is moved); `slowest_stage` names the largest. On a loaded machine (others' tests
  sharing its cores) every figure swells and jitters: compare the stages of one run, not runs.
"""
from __future__ import annotations

import copy
import json
import time

from bench._common import median, write_result
from bench.guidance import load, sample

REPEATS = 5
STEPS = 10
LATENT = (1, 4, 32, 32)  # 256 px: MMSM sees 8x8 mid-block features
TEXT_TOKENS = 64
PIPELINE_REPEATS = 5
SPLIT_REPEATS = 7
WORKFLOW = "mmig_full"
STAGES = {
    "VLM": ("MMIG_VLMLoader", "MMIG_MultimodalPrompt", "MMIG_MLLMDescribe"),
    "MMSM": ("MMIG_MMSMLoader", "MMIG_MMSMApply"),
    "guidance": ("MMIG_LayeredEmbeddings", "MMIG_AStarGuidance"),
    "sampling": ("KSampler",),
    "caption": ("MMIG_BLIP2Loader", "MMIG_BLIP2Caption"),
}


def step_ratio() -> dict:
    import torch

    from devtools.tiny_mmsm import tiny_mmsm_config
    from mmig_core.mmsm import MMSM, OutputBlockPatch, init_mmsm

    model, _, conditioning = load()
    mmsm = init_mmsm(MMSM(tiny_mmsm_config()), seed=0, decoder_std=0.02)  # a "trained" decoder: the work is real
    text = torch.randn(1, TEXT_TOKENS, mmsm.config.text_dim, generator=torch.Generator().manual_seed(0))
    patched = model.clone()
    patched.set_model_output_block_patch(OutputBlockPatch(mmsm, text, None, 1.0))
    sample(model, conditioning, LATENT, steps=2)  # warm-up
    sample(patched, conditioning, LATENT, steps=2)
    times = {"without": [], "with": []}
    for _ in range(REPEATS):
        for name, which in (("without", model), ("with", patched)):
            start = time.perf_counter()
            sample(which, conditioning, LATENT, steps=STEPS)
            times[name].append(time.perf_counter() - start)
    return {"step_with_mmsm_over_without": median(times["with"]) / median(times["without"]),
            "seconds_per_step": {k: median(v) / STEPS for k, v in times.items()}}


def renumbered(api: dict, run: int) -> dict:
    """The graph with fresh node ids, so the host's output cache re-runs every node."""
    new_id = {old: f"r{run}_{old}" for old in api}
    graph = {}
    for old, node in api.items():
        node = copy.deepcopy(node)
        node["inputs"] = {k: [new_id[v[0]], v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        graph[new_id[old]] = node
    return graph


def pipeline_variants(api: dict) -> tuple[dict, str]:
    """The full graph, and the same graph with the KSampler's model taken before MMSM / before A-STAR."""
    by_class = {node["class_type"]: node_id for node_id, node in api.items()}
    sampler, astar, mmsm = by_class["KSampler"], by_class["MMIG_AStarGuidance"], by_class["MMIG_MMSMApply"]
    checkpoint = api[mmsm]["inputs"]["model"]
    no_mmsm, no_astar = copy.deepcopy(api), copy.deepcopy(api)
    no_mmsm[astar]["inputs"]["model"] = checkpoint
    no_astar[sampler]["inputs"]["model"] = [mmsm, 0]
    return {"full": api, "no_mmsm": no_mmsm, "no_astar": no_astar}, sampler


def pipeline_timing() -> dict:
    from devtools.host import HostServer
    from devtools.run import shrink_for_tiny, swap_to_tiny
    from devtools.tiny_models import ensure_tiny_models
    from devtools.workflows import api_path

    api = json.loads(api_path(WORKFLOW).read_text())
    with HostServer([ensure_tiny_models()], with_tiny_support=True) as host:
        swap_to_tiny(api, host.object_info())
        shrink_for_tiny(api)
        host.run_graph_timed(renumbered(api, 0)).check()  # warm-up: imports, first model loads
        cold = []
        for run in range(1, PIPELINE_REPEATS + 1):
            result = host.run_graph_timed(renumbered(api, run)).check()
            cold.append(({k.removeprefix(f"r{run}_"): v for k, v in result.node_seconds.items()}, result.seconds))
        # The split: the same node ids every time, so the host's cache keeps everything upstream of the
        # KSampler; a new seed each run makes the KSampler (and what follows it) run again.
        variants, sampler = pipeline_variants(api)
        host.run_graph_timed(renumbered(api, "split")).check()  # warm-up of the split's node ids
        sampler_seconds = {name: [] for name in variants}
        for seed in range(SPLIT_REPEATS):
            for name, graph in variants.items():
                graph = copy.deepcopy(graph)
                graph[sampler]["inputs"]["seed"] = 1000 + seed
                result = host.run_graph_timed(renumbered(graph, "split")).check()
                sampler_seconds[name].append(result.node_seconds[f"rsplit_{sampler}"])
    by_id = {node_id: median([seconds.get(node_id, 0.0) for seconds, _ in cold]) for node_id in api}
    sampler_median = {name: median(times) for name, times in sampler_seconds.items()}
    split = {"mmsm_hook": sampler_median["full"] - sampler_median["no_mmsm"],
             "astar_guidance": sampler_median["full"] - sampler_median["no_astar"]}
    split["unet_sampling"] = sampler_median["full"] - split["mmsm_hook"] - split["astar_guidance"]
    split["ksampler_total"] = sampler_median["full"]

    def label(node_id):
        node = api[node_id]
        return f"{node['class_type']}: {node.get('_meta', {}).get('title', node_id)}"

    stages = {stage: 0.0 for stage in (*STAGES, "other")}
    for node_id, seconds in by_id.items():
        stage = next((s for s, classes in STAGES.items() if api[node_id]["class_type"] in classes), "other")
        stages[stage] += seconds
    # The hooks' seconds per KSampler run move from sampling to their stages; a difference within noise
    # (below zero) counts as nothing, and sampling never goes below zero.
    mmsm_hook, astar_hook = max(0.0, split["mmsm_hook"]), max(0.0, split["astar_guidance"])
    moved = min(mmsm_hook + astar_hook, stages["sampling"])
    share = moved / (mmsm_hook + astar_hook) if mmsm_hook + astar_hook > 0 else 0.0
    stages["sampling"] -= moved
    stages["MMSM"] += share * mmsm_hook
    stages["guidance"] += share * astar_hook
    return {
        "pipeline_seconds_by_node": {label(i): round(s, 4) for i, s in sorted(by_id.items(), key=lambda x: -x[1])},
        "ksampler_split_seconds": {k: round(v, 4) for k, v in split.items()},
        "pipeline_seconds_by_stage": {k: round(v, 4) for k, v in stages.items()},
        "slowest_stage": max(stages, key=stages.get),
        "pipeline_wall_seconds": median([wall for _, wall in cold]),
        "pipeline_repeats": PIPELINE_REPEATS,
        "split_repeats": SPLIT_REPEATS,
    }


def main() -> None:
    result = {**step_ratio(), "latent": list(LATENT), "steps": STEPS, "repeats": REPEATS,
              "text_tokens": TEXT_TOKENS, **pipeline_timing()}
    ratio, stages = result["step_with_mmsm_over_without"], result["pipeline_seconds_by_stage"]
    write_result("mmsm", result, f"MMSM: sampling step with / without = {ratio:.3f} (target <= 1.05); "
                                 f"mmig_full {result['pipeline_wall_seconds']:.1f} s on the tiny models, slowest "
                                 f"stage {result['slowest_stage']} ({stages[result['slowest_stage']]:.2f} s)")


if __name__ == "__main__":
    main()
