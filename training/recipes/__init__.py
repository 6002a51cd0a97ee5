"""Training recipes: `python -m training <name> --config <file.yaml>`. Each module follows `training/recipe.py`."""
from __future__ import annotations

import importlib

RECIPES = {
    "mmig": "training.recipes.mmig",  # MMIG's five stages (§3.5, Eq. 22)
    "mumu": "training.recipes.mumu",  # MUMU's LoRA + adapter training (§5)
    "diffrir": "training.recipes.diffrir",  # LLMGA's DiffRIR restoration network (§3.4)
}


def load_recipe(name: str):
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}")
    return importlib.import_module(RECIPES[name])
