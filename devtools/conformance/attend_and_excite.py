"""Attend-and-Excite facts from the original code (yuval-alaluf/Attend-and-Excite), for
tests/conformance/test_conformance_attend_and_excite.py:

- defaults.json: RunConfig's defaults (config.py) and the refinement's iteration cap (the default of
  AttendAndExcitePipeline._perform_iterative_refinement_step), read from the reference's own objects;
- maps.safetensors: fixed random cross-attention probabilities of three layers at 4x4 (inputs), and what
  the reference's own ptp_utils.aggregate_attention, AttendAndExcitePipeline._compute_max_attention_per_index
  (with smoothing, as run.py calls it) and _compute_loss make of them; and its GaussianSmoothing kernel.

The reference imports libraries it does not need for these functions (cv2, IPython) and names that
newer diffusers/transformers moved; those are stubbed for the import only. Its smoothing module is
moved with `.cuda()`, which is made a no-op while it runs on the CPU here.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

from . import importable

REFERENCE = "yuval-alaluf/Attend-and-Excite"
LAYERS, HEADS, RES, TOKENS = 3, 2, 4, 77
INDICES = [2, 5]


@contextlib.contextmanager
def _stubbed_imports():
    """Modules and names the reference imports at module level but never uses in the functions run here."""
    import diffusers.utils
    import transformers

    added_modules = {}
    for name in ("cv2", "IPython", "IPython.display", "diffusers.models.cross_attention"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.display = module.CrossAttention = object
            added_modules[name] = sys.modules[name] = module
    added_attrs = []
    for owner, name, value in ((diffusers.utils, "randn_tensor", None), (transformers, "CLIPFeatureExtractor", object)):
        if not hasattr(owner, name):
            setattr(owner, name, value)
            added_attrs.append((owner, name))
    cuda = torch.nn.Module.cuda
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.nn.Module.cuda = cuda
        for owner, name in added_attrs:
            delattr(owner, name)
        for name in added_modules:
            sys.modules.pop(name, None)
        for name in ("config", "pipeline_attend_and_excite", "utils", "utils.ptp_utils", "utils.gaussian_smoothing"):
            sys.modules.pop(name, None)  # the reference's top-level names, not ours


def regenerate(reference: Path, out: Path) -> None:
    from safetensors.torch import save_file

    with importable(reference), _stubbed_imports(), tempfile.TemporaryDirectory() as tmp:
        import config
        import pipeline_attend_and_excite as pipeline
        from utils import ptp_utils
        from utils.gaussian_smoothing import GaussianSmoothing

        run = config.RunConfig(prompt="", output_path=Path(tmp))
        refine = inspect.signature(pipeline.AttendAndExcitePipeline._perform_iterative_refinement_step)
        defaults = {
            "n_inference_steps": run.n_inference_steps, "guidance_scale": run.guidance_scale,
            "max_iter_to_alter": run.max_iter_to_alter, "attention_res": run.attention_res,
            "thresholds": {str(k): v for k, v in run.thresholds.items()}, "scale_factor": run.scale_factor,
            "scale_range": list(run.scale_range), "smooth_attentions": run.smooth_attentions, "sigma": run.sigma,
            "kernel_size": run.kernel_size,
            "max_refinement_steps": refine.parameters["max_refinement_steps"].default,
        }

        gen = torch.Generator().manual_seed(0)
        probs = torch.softmax(torch.randn(LAYERS, HEADS, RES * RES, TOKENS, generator=gen) * 3, dim=-1)

        class Store:  # what aggregate_attention reads: the step-averaged maps per place, one entry per layer
            def get_average_attention(self):
                return {"down_cross": [probs[0]], "mid_cross": [], "up_cross": [probs[1], probs[2]]}

        aggregated = ptp_utils.aggregate_attention(Store(), res=RES, from_where=("up", "down", "mid"),
                                                   is_cross=True, select=0)
        maxima = pipeline.AttendAndExcitePipeline._compute_max_attention_per_index(
            None, aggregated.clone(), INDICES, smooth_attentions=run.smooth_attentions, sigma=run.sigma,
            kernel_size=run.kernel_size)
        loss = pipeline.AttendAndExcitePipeline._compute_loss(maxima)
        kernel = GaussianSmoothing(channels=1, kernel_size=run.kernel_size, sigma=run.sigma, dim=2).weight[0, 0]

    (out / "defaults.json").write_text(json.dumps(defaults, indent=2) + "\n")
    save_file({"probs": probs.contiguous(), "aggregated": aggregated.contiguous(),
               "maxima": torch.stack([torch.as_tensor(m) for m in maxima]).contiguous(),
               "loss": torch.as_tensor(loss, dtype=torch.float32).reshape(1), "kernel": kernel.contiguous(),
               "indices": torch.tensor(INDICES)}, str(out / "maps.safetensors"), metadata={"format": "pt"})
