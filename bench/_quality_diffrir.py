"""Quality part `diffrir`: does the world DiffRIR remove inpainting/outpainting seams, against colour transfer?

On evaluation scenes 1_000_000 + i (never trained on), each with a synthetic seam (`devtools.world.seams`:
a redrawn region with a colour/brightness shift, a feathered edge, blur + noise along its boundary), the
seam-band error (mean absolute error against the clean scene, 8-bit levels, over the redrawn pixels within
6 px of a kept pixel) is measured before and after restoration, on the same seeds side by side:
- `diffrir_seam_error_after_over_before`: the committed world DiffRIR (devtools/world/weights/diffrir/),
  loaded by `mmig_core.diffrir.load_diffrir` and run by `restore_images`, the functions MMIG DiffRIR Loader
  and Restore call, with the Restore node's defaults (tile_size 512, overlap 64, paste_back on, seed 0;
  a 128 px scene is one tile at 512);
- `diffrir_tiled64_seam_error_after_over_before`: the same at tile_size 64, overlap 16 (a 3x3 tile grid),
  so the tiled path is scored too;
- `colour_transfer_seam_error_after_over_before`: the baseline, the region's per-channel mean and std matched
  to the kept pixels within 8 px of it;
- `mean_shift_seam_error_after_over_before`: a gentler baseline, the mean alone matched.
Each ratio is (sum of per-scene errors after) / (sum before); below 1 is better. `*_region_*` are the same
over the whole redrawn region. `diffrir_beats_colour_transfer_rate`: scenes where DiffRIR's band error is lower.
"""
from __future__ import annotations

import numpy as np

EVAL_SEED_BASE = 1_000_000
NODE_TILE, NODE_OVERLAP = 512, 64  # MMIG DiffRIR Restore's defaults
SMALL_TILE, SMALL_OVERLAP = 64, 16
SAMPLE_SCENES = (0, 3)


def mean_shift(seamed, mask, ring=None):
    """The region's per-channel mean matched to its surroundings' (no std scaling)."""
    from devtools.world import seams
    region, around = mask >= 0.5, seams.surroundings(mask, ring or seams.RING)
    out = seamed.clone()
    for c in range(seamed.shape[0]):
        out[c][region] = (seamed[c][region] - seamed[c][region].mean() + seamed[c][around].mean()).clamp(0, 1)
    return out


def restore(model, seamed, clean, mask, tile=NODE_TILE, overlap=NODE_OVERLAP):
    """As MMIG DiffRIR Restore runs it: IMAGE [1, H, W, 3], reference = the clean scene, MASK [1, H, W]."""
    from mmig_core.diffrir import restore_images
    out = restore_images(model, seamed.permute(1, 2, 0)[None], clean.permute(1, 2, 0)[None], mask[None],
                         tile=tile, overlap=overlap, paste_back=True, seed=0)
    return out[0].permute(2, 0, 1)


def _uint8(x) -> np.ndarray:
    return (x.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def run(n_seeds: int):
    import torch

    from devtools.world import seams
    from devtools.world.train_diffrir import weights_path
    from mmig_core.diffrir import load_diffrir

    torch.set_num_threads(1)
    model = load_diffrir(weights_path())  # fp32 on the CPU, as the loader node's "auto"
    methods = ("diffrir", "diffrir_tiled64", "colour_transfer", "mean_shift")
    band = {m: [] for m in ("before",) + methods}
    region = {m: [] for m in ("before",) + methods}
    samples = []
    for i in range(n_seeds):
        seamed, clean, mask = seams.eval_sample(i)
        outputs = {"before": seamed,
                   "diffrir": restore(model, seamed, clean, mask),
                   "diffrir_tiled64": restore(model, seamed, clean, mask, SMALL_TILE, SMALL_OVERLAP),
                   "colour_transfer": seams.colour_transfer(seamed, mask),
                   "mean_shift": mean_shift(seamed, mask)}
        for name, image in outputs.items():
            band[name].append(seams.band_error(image, clean, mask))
            region[name].append(seams.region_error(image, clean, mask))
        if i in SAMPLE_SCENES:  # 4 tiles each: the sheet shows square tiles
            for label, image in (("seamed", seamed), ("DiffRIR", outputs["diffrir"]),
                                 ("colour transfer", outputs["colour_transfer"]), ("clean", clean)):
                samples.append((f"{EVAL_SEED_BASE + i} {label}", _uint8(image)))
    before_band, before_region = sum(band["before"]), sum(region["before"])
    figures = {"n_seeds": n_seeds, "weights": str(weights_path().name),
               "seam_band_error_before": before_band / n_seeds}
    for name in methods:
        figures[f"{name}_seam_error_after_over_before"] = sum(band[name]) / before_band
        figures[f"{name}_region_error_after_over_before"] = sum(region[name]) / before_region
    figures["diffrir_beats_colour_transfer_rate"] = float(np.mean(
        [d < c for d, c in zip(band["diffrir"], band["colour_transfer"])]))
    figures["diffrir_improves_rate"] = float(np.mean([d < b for d, b in zip(band["diffrir"], band["before"])]))
    return figures, samples
