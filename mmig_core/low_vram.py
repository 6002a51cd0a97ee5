"""Low-VRAM loading of the vision-language models: 8-bit (LLM.int8) and 4-bit (NF4) weights through bitsandbytes.

bitsandbytes is imported only when a quantization is chosen, and every way it cannot run is a clear error naming
what to do (no CUDA device, the package missing, a transformers without `BitsAndBytesConfig`, accelerate missing).
Only the language model is quantized: the vision tower, the projector/connector and the LM head keep the chosen
dtype (`modules_kept_unquantized`). They are a few percent of a VLM's weights, and quantizing the vision side costs
the most quality (the 4-bit VLM checkpoints published for Qwen2-VL or LLaVA keep them so too).

bitsandbytes weights cannot move between devices (transformers refuses `.to()` on such a model, and a raw
`nn.Module.to` would move packed uint8 weights without their quantization state): a quantized model is loaded on its
CUDA device and stays there. The host adapters (nodes/_loaded.py) hand it to the host's memory manager pinned, so
the host never offloads it.
"""
from __future__ import annotations

QUANTIZATIONS = ("none", "8-bit", "4-bit (nf4)")


class QuantizationUnavailable(RuntimeError):
    """A quantized load that cannot run here; the message says what to install or change."""


def _transformers_version() -> str:
    try:
        from importlib.metadata import version
        return version("transformers")
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


def require_quantization(quantization: str) -> None:
    """Raise QuantizationUnavailable (or ValueError for an unknown choice) unless `quantization` can run here.

    Checked in the order a user fixes them: a CUDA device (nothing installable helps without one), bitsandbytes,
    transformers' BitsAndBytesConfig, accelerate (transformers' bitsandbytes loader needs it)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "none":
        return
    import torch
    what = f"quantization '{quantization}'"
    if not torch.cuda.is_available():
        raise QuantizationUnavailable(
            f"{what} needs a CUDA GPU: bitsandbytes' 8-bit and 4-bit weights run on CUDA, and torch "
            f"{torch.__version__} sees none here (CUDA {torch.version.cuda or 'not built in'}). Set quantization to "
            f"none; dtype bf16 or fp16 halves the memory of fp32.")
    try:
        import bitsandbytes  # noqa: F401 - lazily, only for a quantized load
    except ImportError as e:
        raise QuantizationUnavailable(
            f"{what} needs the bitsandbytes package, which is not installed: `pip install bitsandbytes` in the "
            f"Python that runs ComfyUI, then restart ComfyUI (or set quantization to none). ({e})") from None
    except Exception as e:  # noqa: BLE001 - bitsandbytes fails at import when its CUDA libraries do not load
        raise QuantizationUnavailable(
            f"{what}: bitsandbytes is installed but could not be imported ({type(e).__name__}: {e}). Reinstall a "
            f"bitsandbytes built for this CUDA (`pip install -U bitsandbytes`), or set quantization to none.") from None
    try:
        from transformers import BitsAndBytesConfig  # noqa: F401
    except ImportError:
        raise QuantizationUnavailable(
            f"{what} needs transformers' BitsAndBytesConfig, which the installed transformers "
            f"{_transformers_version()} lacks: `pip install -U transformers`, or set quantization to none.") from None
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise QuantizationUnavailable(
            f"{what} needs the accelerate package (transformers loads bitsandbytes weights through it): "
            f"`pip install accelerate`, or set quantization to none.") from None


def modules_kept_unquantized(model_class, config, decoder_of) -> list[str]:
    """The module names outside the language model's decoder stack (vision tower, projector, LM head, ...), read
    from the model built on the meta device (no memory, no weights): the names from_pretrained will see, in this
    transformers' layout. `decoder_of(model)` returns the decoder module (mmig_core.vlm.text_decoder).

    Each name is a sibling of a module on the path from the root to the decoder, e.g. LLaVA on transformers 5:
    ['lm_head', 'model.multi_modal_projector', 'model.vision_tower']. Only those that hold weights are listed."""
    import torch
    with torch.device("meta"):
        model = model_class.from_config(config)
    decoder = decoder_of(model)
    path = next(name for name, module in model.named_modules() if module is decoder)
    parts = path.split(".")
    kept = []
    for depth in range(len(parts)):
        parent_name = ".".join(parts[:depth])
        parent = model.get_submodule(parent_name) if parent_name else model
        for child_name, child in parent.named_children():
            if child_name != parts[depth] and next(child.parameters(), None) is not None:
                kept.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return sorted(kept)


def bnb_config(quantization: str, compute_dtype, keep_unquantized: list[str]):
    """transformers' BitsAndBytesConfig for `quantization`: 8-bit is LLM.int8 (outlier threshold 6.0, transformers'
    default); 4-bit is NF4 with double quantization (QLoRA's recipe) computing in `compute_dtype`.
    `keep_unquantized` (modules_kept_unquantized) stay in the load dtype."""
    from transformers import BitsAndBytesConfig
    if quantization == "8-bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep_unquantized))
    if quantization == "4-bit (nf4)":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=list(keep_unquantized))
    raise ValueError(f"no bitsandbytes config for quantization {quantization!r}")


def quantized_load_kwargs(quantization: str, model_class, config, compute_dtype, decoder_of) -> dict:
    """Extra from_pretrained arguments for a quantized load (none for 'none'): the config, and every module on the
    current CUDA device (bitsandbytes quantizes while the weights are placed there)."""
    require_quantization(quantization)
    if quantization == "none":
        return {}
    import torch
    keep = modules_kept_unquantized(model_class, config, decoder_of)
    return {"quantization_config": bnb_config(quantization, compute_dtype, keep),
            "device_map": {"": torch.cuda.current_device()}}
