"""Test-only ComfyUI nodes: inputs no shipped node can produce, to test the pack's bad-input errors."""
import torch


class MMIGTest_EmptyImageBatch:
    """An IMAGE batch with zero images."""
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 64, "min": 1}), "height": ("INT", {"default": 64, "min": 1})}}

    def make(self, width, height):
        return (torch.zeros(0, height, width, 3),)


NODE_CLASS_MAPPINGS = {"MMIGTest_EmptyImageBatch": MMIGTest_EmptyImageBatch}
NODE_DISPLAY_NAME_MAPPINGS = {}
