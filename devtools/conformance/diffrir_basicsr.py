"""Fixtures for DiffRIR's training degradations from the functions the official training calls (XPixelGroup/BasicSR).

    python -m devtools.conformance diffrir_basicsr --reference /path/to/BasicSR   (a checkout or a bare git dir)

The official DiffRIR training (Zj-BinXia/DiffRIR) builds its degradations from basicsr: the blur
kernels (`bivariate_Gaussian`, `bivariate_generalized_Gaussian`, `bivariate_plateau`,
`circular_lowpass_kernel`) and JPEG (`DiffJPEG(differentiable=False)`). This runs those functions on
fixed parameters and inputs and writes into tests/conformance/diffrir_basicsr/:
- `kernels.json` (the parameters) + `kernels.safetensors` (the kernels basicsr makes of them);
- `jpeg.safetensors`: an input image batch, its qualities and basicsr's JPEG of it;
- `poisson.safetensors`: basicsr's colour Poisson noise (`generate_poisson_noise_pt`, scale 1) of that
  batch, drawn right after `torch.manual_seed(POISSON_SEED)`.

basicsr's package __init__ files (the whole training stack) are bypassed and cv2, imported but not used
by these functions, is stubbed.
"""
from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import torch

REFERENCE = "XPixelGroup/BasicSR"
KERNELS = [
    {"name": "iso", "kind": "iso", "size": 21, "sigma_x": 2.3, "sigma_y": 2.3, "theta": 0.0},
    {"name": "aniso", "kind": "aniso", "size": 15, "sigma_x": 2.7, "sigma_y": 0.9, "theta": 0.7},
    {"name": "generalized_iso", "kind": "generalized_iso", "size": 11, "sigma_x": 1.4, "sigma_y": 1.4,
     "theta": 0.0, "beta": 0.6},
    {"name": "generalized_aniso", "kind": "generalized_aniso", "size": 21, "sigma_x": 0.8, "sigma_y": 2.9,
     "theta": -2.2, "beta": 3.1},
    {"name": "plateau_iso", "kind": "plateau_iso", "size": 9, "sigma_x": 1.1, "sigma_y": 1.1, "theta": 0.0,
     "beta": 1.7},
    {"name": "plateau_aniso", "kind": "plateau_aniso", "size": 19, "sigma_x": 2.0, "sigma_y": 0.5,
     "theta": 2.9, "beta": 1.2},
]
SINCS = [{"name": "sinc_7", "cutoff": math.pi / 3, "size": 7}, {"name": "sinc_13", "cutoff": 2.0, "size": 13},
         {"name": "sinc_21", "cutoff": math.pi * 0.9, "size": 21}]
JPEG_QUALITIES = [30.0, 61.5, 95.0]
JPEG_HW = (24, 40)  # not a multiple of 16: the zero padding and the crop act
POISSON_SEED = 11


def jpeg_input(seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(len(JPEG_QUALITIES), 3, 4, 5, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=JPEG_HW, mode="bicubic", align_corners=False)
    return (smooth + 0.05 * torch.randn(smooth.shape, generator=generator)).clamp(0, 1)


def regenerate(reference: Path, out: Path) -> None:
    from safetensors.torch import save_file
    stubs = {"cv2": types.ModuleType("cv2")}
    for package in ("basicsr", "basicsr.utils", "basicsr.data"):
        module = types.ModuleType(package)
        module.__path__ = [str(reference / package.replace(".", "/"))]
        stubs[package] = module
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        from basicsr.data import degradations
        from basicsr.utils.diffjpeg import DiffJPEG

        kernels = {}
        for k in KERNELS:
            iso = not k["kind"].endswith("aniso")
            if k["kind"] in ("iso", "aniso"):
                value = degradations.bivariate_Gaussian(k["size"], k["sigma_x"], k["sigma_y"], k["theta"],
                                                        isotropic=iso)
            elif k["kind"].startswith("generalized"):
                value = degradations.bivariate_generalized_Gaussian(k["size"], k["sigma_x"], k["sigma_y"], k["theta"],
                                                                    k["beta"], isotropic=iso)
            else:
                value = degradations.bivariate_plateau(k["size"], k["sigma_x"], k["sigma_y"], k["theta"], k["beta"],
                                                       isotropic=iso)
            kernels[k["name"]] = torch.from_numpy(value).double()
        for k in SINCS:
            kernels[k["name"]] = torch.from_numpy(degradations.circular_lowpass_kernel(k["cutoff"], k["size"],
                                                                                       pad_to=21)).double()
        save_file({k: v.contiguous() for k, v in kernels.items()}, str(out / "kernels.safetensors"))
        (out / "kernels.json").write_text(json.dumps({"kernels": KERNELS, "sincs": SINCS,
                                                      "pad_to": 21}, indent=1) + "\n")
        image = jpeg_input()
        quality = torch.tensor(JPEG_QUALITIES)
        with torch.no_grad():
            compressed = DiffJPEG(differentiable=False)(image, quality.clone())
        save_file({"image": image, "quality": quality, "jpeg": compressed.contiguous()},
                  str(out / "jpeg.safetensors"))
        torch.manual_seed(POISSON_SEED)
        noise = degradations.generate_poisson_noise_pt(image, scale=1.0, gray_noise=0)
        save_file({"noise": noise.contiguous(), "seed": torch.tensor([POISSON_SEED])}, str(out / "poisson.safetensors"))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in [n for n in sys.modules if n.startswith("basicsr.")]:
            sys.modules.pop(name, None)
