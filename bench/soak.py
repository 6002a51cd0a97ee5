"""The server's memory over many runs of the pack's largest workflow (issue 15: "after 30 runs of mmig_full on the
tiny models in one server, the server's memory is within 10 % of what it was after the 3rd").

One ComfyUI server with the pack runs workflows/mmig_full.api.json on the tiny models (devtools.run's swap and
shrink) RUNS times. Each run changes the input image's colour and the sampler's seed, so every node below the
loaders really runs again (the host serves an unchanged node from its cache) while the loaded models stay, as in a
user's session. After each run the server process's resident memory (VmRSS, /proc) is read.
Keys: `rss_mb` (after each run), `rss_after_3rd_mb`, `rss_after_last_mb`, `last_over_3rd` (the bound is 1.10),
`peak_mb` (VmHWM), `seconds_per_run_median`.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from bench._common import median, write_result
from devtools.host import HostServer
from devtools.run import run_workflow
from devtools.tiny_models import ensure_tiny_models
from devtools.workflows import WORKFLOWS_DIR

RUNS = 30


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def varied(api: dict, i: int) -> dict:
    """The workflow with run i's image colour and seeds: each node below the loaders runs again."""
    graph = copy.deepcopy(api)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyImage":
            inputs["color"] = (inputs["color"] + 7919 * (i + 1)) % 0xFFFFFF
        if node["class_type"] == "KSampler":
            inputs["seed"] = inputs["seed"] + i + 1
    return graph


def main() -> None:
    api = json.loads((WORKFLOWS_DIR / "mmig_full.api.json").read_text())
    rss, seconds = [], []
    with HostServer([ensure_tiny_models()], with_tiny_support=True) as host:
        failure = host.pack_import_failure()
        if failure:
            raise RuntimeError(f"the host failed to import the pack:\n{failure}")
        pid = host.proc.pid
        for i in range(RUNS):
            messages = []
            started = time.monotonic()
            code, _files = run_workflow(host, varied(api, i), tiny=True, log=messages.append)
            seconds.append(time.monotonic() - started)
            if code:
                raise RuntimeError(f"run {i + 1} of mmig_full failed:\n" + "\n".join(messages[-5:]))
            rss.append(status_kb(pid, "VmRSS") / 1024)
        peak = status_kb(pid, "VmHWM") / 1024
    result = {"runs": RUNS, "rss_mb": [round(v, 1) for v in rss], "rss_after_3rd_mb": round(rss[2], 1),
              "rss_after_last_mb": round(rss[-1], 1), "last_over_3rd": round(rss[-1] / rss[2], 4),
              "peak_mb": round(peak, 1), "seconds_per_run_median": round(median(seconds), 2)}
    write_result("soak", result, f"mmig_full x{RUNS} in one server: RSS after the 3rd run {rss[2]:.0f} MB, after "
                 f"the {RUNS}th {rss[-1]:.0f} MB ({result['last_over_3rd']:.3f}x; bound 1.10), peak {peak:.0f} MB")


if __name__ == "__main__":
    main()
