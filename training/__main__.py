"""Command line: train a recipe, or plot a run's loss curves.

    python -m training <recipe> --config run.yaml [section.key=value ...] [--resume]
    torchrun --nproc_per_node=N -m training <recipe> --config run.yaml ...
    accelerate launch --num_processes N -m training <recipe> --config run.yaml ...
    python -m training plot <out_dir>/metrics.jsonl --out curves.png

<recipe> is one of training/recipes (mmig, mumu, diffrir) or the dotted module path of your own recipe
(a module with RecipeConfig and build, as training/recipe.py describes).
Exit codes: 0 done (or stopped cleanly by SIGTERM, resumable), 1 training failed, 2 bad config or data.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

USAGE_ERROR = 2


def load_recipe_module(name: str):
    from .recipes import RECIPES, load_recipe
    if name in RECIPES:
        return load_recipe(name)
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name.split(".")[0] and e.name != name:
            raise
        return load_recipe(name)  # says which recipes exist
    if not (hasattr(module, "RecipeConfig") and hasattr(module, "build")):
        raise SystemExit(f"{name} is not a recipe: it needs RecipeConfig and build (training/recipe.py)")
    return module


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s")


def plot_main(argv: list[str]) -> int:
    from .plot import plot_metrics
    parser = argparse.ArgumentParser(prog="python -m training plot", description="loss curves of a run as a PNG")
    parser.add_argument("metrics", help="a run's metrics.jsonl")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        path = plot_metrics(args.metrics, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        return plot_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0],
                                     epilog="`python -m training plot METRICS --out PNG` plots a run's loss curves")
    parser.add_argument("recipe", help="mmig, mumu, diffrir, or a dotted module path")
    parser.add_argument("--config", help="YAML file with `recipe:` and `train:` sections")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100 recipe.stage=2")
    parser.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/checkpoints/latest")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --config
    _setup_logging()

    from .checkpoint import CheckpointError
    from .config import ConfigError, load_config
    try:
        recipe_module = load_recipe_module(args.recipe)
    except SystemExit as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    from .engine import run
    try:
        recipe_config, train_config = load_config(recipe_module.RecipeConfig, args.config, args.overrides)
        result = run(recipe_module, recipe_config, train_config, resume=args.resume)
    except (ConfigError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except (CheckpointError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not result.completed:
        logging.getLogger("training").info("stopped at step %d of %d", result.step, train_config.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
