"""L_BLIP2 (MMIG Eq. 22): BLIP-2's captioning loss on a generated image, differentiable in the image.

    L_BLIP2 = -1/S sum_s log p_BLIP2(d_s | I, d_{<s})

the mean next-token cross-entropy of the target caption d given the image I, from a frozen BLIP-2 (the same
model MMIG Eq. 4 captions the result with). The image goes through the processor's resize and normalisation
as tensor operations (bicubic with antialiasing; the processor's own path goes through PIL and stops the
gradient), so the loss back-propagates into whatever produced the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blip2 import Blip2Captioner


def pixel_values(captioner: Blip2Captioner, images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in 0..1 -> the vision tower's normalised input, differentiably."""
    processor = captioner.processor.image_processor
    size = processor.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    resized = F.interpolate(images.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(processor.image_mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, device=images.device).view(1, 3, 1, 1)
    return ((resized - mean) / std).to(captioner.dtype)


def caption_loss(captioner: Blip2Captioner, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Mean over the batch of each caption's mean token cross-entropy given its image."""
    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    processor = captioner.processor
    tokenizer = processor.tokenizer
    placeholder = [torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()] * len(captions)  # only its token layout is used
    inputs = processor(images=placeholder, text=list(captions), return_tensors="pt", padding=True)
    input_ids = inputs["input_ids"].to(captioner.device)
    attention_mask = inputs["attention_mask"].to(captioner.device)
    caption_ids = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    logits = captioner.model(pixel_values=pixel_values(captioner, images), input_ids=input_ids,
                             attention_mask=attention_mask).logits
    logits = logits[:, -input_ids.shape[1]:]  # older versions prepend the query outputs to the logits
    losses = []
    for i, ids in enumerate(caption_ids):
        # the caption is the row's last len(ids) real tokens, whichever side is padded: position p predicts p + 1
        positions = attention_mask[i].nonzero()[:, 0][-len(ids):] if ids else None
        if positions is None or positions[0] < 1:
            raise ValueError(f"caption {i} is empty or does not fit BLIP-2's input")
        losses.append(F.cross_entropy(logits[i, positions - 1].float(), input_ids[i, positions]))
    return torch.stack(losses).mean()
