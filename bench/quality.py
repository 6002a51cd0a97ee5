"""The quality benchmark on the scene world (issue 17): what each trained world model gets right, against a baseline.

Each part is a module `bench/_quality_<part>.py` with

    def run(n_seeds: int) -> tuple[dict, list[tuple[str, np.ndarray]]]

returning (figures, up to 8 labelled uint8 HxWx3 sample images for the contact sheet). Figures are rates or ratios
over the evaluation seeds (1_000_000 + i, never trained on), method and baseline measured side by side on the same
seeds in one run. This harness imports every part present, runs it, and merges: a part that fails records its
error in the JSON instead of stopping the others.

    python -m bench.quality [--seeds N] [--parts blip2,vlm]

writes .cache/bench/quality.json and .cache/bench/quality_sheet.png (one labelled row of tiles per part).
`make bench` runs it with the default 50 seeds and prints one summary line, as the other benchmarks do.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import pkgutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from devtools.paths import CACHE_DIR

DEFAULT_SEEDS = 50
EVAL_SEED_BASE = 1_000_000  # world evaluation seeds: EVAL_SEED_BASE + i (training uses 0..99_999)
MAX_SAMPLES = 8
TILE = 128
LABEL_LINES = 6


def eval_seeds(n_seeds: int) -> list[int]:
    """The evaluation seeds every part scores on (the same for all parts, never trained on)."""
    return [EVAL_SEED_BASE + i for i in range(n_seeds)]


def part_names() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("_quality_"):] for m in pkgutil.iter_modules([str(here)])
                  if m.name.startswith("_quality_"))


def _clean(value):
    """JSON-safe figures: numpy scalars to Python, non-finite floats to strings (JSON has no inf/NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _check_samples(part: str, samples) -> list[tuple[str, np.ndarray]]:
    out = []
    for label, image in list(samples or [])[:MAX_SAMPLES]:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"part {part}: a sample image must be uint8 HxWx3, got {image.dtype} {image.shape}")
        out.append((str(label), image))
    return out


def run_part(part: str, n_seeds: int) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """{"figures", "seconds"} or {"error", "seconds"} for one part, and its samples (none on error)."""
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"bench._quality_{part}")
        figures, samples = module.run(n_seeds)
        if not isinstance(figures, dict):
            raise TypeError(f"run() must return (dict of figures, samples), got {type(figures).__name__}")
        samples = _check_samples(part, samples)
        return {"figures": _clean(figures), "seconds": round(time.perf_counter() - start, 1)}, samples
    except Exception as e:  # noqa: BLE001 - one broken part must not hide the others' figures
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8),
                "seconds": round(time.perf_counter() - start, 1)}, []


def merge(results: dict[str, dict]) -> dict:
    """Every part's figures in one flat table; a name two parts share is prefixed by its part."""
    flat: dict = {}
    counts: dict[str, int] = {}
    for result in results.values():
        for name in result.get("figures", {}):
            counts[name] = counts.get(name, 0) + 1
    for part, result in results.items():
        for name, value in result.get("figures", {}).items():
            flat[name if counts[name] == 1 else f"{part}.{name}"] = value
    return flat


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            while len(word) > width:  # a long word is cut, never allowed to run off the tile
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:width])
                word = word[width:]
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def contact_sheet(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], part_errors: dict[str, str] | None = None):
    """A PIL image: one row per part (its name at the left), each sample a TILE px tile with its label under it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    line_h, chars = 11, TILE // 6
    name_w = 90
    label_h = line_h * LABEL_LINES + 4
    row_h = TILE + label_h + 8
    columns = max([len(samples) for _, samples in rows] + [1])
    sheet = Image.new("RGB", (name_w + columns * (TILE + 6) + 4, max(1, len(rows)) * row_h + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (part, samples) in enumerate(rows):
        top = 4 + r * row_h
        for i, line in enumerate(_wrap(part, 14)[:3]):
            draw.text((4, top + 4 + i * line_h), line, fill="black", font=font)
        if not samples:
            note = part_errors.get(part) if part_errors else None
            for i, line in enumerate(_wrap(f"FAILED: {note}" if note else "(no samples)", 80)[:LABEL_LINES]):
                draw.text((name_w, top + 4 + i * line_h), line, fill="red" if note else "grey", font=font)
        for c, (label, image) in enumerate(samples):
            left = name_w + c * (TILE + 6)
            tile = Image.fromarray(image, "RGB")
            if tile.size != (TILE, TILE):
                tile = tile.resize((TILE, TILE), Image.NEAREST)
            sheet.paste(tile, (left, top))
            lines = _wrap(label, chars)
            if len(lines) > LABEL_LINES:
                lines = lines[:LABEL_LINES - 1] + [lines[LABEL_LINES - 1][:chars - 1] + "~"]
            for i, line in enumerate(lines):
                draw.text((left, top + TILE + 2 + i * line_h), line, fill="black", font=font)
    return sheet


def run_quality(n_seeds: int = DEFAULT_SEEDS, parts: list[str] | None = None,
                out_dir: Path | None = None) -> dict:
    """Run the parts, write quality.json and quality_sheet.png into `out_dir` (.cache/bench), return the JSON."""
    if n_seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {n_seeds}")
    available = part_names()
    chosen = available if not parts else parts
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"unknown quality part(s) {', '.join(unknown)}; the parts are {', '.join(available)} "
                         f"(bench/_quality_<part>.py)")
    out_dir = Path(out_dir) if out_dir is not None else CACHE_DIR / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    results, rows = {}, []
    for part in chosen:
        result, samples = run_part(part, n_seeds)
        results[part] = result
        rows.append((part, samples))
        status = result.get("error") or ", ".join(f"{k}={v}" for k, v in result["figures"].items()
                                                  if not isinstance(v, (dict, list)))
        print(f"  quality/{part} ({result['seconds']} s): {status}", flush=True)
    sheet_path = out_dir / "quality_sheet.png"
    contact_sheet(rows, {p: r["error"] for p, r in results.items() if "error" in r}).save(sheet_path)
    report = {"n_seeds": n_seeds, "eval_seeds": f"{EVAL_SEED_BASE}..{EVAL_SEED_BASE + n_seeds - 1}",
              "figures": merge(results), "parts": results, "sheet": str(sheet_path)}
    (out_dir / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary(report: dict) -> str:
    failed = [p for p, r in report["parts"].items() if "error" in r]
    shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in report["figures"].items() if isinstance(v, (int, float)))
    text = f"{len(report['parts'])} parts over {report['n_seeds']} eval seeds: {shown or 'no figures'}"
    return text + (f"; FAILED: {', '.join(failed)}" if failed else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="evaluation seeds per figure (default 50)")
    parser.add_argument("--parts", default="", help="comma-separated parts to run (default: all)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()] or None
    report = run_quality(args.seeds, parts)
    out = CACHE_DIR / "bench" / "quality.json"
    print(f"bench/quality: {summary(report)}  ({out}, {report['sheet']})")
    return 1 if any("error" in r for r in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
