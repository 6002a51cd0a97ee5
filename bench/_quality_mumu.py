"""Quality part `mumu`: with an object's image in the prompt and no colour or shape in its text, the fraction of
generations whose object takes the reference image's colour (and shape), MUMU bundle against the text alone.

It needs a world MUMU bundle (the MUMU adapter and LoRAs trained by `python -m training mumu` on the world SDXL and
the world VLM) in devtools/world/weights/mumu/. None is trained yet (issue 17), and the world SDXL does not yet
follow its text (part t2i's denoiser_text_effect_*), so the part records why no figure is measured rather than
a figure from untrained weights.
"""
from __future__ import annotations

from pathlib import Path

BUNDLE = Path(__file__).resolve().parents[1] / "devtools" / "world" / "weights" / "mumu"


def run(n_seeds: int):
    if BUNDLE.is_dir() and any(BUNDLE.iterdir()):
        reason = (f"skipped: a world MUMU bundle exists in {BUNDLE} but this part's measurement is not written yet; "
                  f"no figure is reported rather than an unmeasured one")
    else:
        reason = (f"skipped: no world MUMU bundle ({BUNDLE} is missing: train it with `python -m training mumu` on "
                  f"the world SDXL and VLM)")
    return {"skipped": reason, "n_seeds": 0}, []
