"""Headless training of the pack's learned parts (adapter, MM-Adapter, MMSM, LoRAs, DiffRIR).

Runs without ComfyUI, on one machine or many through torch.distributed, and writes the same
safetensors files the pack's loader nodes read. Never imports `comfy`. Recipes land with the issues
that introduce each learned part; `python -m training <recipe> --config <file.yaml>` is the entry point.
"""
