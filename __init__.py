"""ComfyUI-MMIG: multimodal image generation and editing nodes (MMIG, MUMU, LLMGA).

ComfyUI loads this package from `custom_nodes/` and reads the V1 node API below. Importing it is
cheap: heavy libraries (transformers, diffusers) are imported when a node first runs.
"""
try:
    import folder_paths  # noqa: F401  - always importable inside ComfyUI
except ImportError:  # imported outside ComfyUI (e.g. pytest collecting this folder): no nodes to offer
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# The frontend extension (web/js: text results shown on their nodes) and the node help the frontend's node
# library reads from /extensions/<pack>/docs/<node id>.md (web/docs).
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
