"""Running DiffRIR on images of any size: input checks, padding, tiling with blending, paste-back.

Memory stays flat as images grow: the network only ever sees one tile, and no full-size
intermediate is built besides the output itself.

- As the official inference script does (`inference_diffrir.py`): the mask is binarised at 0.5 (unless
  the caller asks for the soft mask), the network sees the image reflect-padded at the bottom/right to a
  multiple of 32 (`config.multiple`), and the output is cropped back and pasted onto the reference.
- The prior (one 256-d vector per image) is computed on that whole padded image: CPEN's pre-pooling
  features are summed tile by tile, each tile read with enough context around it (CPEN's receptive
  field) that the sum is exactly the untiled one (up to float summation order). With `tile=0` the
  restoration is the official script's computation.
- The restorer runs on overlapping tiles on a grid. Each tile is reflect-padded to the network's
  multiple; tile outputs are blended with linear ramps across the overlaps. The ramps are separable,
  so their normaliser is the outer product of two 1-D sums and needs no full-size weight map.
- Restormer's channel attention pools statistics over the whole tile, so tiled and untiled outputs
  differ slightly where image statistics differ between tiles (see tests for the tolerance).
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from ..interrupt import interruptible
from .network import DiffRIR, PriorEncoder

log = logging.getLogger(__name__)


class DiffRIRInputError(ValueError):
    """Images, reference or mask that cannot go together; the message says what to connect instead."""


def to_rgb(images: torch.Tensor, what: str) -> torch.Tensor:
    """A [B, H, W, C] IMAGE as 3 channels: grey is replicated, RGBA loses its alpha; others are refused."""
    if images.ndim != 4:
        raise DiffRIRInputError(f"{what} must be an IMAGE batch [B, H, W, C]; got shape {list(images.shape)}.")
    channels = images.shape[-1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, -1, -1, 3)
    if channels == 4:
        log.warning("DiffRIR: %s has an alpha channel; it is ignored (the RGB channels are restored).", what)
        return images[..., :3]
    raise DiffRIRInputError(f"{what} has {channels} channels; DiffRIR restores RGB images (3 channels; "
                            f"1-channel grey and 4-channel RGBA are converted). Convert it to RGB first.")


def check_inputs(generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor):
    """Validate and bring to [B, H, W, 3] / [B, H, W, 3] / [B, H, W]; a batch of 1 is broadcast."""
    generated = to_rgb(generated, "The generated image")
    reference = to_rgb(reference, "The reference image")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise DiffRIRInputError(f"The mask must be a MASK [B, H, W]; got shape {list(mask.shape)}.")
    batch, height, width = generated.shape[:3]
    if batch == 0:
        raise DiffRIRInputError("The generated IMAGE batch is empty: connect a node that outputs an image.")
    if tuple(reference.shape[1:3]) != (height, width):
        raise DiffRIRInputError(
            f"The reference image is {reference.shape[2]}x{reference.shape[1]} but the generated image is "
            f"{width}x{height}: the reference must be the image the generated one was painted from, at the "
            f"same size (for outpainting, the output of Pad Image for Outpainting).")
    if tuple(mask.shape[1:]) != (height, width):
        raise DiffRIRInputError(
            f"The mask is {mask.shape[2]}x{mask.shape[1]} but the generated image is {width}x{height}: use the "
            f"mask that went into the inpainting (for outpainting, the one from Pad Image for Outpainting).")
    for name, tensor in (("reference image", reference), ("mask", mask)):
        if tensor.shape[0] not in (1, batch):
            raise DiffRIRInputError(
                f"The {name} batch has {tensor.shape[0]} entries but the generated batch has {batch}: give "
                f"one {name} for all images, or one per image.")
    return generated, reference.expand(batch, -1, -1, -1), mask.expand(batch, -1, -1)


def check_tile_size(model: DiffRIR, tile: int) -> None:
    """Refuse tiles below the network's padding multiple: each tile is padded up to it anyway, so a smaller one
    costs as much and covers less (tile_size 1 meant thousands of tiles, minutes for a 64 px image)."""
    minimum = model.config.multiple
    if tile < 0 or 0 < tile < minimum:
        raise DiffRIRInputError(f"tile_size {tile} is below DiffRIR's working minimum of {minimum} px (the network "
                                f"pads every tile to a multiple of {minimum}): set tile_size to 0 (the whole image "
                                f"at once) or to {minimum} or more, e.g. 512.")


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile starts covering [0, length) with at least `overlap` between neighbours."""
    if tile <= 0 or length <= tile:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def ramp_weights(starts: list[int], tile: int, length: int) -> list[torch.Tensor]:
    """1-D blending weights per tile: 1 inside, linear ramps across the overlaps with its neighbours."""
    weights = []
    for i, start in enumerate(starts):
        end = min(start + tile, length)
        w = torch.ones(end - start, dtype=torch.float32)
        pos = torch.arange(start, end, dtype=torch.float32) + 0.5
        if i > 0 and starts[i - 1] + tile > start:
            band = starts[i - 1] + tile - start
            w = torch.minimum(w, ((pos - start) / band).clamp(max=1))
        if i + 1 < len(starts) and starts[i + 1] < end:
            band = end - starts[i + 1]
            w = torch.minimum(w, ((end - pos) / band).clamp(max=1))
        weights.append(w)
    return weights


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """The official script's mask: 1 where mask >= 0.5, else 0."""
    return (mask >= 0.5).to(mask.dtype)


def padded_indices(length: int, multiple: int) -> torch.Tensor:
    """Source index of each position of [0, length) padded at its end to a multiple (reflect, else replicate).

    The same rule as `pad_to_multiple`: reflect (as the official `pad_test`) where the pad is shorter than
    the side, replicate for the tiny sides where reflection is impossible.
    """
    pad = (-length) % multiple
    index = torch.arange(length + pad)
    if pad:
        index[length:] = 2 * (length - 1) - index[length:] if pad < length else length - 1
    return index


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to multiples: reflect (the official `pad_test`) where the side allows, else replicate."""
    height, width = x.shape[-2:]
    if not (-height) % multiple and not (-width) % multiple:
        return x
    rows, cols = padded_indices(height, multiple).to(x.device), padded_indices(width, multiple).to(x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _stacked_input(model: DiffRIR, generated, reference, mask, rows, cols, dtype, device):
    """The network input for one window of a [C, H, W] image (rows/cols: slices or index tensors)."""
    def window(x):
        x = x[..., rows, :] if isinstance(rows, slice) else x.index_select(-2, rows.to(x.device))
        return x[..., cols] if isinstance(cols, slice) else x.index_select(-1, cols.to(x.device))
    g = window(generated)[None].to(device=device, dtype=dtype)
    r = window(reference)[None].to(device=device, dtype=dtype)
    m = window(mask)[None, None].to(device=device, dtype=dtype)
    return model.make_input(g, r, m)


def compute_prior(model: DiffRIR, generated, reference, mask, *, tile: int, generator=None,
                  check_interrupt: Callable[[], None] | None = None):
    """The image's prior vector, from CPEN features summed exactly over core tiles with context halos.

    CPEN sees the image padded as the official script pads it (to `config.multiple`, reflect).
    """
    config, device = model.config, next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    u = config.unshuffle
    height, width = generated.shape[-2:]
    row_index, col_index = padded_indices(height, config.multiple), padded_indices(width, config.multiple)
    padded_h, padded_w = len(row_index), len(col_index)
    halo = math.ceil(PriorEncoder.receptive_radius(config) / u) * u
    # Windows of core + context stay within about one tile, so memory is bounded by the tile size alone.
    core = max(u, (max(tile // 2, tile - halo) // u) * u) if tile > 0 else max(padded_h, padded_w)
    total = None
    for top in range(0, padded_h, core):
        for left in range(0, padded_w, core):
            if check_interrupt:
                check_interrupt()
            y0, x0 = max(0, top - halo), max(0, left - halo)
            y1, x1 = min(padded_h, top + core + halo), min(padded_w, left + core + halo)
            x = _stacked_input(model, generated, reference, mask, row_index[y0:y1], col_index[x0:x1], dtype, device)
            feats = model.prior_encoder.features(x)
            cy, cx = (top - y0) // u, (left - x0) // u
            ch, cw = min(core, padded_h - top) // u, min(core, padded_w - left) // u
            part = feats[:, :, cy:cy + ch, cx:cx + cw].float().sum(dim=(2, 3))
            total = part if total is None else total + part
    pooled = (total / ((padded_h // u) * (padded_w // u))).to(dtype)
    condition = model.prior_encoder.head(pooled)
    return model.prior_from_condition(condition, generator)


@torch.no_grad()
def restore_image(model: DiffRIR, generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, *,
                  tile: int = 512, overlap: int = 64, paste_back: bool = True, seed: int = 0,
                  check_interrupt: Callable[[], None] | None = None,
                  on_tile_done: Callable[[], None] | None = None) -> torch.Tensor:
    """Restore one image. generated/reference: [3, H, W] in 0..1, mask: [H, W] (1 = generated). Returns [3, H, W].

    The mask is used as given: `restore_images` binarises it first unless asked for the soft mask.
    """
    config = model.config
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    height, width = generated.shape[-2:]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    prior = compute_prior(model, generated, reference, mask, tile=tile, generator=generator,
                          check_interrupt=check_interrupt)
    tile_h = tile if 0 < tile < height else height
    tile_w = tile if 0 < tile < width else width
    overlap = max(0, min(overlap, tile // 2)) if tile > 0 else 0
    rows, cols = tile_starts(height, tile_h, overlap), tile_starts(width, tile_w, overlap)
    row_w, col_w = ramp_weights(rows, tile_h, height), ramp_weights(cols, tile_w, width)
    row_sum, col_sum = torch.zeros(height), torch.zeros(width)
    for start, w in zip(rows, row_w):
        row_sum[start:start + len(w)] += w
    for start, w in zip(cols, col_w):
        col_sum[start:start + len(w)] += w
    out = torch.zeros(config.image_channels, height, width, dtype=torch.float32)
    for top, wy in zip(rows, row_w):
        for left, wx in zip(cols, col_w):
            if check_interrupt:
                check_interrupt()
            h, w = len(wy), len(wx)
            x = _stacked_input(model, generated, reference, mask, slice(top, top + h), slice(left, left + w),
                               dtype, device)
            y = model.restorer(pad_to_multiple(x, config.multiple), prior)[0, :, :h, :w].float().cpu()
            weight = (wy / row_sum[top:top + h])[:, None] * (wx / col_sum[left:left + w])[None, :]
            out[:, top:top + h, left:left + w] += y * weight
            if on_tile_done:
                on_tile_done()
    out.clamp_(0, 1)
    if paste_back:  # out·M + reference·(1 − M), in place
        ref = reference.float()
        out.sub_(ref).mul_(mask.float()).add_(ref)
    return out


def restoration_tiles(height: int, width: int, tile: int, overlap: int) -> int:
    """How many restoration tiles `restore_image` runs for an image of this size (progress is counted in them)."""
    tile_h = tile if 0 < tile < height else height
    tile_w = tile if 0 < tile < width else width
    overlap = max(0, min(overlap, tile // 2)) if tile > 0 else 0
    return len(tile_starts(height, tile_h, overlap)) * len(tile_starts(width, tile_w, overlap))


def restore_images(model: DiffRIR, generated: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor, *,
                   tile: int = 512, overlap: int = 64, paste_back: bool = True, seed: int = 0,
                   soft_mask: bool = False, on_image_done: Callable[[int], None] | None = None,
                   check_interrupt: Callable[[], None] | None = None,
                   on_tile_done: Callable[[], None] | None = None) -> torch.Tensor:
    """ComfyUI layout in and out: IMAGE [B, H, W, C], MASK [B, H, W]; one image at a time; seed + i per image.

    soft_mask=False (the official script) binarises the mask at 0.5; True uses its values as they are,
    for the network's input and for the paste-back blend (the pack's own option, not DiffRIR's).
    """
    check_tile_size(model, tile)
    generated, reference, mask = check_inputs(generated, reference, mask)
    if not soft_mask:
        mask = binarize_mask(mask)
    results = []
    with interruptible(check_interrupt):  # per tile below, and per module inside a large tile
        for i in range(generated.shape[0]):
            out = restore_image(model, generated[i].permute(2, 0, 1), reference[i].permute(2, 0, 1), mask[i],
                                tile=tile, overlap=overlap, paste_back=paste_back, seed=seed + i,
                                check_interrupt=check_interrupt, on_tile_done=on_tile_done)
            results.append(out.permute(1, 2, 0))
            if on_image_done:
                on_image_done(i)
    return torch.stack(results)
