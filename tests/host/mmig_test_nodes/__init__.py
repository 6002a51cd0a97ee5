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


class MMIGTest_ImageChannels:
    """An IMAGE with 1, 2 or 4 channels (grey, grey+alpha, RGBA), which no host node outputs."""
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "channels": ("INT", {"default": 1, "min": 1, "max": 4})}}

    def make(self, image, channels):
        grey = image.mean(dim=-1, keepdim=True)
        alpha = torch.ones_like(grey)
        return ({1: grey, 2: torch.cat([grey, alpha], -1), 3: image, 4: torch.cat([image, alpha], -1)}[channels],)


NODE_CLASS_MAPPINGS = {"MMIGTest_EmptyImageBatch": MMIGTest_EmptyImageBatch}
NODE_CLASS_MAPPINGS["MMIGTest_ImageChannels"] = MMIGTest_ImageChannels
NODE_DISPLAY_NAME_MAPPINGS = {}


class MMIGTest_ConditioningInfo:
    """Reports a CONDITIONING's shapes, extra keys and per-item means, to check the pack's conditioning."""
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}

    def report(self, conditioning):
        info = []
        for cond, extra in conditioning:
            pooled = extra.get("pooled_output")
            info.append({"shape": list(cond.shape), "means": cond.float().mean(dim=(1, 2)).tolist(),
                         "pooled_shape": list(pooled.shape) if pooled is not None else None,
                         "extra": {k: v for k, v in extra.items() if isinstance(v, (int, float, str))}})
        return {"ui": {"conditioning": info}}


NODE_CLASS_MAPPINGS["MMIGTest_ConditioningInfo"] = MMIGTest_ConditioningInfo


class MMIGTest_WeightValues:
    """Reports a MODEL's weights as sampling sees them (its patches applied), for named keys."""
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "keys": ("STRING", {"default": ""})}}

    def report(self, model, keys):
        # Load it as sampling does: the host unpatches any clone sharing the weights, then patches this one.
        import comfy.model_management
        comfy.model_management.load_models_gpu([model])
        state = model.model_state_dict()
        values = {}
        for key in filter(None, (k.strip() for k in keys.split(","))):
            weight = state[key].detach().float().cpu()
            values[key] = {"shape": list(weight.shape), "values": weight.flatten().tolist()}
        return {"ui": {"weights": [values], "patched_keys": [len(model.patches)]}}


NODE_CLASS_MAPPINGS["MMIGTest_WeightValues"] = MMIGTest_WeightValues


class MMIGTest_NonFinite:
    """Non-finite values no widget gives: the image with one pixel set to `value` ("nan", "inf", "-inf"), a mask
    of ones with one such value, the number itself (for a linked FLOAT input) and a latent like the image's."""
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ("IMAGE", "MASK", "FLOAT", "LATENT")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "value": ("STRING", {"default": "nan"})}}

    def make(self, image, value):
        number = float(value)
        bad_image = image.clone()
        bad_image[0, 0, 0, 0] = number
        mask = torch.ones(image.shape[:3])
        mask[0, 0, 0] = number
        latent = torch.zeros(image.shape[0], 4, image.shape[1] // 8, image.shape[2] // 8)
        latent[0, 0, 0, 0] = number
        return (bad_image, mask, number, {"samples": latent})


NODE_CLASS_MAPPINGS["MMIGTest_NonFinite"] = MMIGTest_NonFinite

from .vlm_info import NODES as _VLM_INFO_NODES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_VLM_INFO_NODES)

from .memory_info import NODES as _MEMORY_NODES  # noqa: E402

NODE_CLASS_MAPPINGS.update(_MEMORY_NODES)
