"""Test-only node that reports where the pack's loaded models are, from the host's own bookkeeping.

MMIGTest_PackModelMemory takes any of the pack's model values, remembers them (weakly, so it keeps nothing
alive and the host's /free can drop them), and reports for every model it has seen: whether the host lists
it among its loaded models (comfy.model_management.current_loaded_models), the devices its weights and
buffers are on, and the patcher's load and offload devices. `after_*` inputs only order it after the nodes
that use the models.
"""
import weakref

_SEEN = {}  # name -> (weakref to the ModelPatcher or None, weakref to the torch module)


def _patcher_entries():
    import comfy.model_management
    entries = []
    for loaded in comfy.model_management.current_loaded_models:
        model = loaded.model  # the patcher (a property on newer hosts, which may be None once collected)
        if model is not None:
            entries.append(model)
    return entries


def _describe(name, patcher_ref, module_ref):
    patcher = patcher_ref() if patcher_ref is not None else None
    module = module_ref()
    loaded = _patcher_entries()
    info = {"name": name, "alive": module is not None}
    if module is not None:
        tensors = list(module.parameters()) + list(module.buffers())
        info["devices"] = sorted({str(t.device) for t in tensors})
        info["dtypes"] = sorted({str(t.dtype) for t in tensors if t.is_floating_point()})
    if patcher is not None:
        info["load_device"] = str(patcher.load_device)
        info["offload_device"] = str(patcher.offload_device)
        info["in_loaded_models"] = any(p is patcher or getattr(p, "model", None) is patcher.model for p in loaded)
        info["patcher_class"] = type(patcher).__name__
    else:
        # No patcher of its own (an MMSM on hosts without additional models): listed when a loaded patcher
        # carries it in its model options.
        info["in_loaded_models"] = False
    return info


class MMIGTest_PackModelMemory:
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"nonce": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})},
                "optional": {"vlm": ("MMIG_VLM",), "adapter": ("MMIG_ADAPTER",), "blip2": ("MMIG_BLIP2",),
                             "diffrir": ("MMIG_DIFFRIR",), "mmsm": ("MMIG_MMSM",),
                             "after_image": ("IMAGE",), "after_latent": ("LATENT",), "after_string": ("STRING",),
                             "after_conditioning": ("CONDITIONING",)}}

    def report(self, nonce, vlm=None, adapter=None, blip2=None, diffrir=None, mmsm=None, **_after):
        values = {"vlm": (vlm, "vlm"), "adapter": (adapter, "adapter"), "blip2": (blip2, "captioner"),
                  "diffrir": (diffrir, "model"), "mmsm": (mmsm, "mmsm")}
        for name, (value, field) in values.items():
            if value is None:
                continue
            patcher = getattr(value, "patcher", None)
            module = patcher.model if patcher is not None else getattr(value, field)
            _SEEN[name] = (weakref.ref(patcher) if patcher is not None else None, weakref.ref(module))
        return {"ui": {"memory": [_describe(name, *refs) for name, refs in sorted(_SEEN.items())]}}


NODES = {"MMIGTest_PackModelMemory": MMIGTest_PackModelMemory}


def _digest(tensor, limit=4096):
    """dtype, shape, whether every value is finite, and up to `limit` values (evenly strided) as float32."""
    import torch
    flat = tensor.detach().flatten()
    stride = max(1, -(-flat.numel() // limit))
    return {"dtype": str(tensor.dtype), "shape": list(tensor.shape), "finite": bool(torch.isfinite(flat).all()),
            "values": flat[::stride].float().cpu().tolist()}


class MMIGTest_TensorDigest:
    """The values of a CONDITIONING (tokens, pooled), LATENT, IMAGE or MMIG_LLM_EMBEDS, to compare two runs."""
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"conditioning": ("CONDITIONING",), "latent": ("LATENT",),
                                             "image": ("IMAGE",), "llm_embeds": ("MMIG_LLM_EMBEDS",)}}

    def report(self, conditioning=None, latent=None, image=None, llm_embeds=None):
        out = {}
        if conditioning is not None:
            out["tokens"] = _digest(conditioning[0][0])
            pooled = conditioning[0][1].get("pooled_output")
            if pooled is not None:
                out["pooled"] = _digest(pooled)
        if latent is not None:
            out["latent"] = _digest(latent["samples"])
        if image is not None:
            out["image"] = _digest(image)
        if llm_embeds is not None:
            out["llm_embeds"] = _digest(llm_embeds.hidden_states)
        return {"ui": {"digest": [out]}}


NODES["MMIGTest_TensorDigest"] = MMIGTest_TensorDigest


class MMIGTest_StorageDtypeCompute:
    """A clone of the MODEL that computes in the dtype its weights are stored in (bf16 under --bf16-unet).

    On a CPU the host stores --bf16-unet weights in bf16 but computes in fp32 (manual cast: it never picks bf16
    compute on a CPU); on a GPU it computes in bf16. Turning the manual cast off on the clone gives the GPU's
    bf16 arithmetic on this CPU machine, so the pack's patches meet bf16 activations as they would there."""
    CATEGORY = "MMIG/testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        patched = model.clone()
        patched.add_object_patch("manual_cast_dtype", None)
        return (patched,)


NODES["MMIGTest_StorageDtypeCompute"] = MMIGTest_StorageDtypeCompute
