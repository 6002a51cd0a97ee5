"""Writing benchmark results."""
import json
import statistics

from devtools.paths import CACHE_DIR


def write_result(name: str, result: dict, summary: str) -> None:
    out = CACHE_DIR / "bench" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench/{name}: {summary}  ({out})")


def median(values):
    return statistics.median(values)
