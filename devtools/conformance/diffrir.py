"""DiffRIR conformance fixtures, from the official code (Zj-BinXia/DiffRIR).

    python -m devtools.conformance diffrir --reference /path/to/DiffRIR   (a checkout or a bare git dir)

Writes into tests/conformance/diffrir/:
- `manifest.json`: the official `DiffRIRS2` network's state_dict (names, shapes, which names share one
  tensor) at the published configs: x1 as `inference_diffrir.py` builds it, x2/x4 from
  `options/train_DiffRIRS2_x{2,4}.yml`; each built by the reference's own class.
- `forward.json` + `forward.safetensors`: a small DiffRIRS2 (the reference's class, tiny widths) with
  seeded weights (`seeded_weights`, so the weights need not be stored), and what the official inference
  procedure makes of fixed inputs: `pad_test` from `inference_diffrir.py`, the mask binarised at 0.5,
  the network, the crop and the paste-back, in the order of that script's main loop.
- `degradations.json`: the second-order degradation ranges and probabilities of the published
  training options (`options/train_DiffRIRS2_x1.yml`), as the YAML writes them.

The readers below (`official_checkpoint`, `small_official_checkpoint`, `manifest_entry`) build checkpoints
in the official layout from these facts, for the tests. Only the reference's arch code runs; basicsr (a
training dependency it imports for a registry and image helpers) and cv2 are stubbed, since neither is
needed to build the network or run its forward.
"""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import torch

REFERENCE = "Zj-BinXia/DiffRIR"
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "conformance" / "diffrir"
X1_INFERENCE = dict(n_encoder_res=9, dim=64, scale=1, num_blocks=[13, 1, 1, 1], num_refinement_blocks=13,
                    heads=[1, 2, 4, 8], ffn_expansion_factor=2.2, LayerNorm_type="BiasFree")  # inference_diffrir.py
SMALL = dict(n_encoder_res=1, dim=8, scale=1, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1,
             heads=[1, 2, 4, 8], ffn_expansion_factor=2.2, LayerNorm_type="BiasFree")
WEIGHT_SEED, NOISE_SEED, INPUT_SEED = 1234, 7, 99
# Image size of the forward fixture: not a multiple of 32, so the reflect padding and the crop both act.
INPUT_HW = (40, 56)
DEGRADATION_KEYS = ["resize_prob", "resize_range", "gaussian_noise_prob", "noise_range", "poisson_scale_range",
                    "gray_noise_prob", "jpeg_range", "second_blur_prob", "resize_prob2", "resize_range2",
                    "gaussian_noise_prob2", "noise_range2", "poisson_scale_range2", "gray_noise_prob2",
                    "jpeg_range2"]
DATASET_KEYS = ["blur_kernel_size", "kernel_list", "kernel_prob", "sinc_prob", "blur_sigma", "betag_range",
                "betap_range", "blur_kernel_size2", "kernel_list2", "kernel_prob2", "sinc_prob2", "blur_sigma2",
                "betag_range2", "betap_range2", "final_sinc_prob", "Y_error", "Y_bias"]


def seeded_weights(parameters: list[tuple[str, list[int]]], seed: int = WEIGHT_SEED) -> dict[str, torch.Tensor]:
    """Deterministic, well-scaled weights for the named shapes, in the given order (one generator).

    Matrices and kernels: normal / sqrt(fan-in); biases: 0.05·normal; other vectors (norm scales,
    attention temperatures): 1 + 0.2·normal; the output conv (`G.tail.1`) a tenth of that, so the output
    stays image-like as a trained residual does. Both regenerate and the test call this.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in parameters:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        fan_in = 1
        for size in shape[1:]:
            fan_in *= size
        if name.endswith("bias"):
            weights[name] = 0.05 * noise
        elif len(shape) >= 2 and fan_in > 1:
            weights[name] = noise / fan_in ** 0.5
        else:
            weights[name] = 1 + 0.2 * noise
        if name.startswith("G.tail.1."):
            weights[name] = 0.1 * weights[name]
    return weights


def official_checkpoint(entry: dict, fixture_buffers: dict | None = None) -> dict:
    """A state dict with exactly the official names and shapes of a manifest entry: random tensors (or the
    fixture's buffers), the names the official module shares holding one tensor, as in a real checkpoint."""
    generator = torch.Generator().manual_seed(0)
    alias = {name: group[0] for group in entry["shared"] for name in group[1:]}
    state = {}
    for name, shape in entry["state_dict"].items():
        if name in alias:
            state[name] = state[alias[name]]
        elif fixture_buffers is not None and name in fixture_buffers:
            state[name] = fixture_buffers[name]
        elif name == "diffusion.betas":  # the schedule the published config names (0.1 .. 0.99, linear in sqrt)
            state[name] = torch.linspace(0.1 ** 0.5, 0.99 ** 0.5, shape[0], dtype=torch.float64).float() ** 2
        else:
            state[name] = 0.02 * torch.randn(shape, generator=generator)
    return state


def manifest_entry(variant: str) -> dict:
    """One config of the committed manifest: published "x1", "x2", "x4"; "small_x2" (tiny widths, x2 layout) and
    "small_s1" (the stage-one DiffRIRS1 at tiny widths)."""
    return json.loads((FIXTURES / "manifest.json").read_text())[variant]


def small_official_checkpoint() -> dict:
    """The forward fixture's network as an official state dict: seeded weights, shared tensors, its buffers."""
    from safetensors.torch import load_file
    spec = json.loads((FIXTURES / "forward.json").read_text())
    buffers = {k.removeprefix("buffer."): v for k, v in load_file(str(FIXTURES / "forward.safetensors")).items()
               if k.startswith("buffer.")}
    state = official_checkpoint(spec, buffers)
    state.update(seeded_weights([(name, spec["state_dict"][name]) for name in spec["parameters"]],
                                spec["weight_seed"]))
    for group in spec["shared"]:
        for name in group[1:]:
            state[name] = state[group[0]]
    return state


def fixture_inputs(seed: int = INPUT_SEED):
    """The forward fixture's generated image, reference (ground truth) and soft mask, [1, C, H, W] in 0..1."""
    generator = torch.Generator().manual_seed(seed)
    h, w = INPUT_HW
    coarse = torch.rand(2, 3, 5, 7, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    image = (smooth[:1] + 0.05 * torch.randn(1, 3, h, w, generator=generator)).clamp(0, 1)
    reference = (smooth[1:] + 0.05 * torch.randn(1, 3, h, w, generator=generator)).clamp(0, 1)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    # A soft-edged blob: the official script binarises it at 0.5, so its ramp must not matter.
    mask = (1.5 - ((yy - 18) ** 2 + (xx - 30) ** 2).sqrt() / 10).clamp(0, 1)[None, None]
    return image, reference, mask


def _stub_reference_imports(root: Path):
    """Module stubs for what the arch code imports but does not use to build or run the network."""
    class Registry:
        def register(self, obj=None):
            return obj if obj is not None else (lambda o: o)

    stubs = {name: types.ModuleType(name) for name in
             ("basicsr", "basicsr.utils", "basicsr.utils.registry", "basicsr.utils.img_util", "cv2")}
    stubs["basicsr.utils.registry"].ARCH_REGISTRY = Registry()
    stubs["basicsr.utils"].img2tensor = stubs["basicsr.utils.img_util"].tensor2img = None
    # The packages themselves, without their __init__ (which imports the whole training stack).
    for package, folder in (("DiffRIR", root / "DiffRIR"), ("DiffRIR.archs", root / "DiffRIR" / "archs")):
        module = types.ModuleType(package)
        module.__path__ = [str(folder)]
        stubs[package] = module
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    return saved


def _restore_modules(saved):
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
    for name in [n for n in sys.modules if n == "ldm" or n.startswith(("ldm.", "DiffRIR.", "inference_diffrir"))]:
        sys.modules.pop(name, None)


def _manifest(model: torch.nn.Module) -> dict:
    state = model.state_dict(keep_vars=True)
    by_storage: dict[int, list[str]] = {}
    for name, tensor in state.items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    return {"state_dict": {name: list(t.shape) for name, t in state.items()},
            "buffers": [name for name, _ in model.named_buffers()],
            "shared": [names for names in by_storage.values() if len(names) > 1]}


def _compact_json(obj) -> str:
    """Indented JSON with each list of numbers (a shape, a range) kept on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[[0-9\s,.eE+-]*\]", lambda m: json.dumps(json.loads(m[0])), text) + "\n"


def _published_network_g(root: Path, scale: int) -> dict:
    import yaml
    options = yaml.safe_load((root / "options" / f"train_DiffRIRS2_x{scale}.yml").read_text())
    network = {k: v for k, v in options["network_g"].items() if k != "type"}
    network.setdefault("scale", options["scale"])  # the x4 file leaves it to the class default (4)
    return network


def regenerate(reference: Path, out: Path) -> None:
    import yaml
    from safetensors.torch import save_file

    saved = _stub_reference_imports(reference)
    sys.path.insert(0, str(reference))
    try:
        from DiffRIR.archs.S2_arch import DiffRIRS2
        from inference_diffrir import pad_test

        configs = {"x1": {"source": "inference_diffrir.py (DiffRIRS2(...) in __main__, --scale 1)",
                          "kwargs": X1_INFERENCE}}
        for scale in (2, 4):
            configs[f"x{scale}"] = {"source": f"options/train_DiffRIRS2_x{scale}.yml network_g",
                                    "kwargs": _published_network_g(reference, scale)}
        # The forward fixture's small widths at scale 2: a cheap checkpoint of the x2 layout for the host test.
        configs["small_x2"] = {"source": "the forward fixture's small config at scale 2",
                               "kwargs": {**SMALL, "scale": 2}}
        configs["small_s1"] = {"source": "DiffRIRS1 (the stage-one teacher) at the forward fixture's small config",
                               "kwargs": dict(SMALL)}
        from DiffRIR.archs.S1_arch import DiffRIRS1
        for name, entry in configs.items():
            torch.manual_seed(0)
            entry.update(_manifest((DiffRIRS1 if name == "small_s1" else DiffRIRS2)(**entry["kwargs"])))
        (out / "manifest.json").write_text(_compact_json(configs))

        # The forward fixture: a small DiffRIRS2 through the official inference steps.
        model = DiffRIRS2(**SMALL).eval()
        small = _manifest(model)
        parameters = [name for name, _ in model.named_parameters()]  # one name per shared tensor
        weights = seeded_weights([(name, small["state_dict"][name]) for name in parameters])
        model.load_state_dict(weights, strict=False)
        image, gt, soft_mask = fixture_inputs()
        mask = soft_mask.expand(1, 3, -1, -1).clone()  # the script reads a 3-channel mask image
        mask[mask < 0.5] = 0
        mask[mask >= 0.5] = 1
        with torch.no_grad():
            stacked = torch.cat([image, (1 - mask) * gt], dim=1)
            padded, pad_h, pad_w = pad_test(stacked, 1)
            torch.manual_seed(NOISE_SEED)  # the prior's starting noise: torch.randn of the global CPU generator
            sr = model(padded)
            h, w = sr.shape[-2:]
            sr = sr[:, :, 0:h - pad_h, 0:w - pad_w]
            network_out = sr.clone()
            pasted = sr * mask + (1 - mask) * gt
        buffers = {name: t for name, t in model.named_buffers()}
        save_file({"image": image, "reference": gt, "mask": soft_mask, "network_output": network_out.contiguous(),
                   "restored": pasted.contiguous(), **{f"buffer.{k}": v.contiguous() for k, v in buffers.items()}},
                  str(out / "forward.safetensors"))
        (out / "forward.json").write_text(_compact_json({
            "kwargs": SMALL, "weight_seed": WEIGHT_SEED, "noise_seed": NOISE_SEED, "input_seed": INPUT_SEED,
            "input_hw": list(INPUT_HW), "pad": [pad_h, pad_w], "padded_hw": list(padded.shape[-2:]),
            "steps": "mask binarised at 0.5; cat([image, (1 - mask) * reference]); pad_test(., scale=1) (reflect "
                     "to a multiple of 32); torch.manual_seed(noise_seed); model(.); crop; sr * mask + (1 - mask) * "
                     "reference (unclamped, before 8-bit rounding)",
            "parameters": parameters, **small}))

        options = yaml.safe_load((reference / "options" / "train_DiffRIRS2_x1.yml").read_text())
        dataset = options["datasets"]["train"]
        (out / "degradations.json").write_text(_compact_json({
            "source": "options/train_DiffRIRS2_x1.yml",
            "model": {k: options[k] for k in DEGRADATION_KEYS},
            "dataset": {k: dataset[k] for k in DATASET_KEYS},
        }))
    finally:
        sys.path.remove(str(reference))
        _restore_modules(saved)
