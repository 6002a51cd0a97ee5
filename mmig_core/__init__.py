"""Host-agnostic PyTorch core of ComfyUI-MMIG.

Every algorithm of the pack lives here once; `nodes/` (ComfyUI adapters) and `training/`
(headless recipes) import it. This package never imports `comfy`, and importing it is cheap:
heavy libraries (transformers, diffusers) are imported inside the functions that need them.
"""
