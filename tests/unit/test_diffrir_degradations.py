"""D_1 follows the official second-order pipeline and its YAML ranges (tests/conformance/diffrir/degradations.json,
taken from Zj-BinXia/DiffRIR options/train_DiffRIRS2_x1.yml by `python -m devtools.conformance diffrir`).

The statistics are seeded draws of the pack's own sampling, compared with the facts of the YAML file;
JPEG and filtering are replaced by recorders where only the order of the steps matters. Kernels and JPEG
are compared with basicsr's own outputs (tests/conformance/diffrir_basicsr/, from XPixelGroup/BasicSR).
"""
import json
import math
from pathlib import Path

import pytest
import torch

from mmig_core.diffrir import degradations as d

FACTS = json.loads((Path(__file__).parents[1] / "conformance" / "diffrir" / "degradations.json").read_text())
MODEL, DATASET = FACTS["model"], FACTS["dataset"]


def within(fraction, p, n, sigmas=4.0):
    return abs(fraction - p) <= sigmas * math.sqrt(p * (1 - p) / n) + 1e-9


def test_the_defaults_are_the_published_options():
    ranges = d.RealDegradation()
    for key, value in {**MODEL, **DATASET}.items():
        if key in ("blur_kernel_size", "blur_kernel_size2", "Y_error", "Y_bias"):
            continue
        ours = getattr(ranges, key)
        assert (list(ours) if isinstance(ours, tuple) else ours) == value, key
    assert max(ranges.kernel_sizes) == DATASET["blur_kernel_size"] == DATASET["blur_kernel_size2"]


@pytest.mark.parametrize("round_", ["", "2"])
def test_resize_directions_and_ranges(round_):
    prob, (low, high) = MODEL[f"resize_prob{round_}"], MODEL[f"resize_range{round_}"]
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([d.random_scale(prob, (low, high), g) for _ in range(3000)])
    up, down, keep = (scales > 1).float().mean(), (scales < 1).float().mean(), (scales == 1).float().mean()
    for fraction, p in zip((up, down, keep), prob):
        assert within(float(fraction), p, len(scales)), (round_, float(up), float(down), float(keep), prob)
    assert scales.min() >= low and scales.max() <= high
    assert scales.min() < low + 0.05 * (1 - low) and scales.max() > high - 0.05 * (high - 1)


class Recorder:
    """Replaces the steps of degrade_real by recorders that keep the image's values but log what happens."""

    def __init__(self, monkeypatch):
        self.log = []
        interpolate, noise = d._interpolate, d.random_noise
        monkeypatch.setattr(d, "random_jpeg", lambda x, q, g: self.log.append(("jpeg", tuple(q))) or x)
        monkeypatch.setattr(d, "filter2d", lambda x, k: self.log.append(("filter", k)) or x)

        def spy_interpolate(x, size, g, scale_factor=None):
            y = interpolate(x, size, g, scale_factor)
            self.log.append(("resize", tuple(x.shape[-2:]), tuple(y.shape[-2:])))
            return y

        def spy_noise(x, gaussian_prob, sigma_range, poisson_range, gray_prob, g):
            self.log.append(("noise", gaussian_prob, tuple(sigma_range), tuple(poisson_range), gray_prob))
            return noise(x, gaussian_prob, sigma_range, poisson_range, gray_prob, g)
        monkeypatch.setattr(d, "_interpolate", spy_interpolate)
        monkeypatch.setattr(d, "random_noise", spy_noise)

    def run(self, x, seed):
        self.log = []
        d.degrade_real(x, torch.Generator().manual_seed(seed))
        return self.log


def test_the_pipeline_runs_both_rounds_and_both_final_orders(monkeypatch):
    recorder = Recorder(monkeypatch)
    h, w = 48, 40
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    orders = {"resize_sinc_then_jpeg": 0, "jpeg_then_resize_sinc": 0}
    second_blur, final_sinc, second_sizes, n = 0, 0, [], 300
    for seed in range(n):
        log = recorder.run(x, seed)
        kinds = [step[0] for step in log]
        assert kinds[:4] == ["filter", "resize", "noise", "jpeg"]
        second_blur += kinds[4] == "filter"
        rest = kinds[5:] if kinds[4] == "filter" else kinds[4:]
        assert rest[:2] == ["resize", "noise"]
        resizes = [step for step in log if step[0] == "resize"]
        # Round 2 resizes to a size relative to the ORIGINAL (h, w), whatever round 1 did.
        second_sizes.append(resizes[1][2][0] / h)
        assert resizes[2][2] == (h, w)
        tail = rest[2:]
        orders["resize_sinc_then_jpeg" if tail == ["resize", "filter", "jpeg"] else "jpeg_then_resize_sinc"] += 1
        assert tail in (["resize", "filter", "jpeg"], ["jpeg", "resize", "filter"])
        sinc = [step[1] for step in log if step[0] == "filter"][-1]
        final_sinc += int((sinc != 0).sum()) > 1  # not the identity pulse
        noises = [step for step in log if step[0] == "noise"]
        assert noises[0][1:] == (MODEL["gaussian_noise_prob"], tuple(MODEL["noise_range"]),
                                 tuple(MODEL["poisson_scale_range"]), MODEL["gray_noise_prob"])
        assert noises[1][1:] == (MODEL["gaussian_noise_prob2"], tuple(MODEL["noise_range2"]),
                                 tuple(MODEL["poisson_scale_range2"]), MODEL["gray_noise_prob2"])
        jpegs = [step[1] for step in log if step[0] == "jpeg"]
        assert jpegs == [tuple(MODEL["jpeg_range"]), tuple(MODEL["jpeg_range2"])]
    assert within(orders["resize_sinc_then_jpeg"] / n, 0.5, n), orders
    assert within(second_blur / n, MODEL["second_blur_prob"], n)
    assert within(final_sinc / n, DATASET["final_sinc_prob"], n)
    low, high = MODEL["resize_range2"]
    assert min(second_sizes) >= int(h * low) / h - 1e-9 and max(second_sizes) <= high
    keep = sum(1 for s in second_sizes if s == 1.0) / n
    assert within(keep, MODEL["resize_prob2"][2], n, sigmas=5)


def test_kernel_types_and_sinc_follow_their_probabilities(monkeypatch):
    kinds, sizes = [], []
    mixed = d.mixed_kernel
    monkeypatch.setattr(d, "mixed_kernel", lambda kind, size, *a: kinds.append(kind) or sizes.append(size)
                        or mixed(kind, size, *a))
    g, n = torch.Generator().manual_seed(2), 3000
    kernels = [d.random_blur_kernel(d.RealDegradation(), g) for _ in range(n)]
    sinc = n - len(kinds)
    assert within(sinc / n, DATASET["sinc_prob"], n)
    for kind, p in zip(DATASET["kernel_list"], DATASET["kernel_prob"]):
        assert within(kinds.count(kind) / len(kinds), p, len(kinds)), kind
    assert all(k.shape == (21, 21) and abs(float(k.sum()) - 1) < 1e-9 for k in kernels)
    assert set(sizes) == set(range(7, DATASET["blur_kernel_size"] + 1, 2))  # the official 7..21, odd


def test_noise_scales_per_round():
    g = torch.Generator().manual_seed(3)
    grey = torch.full((400, 3, 16, 16), 0.5)
    for sigma_key in ("noise_range", "noise_range2"):
        low, high = MODEL[sigma_key]
        std = d.gaussian_noise(grey, (low, high), 0.0, g).std(dim=(1, 2, 3)) * 255
        assert std.min() > 0.8 * low and std.max() < 1.1 * high
        assert abs(float(std.mean()) - (low + high) / 2) < 0.1 * (high - low)
    for scale_key in ("poisson_scale_range", "poisson_scale_range2"):
        low, high = MODEL[scale_key]
        noise = d.poisson_noise(grey, (low, high), 0.0, g)
        # A constant 0.5 image has 1 distinct value -> 1 level: Poisson(0.5) - 0.5, std sqrt(0.5), times the scale.
        scale = noise.std(dim=(1, 2, 3)) / math.sqrt(0.5)
        assert abs(float(scale.mean()) - (low + high) / 2) < 0.05 * (high - low)
        assert scale.max() < 1.2 * high and scale.min() > 0.5 * low
    gray = d.gaussian_noise(grey, (10, 10), 1.0, g)
    assert torch.equal(gray[:, 0], gray[:, 1])  # grey noise: one value for R, G and B


def test_degrade_is_clipped_8bit_and_keeps_the_size():
    x = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(4))
    y = d.degrade(x, torch.Generator().manual_seed(5))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert torch.equal(y * 255, (y * 255).round())
    assert (y - x).abs().mean() > 1e-3


def test_the_sinc_kernel_is_a_circular_low_pass():
    k = d.sinc_kernel(math.pi / 2, 21)
    assert torch.allclose(k, k.flip(0)) and torch.allclose(k, k.T) and abs(float(k.sum()) - 1) < 1e-12
    response = torch.fft.fft2(k).abs()
    assert response[0, 0] > 0.99 and response[10, 10] < 0.05  # passes DC, stops the highest frequency


# Written by python -m devtools.conformance diffrir_basicsr --reference <checkout of XPixelGroup/BasicSR>
BASICSR = Path(__file__).parents[1] / "conformance" / "diffrir_basicsr"


def test_kernels_equal_basicsrs():
    from safetensors.torch import load_file
    spec, expected = json.loads((BASICSR / "kernels.json").read_text()), load_file(str(BASICSR / "kernels.safetensors"))
    for k in spec["kernels"]:
        ours = d.kernel_from_params(k["kind"], k["size"], k["sigma_x"], k["sigma_y"], k["theta"], k.get("beta", 1.0))
        torch.testing.assert_close(ours, expected[k["name"]], atol=1e-12, rtol=1e-9, msg=k["name"])
    for k in spec["sincs"]:
        ours = d._pad_kernel(d.sinc_kernel(k["cutoff"], k["size"]), spec["pad_to"])
        # torch's Bessel J1 and scipy's differ slightly: measured at most 8.6e-8 (1.4e-7 relative) here
        torch.testing.assert_close(ours, expected[k["name"]], atol=1e-9, rtol=1e-6, msg=k["name"])


def test_jpeg_equals_basicsrs_diffjpeg_without_differentiable_rounding():
    from safetensors.torch import load_file
    fixture = load_file(str(BASICSR / "jpeg.safetensors"))
    ours = d.jpeg(fixture["image"], fixture["quality"])
    print(f"JPEG vs basicsr DiffJPEG: max abs diff {(ours - fixture['jpeg']).abs().max():.3g}")
    torch.testing.assert_close(ours, fixture["jpeg"], atol=1e-5, rtol=0)
    assert (fixture["jpeg"] - fixture["image"]).abs().mean() > 1e-3  # it did compress


def test_poisson_noise_equals_basicsrs_on_the_same_seed():
    from safetensors.torch import load_file
    image = load_file(str(BASICSR / "jpeg.safetensors"))["image"]
    fixture = load_file(str(BASICSR / "poisson.safetensors"))
    ours = d.shot_noise(image, torch.Generator().manual_seed(int(fixture["seed"])))
    assert fixture["noise"].abs().max() > 0
    torch.testing.assert_close(ours, fixture["noise"], atol=1e-6, rtol=0)
