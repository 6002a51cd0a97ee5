"""DiffRIR tiling at 2048x2048 (mmig_core/diffrir/restore.py) with the node's defaults (512 px tiles, 64 px overlap):
the tile plan covers the image, the overlaps blend, and what the network sees is bounded by the tile, not the image
(the tiny-width network, real-size tiles: the tiling does not depend on the width)."""
from __future__ import annotations

import pytest
import torch

from mmig_core.diffrir import DiffRIR, restoration_tiles, restore_image, tiny_config
from mmig_core.diffrir.network import PriorEncoder
from mmig_core.diffrir.restore import compute_prior

SIDE, TILE, OVERLAP = 2048, 512, 64
STARTS = [0, 384, 768, 1152, 1536]  # 5 tiles a side, evenly spread, >= 64 px overlaps


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = DiffRIR(tiny_config()).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else None
    return net


def images(side=SIDE, seed=0):
    g = torch.Generator().manual_seed(seed)
    generated, reference = torch.rand(3, side, side, generator=g), torch.rand(3, side, side, generator=g)
    mask = torch.zeros(side, side)
    mask[:, side // 2:] = 1.0  # an outpainted right half
    return generated, reference, mask


class StubRestorer(torch.nn.Module):
    """Records each window the restorer gets; returns the window's generated image (an identity restorer), or
    the tile's number k everywhere as k / 32 (`constant`: the output is clamped to 0..1), so blending is visible."""

    def __init__(self, constant=False):
        super().__init__()
        self.constant, self.windows = constant, []

    def forward(self, x, prior):
        self.windows.append(tuple(x.shape))
        if self.constant:
            return torch.full_like(x[:, :3], (len(self.windows) - 1) / 32)
        return x[:, :3]


def run_with(model, stub, side=SIDE, cheap_prior=True):
    """restore_image with `stub` as the restorer; with `cheap_prior` CPEN's features are zeros of their real shape
    (the stubs ignore the prior, and the real CPEN over 2048 px costs seconds on these CPUs)."""
    real = model.restorer
    model.restorer = stub
    if cheap_prior:
        u = model.config.unshuffle
        channels = model.prior_encoder.features(torch.zeros(1, 6, 32, 32)).shape[1]
        model.prior_encoder.features = lambda x: torch.zeros(x.shape[0], channels, x.shape[-2] // u, x.shape[-1] // u)
    try:
        return restore_image(model, *images(side), tile=TILE, overlap=OVERLAP, paste_back=False)
    finally:
        model.restorer = real
        if cheap_prior:
            del model.prior_encoder.features


def test_the_tile_plan_covers_2048_px_and_the_blend_weights_sum_to_one(model):
    stub = StubRestorer()
    generated = images()[0]
    out = run_with(model, stub)
    assert restoration_tiles(SIDE, SIDE, TILE, OVERLAP) == 25 == len(stub.windows)
    assert set(stub.windows) == {(1, 6, TILE, TILE)}  # 6 channels: generated + masked reference (Eq. 7)
    # an identity restorer gives the image back exactly: every pixel covered, the weights a partition of unity
    assert (out - generated).abs().max().item() < 1e-5


def test_the_overlaps_blend_between_neighbouring_tiles(model):
    out = run_with(model, StubRestorer(constant=True))[0] * 32  # tile k (row-major, 5 a row) outputs k
    row = out[100]  # inside the first tile row only
    for i, start in enumerate(STARTS[1:], 1):
        overlap = row[start:STARTS[i - 1] + TILE]
        assert len(overlap) == TILE - (start - STARTS[i - 1])
        assert overlap[0] > i - 1 and overlap[-1] < i and (overlap[1:] >= overlap[:-1]).all()  # a ramp i-1 -> i
    assert row[200].item() == 0.0 and row[SIDE - 1].item() == 4.0
    assert out[SIDE - 1, SIDE - 1].item() == pytest.approx(24.0)
    assert out[1000, 1000].item() == pytest.approx(12.0)  # the centre tile's own inner part


@pytest.fixture(scope="module")
def priors(model):
    """The real CPEN's prior at 1024 px (tiled) and 2048 px (tiled and untiled), and the largest CPEN input of each."""
    features, largest = model.prior_encoder.features, []

    def recording_features(x):
        largest.append(x.shape[-2] * x.shape[-1])
        return features(x)
    model.prior_encoder.features = recording_features
    found = {}
    try:
        with torch.no_grad():
            for side, tile in ((1024, TILE), (SIDE, TILE), (SIDE, 0)):
                largest.clear()
                prior = compute_prior(model, *images(side), tile=tile, generator=torch.Generator().manual_seed(1))
                found[side, tile] = (prior, max(largest))
    finally:
        del model.prior_encoder.features
    return found


def test_what_the_network_sees_is_bounded_by_the_tile_not_the_image(model, priors):
    """Every restorer window and every CPEN input (the real CPEN) at 2048 px is as large as at 1024 px: memory
    stays flat as images grow. The restorer is the recording stub (its windows are what a real one gets)."""
    windows = {}
    for side in (1024, 2048):
        stub = StubRestorer()
        out = run_with(model, stub, side)
        assert out.shape == (3, side, side) and torch.isfinite(out).all()
        windows[side] = (max(h * w for *_, h, w in stub.windows), len(stub.windows))
    assert windows == {1024: (TILE * TILE, 9), 2048: (TILE * TILE, 25)}
    halo = -(-PriorEncoder.receptive_radius(model.config) // model.config.unshuffle) * model.config.unshuffle
    assert priors[1024, TILE][1] == priors[SIDE, TILE][1] <= (TILE + 2 * halo) ** 2 < SIDE * SIDE / 9
    assert priors[SIDE, 0][1] == SIDE * SIDE  # untiled (tile_size 0): the whole image at once


def test_the_tiled_prior_equals_the_untiled_one_at_2048_px(model, priors):
    tiled, whole = priors[SIDE, TILE][0], priors[SIDE, 0][0]
    assert tiled.shape == (1, model.config.prior_dim) and torch.isfinite(tiled).all()
    assert torch.allclose(tiled, whole, atol=1e-4, rtol=1e-4), (tiled - whole).abs().max()
