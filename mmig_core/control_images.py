"""Control images of a whole picture (MUMU §5 stage 1): canny edges, a sketch, or a depth map.

MUMU inserts one of these into 30 % of its stage-1 prompts so the model learns to combine structure from one
image with content from others; at test time a user feeds the same kind of image. Every function takes and
returns an [H, W, 3] float image in 0..1 (the `MMPrompt` convention). kornia and transformers are imported
inside the functions: importing this module stays cheap.

- canny:  white edges on black (kornia's Canny with hysteresis).
- sketch: dark strokes on white, from the Sobel gradient magnitude: a line drawing without a learned
          sketch model ([58] in the paper is a learned one; none ships offline).
- depth:  needs a depth-estimation model (`load_depth_model`, a local Hugging Face folder such as
          Depth Anything); near is bright, normalised per image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

CONTROL_KINDS = ("canny", "sketch", "depth")


def _to_batch(image: torch.Tensor) -> torch.Tensor:
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {tuple(image.shape)}")
    return image.permute(2, 0, 1)[None].float()


def _gray3(single: torch.Tensor) -> torch.Tensor:
    """[1, 1, H, W] -> [H, W, 3]."""
    return single[0, 0].clamp(0, 1)[..., None].expand(-1, -1, 3).contiguous()


def canny_image(image: torch.Tensor, low: float = 0.1, high: float = 0.2) -> torch.Tensor:
    from kornia.color import rgb_to_grayscale
    from kornia.filters import canny
    _magnitude, edges = canny(rgb_to_grayscale(_to_batch(image)), low_threshold=low, high_threshold=high)
    return _gray3(edges)


def sketch_image(image: torch.Tensor, strength: float = 4.0) -> torch.Tensor:
    from kornia.color import rgb_to_grayscale
    from kornia.filters import gaussian_blur2d, sobel
    gray = gaussian_blur2d(rgb_to_grayscale(_to_batch(image)), (3, 3), (0.8, 0.8))
    strokes = (sobel(gray) * strength).clamp(0, 1)
    return _gray3(1.0 - strokes)


@dataclass
class DepthModel:
    model: Any
    processor: Any


def load_depth_model(folder: str | os.PathLike) -> DepthModel:
    """A local depth-estimation folder (config, image processor, safetensors); no network, no remote code."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from .model_files import from_pretrained_strict, require_hf_folder
    path = require_hf_folder(folder, kind="depth-estimation",
                             source_hint="e.g. `huggingface-cli download depth-anything/Depth-Anything-V2-Small-hf "
                                         "--local-dir models/depth/depth-anything-small`.")
    model = from_pretrained_strict(AutoModelForDepthEstimation, path, torch.float32)
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return DepthModel(model.eval(), processor)


@torch.no_grad()
def depth_image(image: torch.Tensor, depth: DepthModel) -> torch.Tensor:
    from PIL import Image
    h, w = image.shape[:2]
    pil = Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), "RGB")
    device = next(depth.model.parameters()).device
    inputs = {k: v.to(device) for k, v in depth.processor(images=pil, return_tensors="pt").items()}
    predicted = depth.model(**inputs).predicted_depth.float().cpu()  # [1, h', w']
    predicted = torch.nn.functional.interpolate(predicted[:, None], size=(h, w), mode="bilinear", align_corners=False)
    low, high = predicted.amin(), predicted.amax()
    return _gray3((predicted - low) / (high - low).clamp_min(1e-6))


def control_image(image: torch.Tensor, kind: str, depth: DepthModel | None = None) -> torch.Tensor:
    if kind == "canny":
        return canny_image(image)
    if kind == "sketch":
        return sketch_image(image)
    if kind == "depth":
        if depth is None:
            raise ValueError("a depth control image needs a depth model (load_depth_model)")
        return depth_image(image, depth)
    raise ValueError(f"unknown control image kind {kind!r}; choose one of {', '.join(CONTROL_KINDS)}")
