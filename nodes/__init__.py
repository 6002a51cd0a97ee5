"""Thin ComfyUI adapters, one file per component. Each file exports its own mappings."""
from . import blip2, encoder, diffrir, dem, editing, lora, mmsm
from ._checks import check_node_inputs
from ._host import register_model_folders

register_model_folders()

_COMPONENTS = (blip2, encoder, diffrir, dem, editing, lora, mmsm,)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _component in _COMPONENTS:
    NODE_CLASS_MAPPINGS.update(_component.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_component.NODE_DISPLAY_NAME_MAPPINGS)

# Every FLOAT input finite, every IMAGE/MASK/LATENT free of NaN/Inf: checked once here for all nodes.
check_node_inputs(NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS)
