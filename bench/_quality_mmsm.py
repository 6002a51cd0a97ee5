"""Quality part `mmsm`: MMSM stage-1 trained against untrained (identity), on the world checkpoint, same seeds.

The figure this part is for: text-to-image on evaluation scenes 1_000_000 + i with the world MMSM (trained by
`python -m training mmig` stage 1 on the world checkpoint, the world VLM's describe hidden states as e_llm) patched
into the UNet through MMSM Apply's patch, against the same MMSM untrained (its zero-initialised decoder makes it the
identity), as the fraction of images whose objects match the caption (`devtools.world.score`).

It needs three things: the world SDXL checkpoint, the world VLM, and a world MMSM trained on them
(devtools/world/weights/mmsm/mmsm.safetensors). None of the three existed when this part was written (issue 17,
session 2026-12-02: the checkpoint and the VLM were being trained in parallel, and MMSM stage 1 trains on both),
so the part records which is missing ("skipped: ...") rather than a figure; it never reports a figure from the
random tiny models.
"""
from __future__ import annotations

from pathlib import Path

MMSM_WEIGHTS = Path(__file__).resolve().parents[1] / "devtools" / "world" / "weights" / "mmsm" / "mmsm.safetensors"
VLM_WEIGHTS = Path(__file__).resolve().parents[1] / "devtools" / "world" / "weights" / "vlm"


def missing() -> str | None:
    """Why the figure cannot be measured here, or None when everything it needs exists."""
    from bench._quality_layered import world_checkpoint
    path, reason = world_checkpoint()
    if path is None:
        return reason
    if not VLM_WEIGHTS.is_dir() or not any(VLM_WEIGHTS.iterdir()):
        return f"skipped: no world VLM ({VLM_WEIGHTS} is missing), so no e_llm for MMSM"
    if not MMSM_WEIGHTS.is_file():
        return (f"skipped: no trained world MMSM ({MMSM_WEIGHTS} is missing: train it with "
                f"`python -m training mmig` stage 1 on the world checkpoint and VLM)")
    return ("skipped: a world MMSM exists but this part's measurement is not written yet (issue 17 follow-up); "
            "no figure is reported rather than an unmeasured one")


def run(n_seeds: int):
    return {"skipped": missing(), "n_seeds": 0}, []
