"""DiffRIR core: shapes, paste-back, tiling, the D_2 ranges, weights on disk, and bad input."""
import dataclasses
import re

import pytest
import torch

from mmig_core.diffrir import (DiffRIR, DiffRIRConfig, DiffRIRInputError, load_diffrir, restore_images, save_diffrir,
                               tiny_config)
from mmig_core.diffrir.degradations import (BRIGHTNESS_RANGE, CONTRAST_RANGE, box_masks, degrade, disturb_color,
                                            irregular_masks, outpaint_masks, sample_color_disturbance)
from mmig_core.diffrir.restore import ramp_weights, restore_image, tile_starts
from mmig_core.diffrir.weights import OFFICIAL_RENAMES, infer_official_config
from mmig_core.model_files import ModelFilesError

# Tiled vs untiled restorations of the same image, random-weight tiny model, 160x224 px, 96 px tiles:
# Restormer's channel attention pools statistics per tile, so they agree closely but not exactly.
TILED_MEAN_ABS_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """A tiny model saved to disk and read back through the real loader."""
    torch.manual_seed(0)
    model = DiffRIR(tiny_config())
    with torch.no_grad():
        model.restorer.tail[-1].weight.mul_(0.1)
    return save_diffrir(model, tmp_path_factory.mktemp("diffrir") / "tiny.safetensors")


@pytest.fixture(scope="module")
def tiny(tiny_file):
    return load_diffrir(tiny_file)


def smooth_image(height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 5, generator=g)
    base = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    return (base + 0.03 * torch.randn(3, height, width, generator=g)).clamp(0, 1)


def bhwc(image):
    return image.permute(1, 2, 0)[None]


@pytest.mark.parametrize("batch", [1, 3])
def test_odd_sizes_and_batches_keep_their_shape(tiny, batch):
    images = torch.rand(batch, 61, 97, 3)
    reference = torch.rand(batch, 61, 97, 3)
    mask = torch.zeros(batch, 61, 97)
    mask[:, :, 70:] = 1
    done = []
    out = restore_images(tiny, images, reference, mask, tile=0, on_image_done=done.append)
    assert out.shape == (batch, 61, 97, 3) and done == list(range(batch))
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    # Paste-back: kept pixels are the reference's exactly; generated ones changed.
    assert torch.equal(out[:, :, :70], reference[:, :, :70])
    assert not torch.equal(out[:, :, 70:], reference[:, :, 70:])


def test_all_zero_mask_returns_the_reference_unchanged(tiny):
    images, reference = torch.rand(2, 40, 56, 3), torch.rand(2, 40, 56, 3)
    out = restore_images(tiny, images, reference, torch.zeros(2, 40, 56), tile=32, overlap=8)
    assert torch.equal(out, reference)


def test_without_paste_back_the_network_output_is_returned(tiny):
    images, reference = torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3)
    out = restore_images(tiny, images, reference, torch.zeros(1, 32, 32), tile=0, paste_back=False)
    assert not torch.equal(out, reference)


def test_tiled_and_untiled_agree(tiny):
    generated = smooth_image(160, 224)
    reference = (generated * 0.95 + 0.03).clamp(0, 1)
    mask = torch.zeros(160, 224)
    mask[:, 160:] = 1
    whole = restore_image(tiny, generated, reference, mask, tile=0, paste_back=False)
    tiled = restore_image(tiny, generated, reference, mask, tile=96, overlap=32, paste_back=False)
    diff = (whole - tiled).abs()
    assert diff.mean() < TILED_MEAN_ABS_TOLERANCE, f"mean |tiled - untiled| = {diff.mean():.4f}"
    # The restorer changed the image (so the comparison is not trivially of two copies of the input).
    assert (whole - generated).abs().mean() > 10 * 1e-4


def test_progress_and_interruption_come_per_tile(tiny):
    from mmig_core.diffrir import restoration_tiles

    images, reference, mask = torch.rand(2, 70, 100, 3), torch.rand(2, 70, 100, 3), torch.ones(2, 70, 100)
    tiles = restoration_tiles(70, 100, 32, 8)
    assert tiles == len(tile_starts(70, 32, 8)) * len(tile_starts(100, 32, 8)) > 4
    assert restoration_tiles(70, 100, 0, 8) == 1
    done = []
    restore_images(tiny, images, reference, mask, tile=32, overlap=8, on_tile_done=lambda: done.append(1))
    assert len(done) == 2 * tiles

    class Cancelled(Exception):
        pass

    checks = []

    def check_interrupt():
        checks.append(1)
        if len(checks) > 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        restore_images(tiny, images, reference, mask, tile=32, overlap=8, check_interrupt=check_interrupt)
    assert len(checks) == 4  # stopped at the first check that said so, inside the first image


def test_blend_weights_cover_every_pixel_once():
    for length, tile, overlap in [(224, 96, 32), (97, 32, 8), (500, 128, 64), (129, 128, 16)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
        total = torch.zeros(length)
        for start, w in zip(starts, ramp_weights(starts, tile, length)):
            assert (w > 0).all()
            total[start:start + len(w)] += w
        assert (total > 0).all()


def test_the_prior_is_the_same_tiled_and_untiled(tiny):
    from mmig_core.diffrir.restore import compute_prior
    generated, reference = smooth_image(100, 140, seed=1), smooth_image(100, 140, seed=2)
    mask = torch.zeros(100, 140)
    mask[30:60, 40:90] = 1
    priors = [compute_prior(tiny, generated, reference, mask, tile=tile, generator=torch.Generator().manual_seed(3))
              for tile in (0, 32, 48)]
    assert priors[0].shape == (1, 256)
    for prior in priors[1:]:
        torch.testing.assert_close(prior, priors[0], rtol=1e-4, atol=1e-5)


def test_the_prior_sees_the_image_reflect_padded_to_32(tiny):
    """As inference_diffrir.py's pad_test: the whole stacked input, reflect-padded at the bottom/right."""
    import torch.nn.functional as F

    from mmig_core.diffrir.restore import compute_prior
    g = torch.Generator().manual_seed(4)
    generated, reference = torch.rand(3, 70, 45, generator=g), torch.rand(3, 70, 45, generator=g)
    mask = torch.zeros(70, 45)
    mask[10:40, 5:30] = 1
    x = tiny.make_input(generated[None], reference[None], mask[None, None])
    padded = F.pad(x, (0, 64 - 45, 0, 96 - 70), mode="reflect")
    expected = tiny.prior_from_condition(tiny.prior_encoder(padded), torch.Generator().manual_seed(3))
    replicated = tiny.prior_from_condition(tiny.prior_encoder(F.pad(x, (0, 19, 0, 26), mode="replicate")),
                                           torch.Generator().manual_seed(3))
    for tile in (0, 32):
        prior = compute_prior(tiny, generated, reference, mask, tile=tile, generator=torch.Generator().manual_seed(3))
        error = (prior - expected).abs().max()
        assert error < 1e-7, (tile, error)  # measured: 0 untiled, 7e-9 tiled
    assert (replicated - expected).abs().max() > 1e-5  # measured 6.5e-5: the padding mode shows in the prior


def test_the_mask_is_binarised_at_one_half_unless_soft_mask(tiny):
    images, reference = torch.rand(1, 32, 40, 3), torch.rand(1, 32, 40, 3)
    soft = torch.linspace(0, 1, 40).expand(1, 32, 40).contiguous()
    hard = (soft >= 0.5).float()
    binarised = restore_images(tiny, images, reference, soft, tile=0)
    assert torch.equal(binarised, restore_images(tiny, images, reference, hard, tile=0))
    assert torch.equal(binarised[:, :, :20], reference[:, :, :20])  # below 0.5: the reference, exactly
    kept_soft = restore_images(tiny, images, reference, soft, tile=0, soft_mask=True)
    assert not torch.equal(kept_soft, binarised)
    assert not torch.equal(kept_soft[:, :, 1:20], reference[:, :, 1:20])  # soft: blended where 0 < mask < 0.5


def test_seed_changes_only_what_the_diffusion_prior_drives(tiny):
    images, reference, mask = torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), torch.ones(1, 32, 32)
    a = restore_images(tiny, images, reference, mask, tile=0, seed=1)
    assert torch.equal(a, restore_images(tiny, images, reference, mask, tile=0, seed=1))
    assert not torch.equal(a, restore_images(tiny, images, reference, mask, tile=0, seed=2))


def test_color_disturbance_stays_in_its_ranges():
    contrast, brightness = sample_color_disturbance(10_000, torch.Generator().manual_seed(0))
    assert CONTRAST_RANGE[0] <= contrast.min() and contrast.max() <= CONTRAST_RANGE[1]
    assert BRIGHTNESS_RANGE[0] <= brightness.min() and brightness.max() <= BRIGHTNESS_RANGE[1]
    # The draws fill the ranges (not a constant), and D_2 is exactly c1·x + c2.
    assert contrast.max() - contrast.min() > 0.11 and brightness.max() - brightness.min() > 0.09
    x = torch.rand(4, 3, 8, 8)
    y = disturb_color(x, contrast[:4], brightness[:4])
    torch.testing.assert_close(y, x * contrast[:4, None, None, None] + brightness[:4, None, None, None])


def test_real_degradation_keeps_size_and_range():
    x = smooth_image(48, 40)[None].repeat(2, 1, 1, 1)
    y = degrade(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 1e-3


def test_masks_have_their_shapes():
    g = torch.Generator().manual_seed(0)
    for make in (box_masks, outpaint_masks, irregular_masks):
        masks = make(6, 40, 52, g)
        assert masks.shape == (6, 1, 40, 52) and set(masks.unique().tolist()) <= {0.0, 1.0}
        covered = masks.mean(dim=(1, 2, 3))
        assert (covered > 0).all() and (covered < 1).all(), make.__name__
    borders = outpaint_masks(20, 40, 52, g)[:, 0]
    interior = borders[:, 15:25, 20:32]  # the centre is always kept for outpainting
    assert interior.sum() == 0


def test_weights_round_trip(tiny, tiny_file):
    again = load_diffrir(tiny_file)
    assert again.config == tiny.config
    for (k, a), (k2, b) in zip(tiny.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.rand(1, 6, 32, 32)
    torch.testing.assert_close(tiny(x, torch.Generator().manual_seed(0)), again(x, torch.Generator().manual_seed(0)))


def test_weights_for_another_config_name_the_mismatching_keys(tiny_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tiny_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    other = dataclasses.replace(DiffRIRConfig.from_json(metadata["mmig.diffrir.config"]), dim=16,
                                num_refinement_blocks=2)
    metadata["mmig.diffrir.config"] = other.to_json()
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata=metadata)
    with pytest.raises(ModelFilesError) as error:
        load_diffrir(tmp_path / "other.safetensors")
    message = str(error.value)
    assert "restorer.decoder1.0.attn.qkv.weight (file [48, 16, 1, 1], config [96, 32, 1, 1])" in message
    assert "missing: restorer.refinement.1." in message and "another config" in message


def test_file_without_config_or_official_keys_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelFilesError, match="neither a DiffRIR file"):
        load_diffrir(tmp_path / "x.safetensors")


def official_state_dict(model: DiffRIR) -> dict:
    """The model's weights under the official DiffRIR/DiffIR (basicsr) key names, with its extra entries.

    Written from the official layout (G / condition / denoise, Sequential indices), independently of
    OFFICIAL_RENAMES, so the test checks the mapping instead of inverting it.
    """
    c = model.config
    official = {}
    for key, value in model.state_dict().items():
        k = key
        k = re.sub(r"^restorer\.", "G.", k)
        k = k.replace("G.embed.", "G.patch_embed.proj.")
        k = re.sub(r"G\.encoder(\d)\.", r"G.encoder_level\1.", k)
        k = re.sub(r"G\.decoder(\d)\.", r"G.decoder_level\1.", k)
        k = re.sub(r"G\.down(\d)\.0\.", lambda m: f"G.down{m[1]}_{int(m[1]) + 1}.body.0.", k)
        k = re.sub(r"G\.up(\d)\.0\.", lambda m: f"G.up{int(m[1]) + 1}_{m[1]}.body.0.", k)
        k = re.sub(r"G\.reduce(\d)\.", r"G.reduce_chan_level\1.", k)
        k = re.sub(r"\.norm(\d)\.(weight|bias)$", r".norm\1.body.\2", k)
        k = re.sub(r"\.modulation\.to_scale_shift\.", ".kernel.0.", k)
        k = k.replace(".qkv_depthwise.", ".qkv_dwconv.").replace(".ffn.depthwise.", ".ffn.dwconv.")
        tail = re.match(r"G\.tail\.(\d+)\.(.*)", k)
        if tail:
            i = int(tail[1])
            k = f"G.tail.1.{tail[2]}" if i == 2 * 2 else f"G.tail.0.{i}.{tail[2]}"  # unshuffle 4: 2 upsamplers
        k = k.replace("prior_encoder.stem.", "condition.E.0.")
        k = re.sub(r"prior_encoder\.res_blocks\.(\d+)\.conv(\d)\.",
                   lambda m: f"condition.E.{int(m[1]) + 2}.body.{0 if m[2] == '1' else 2}.", k)
        k = re.sub(r"prior_encoder\.widen\.(\d)\.",
                   lambda m: f"condition.E.{2 + c.prior_res_blocks + 2 * int(m[1])}.", k)
        k = re.sub(r"prior_encoder\.mlp\.(\d)\.", lambda m: f"condition.mlp.{2 * int(m[1])}.", k)
        k = re.sub(r"denoiser\.layers\.(\d+)\.",
                   lambda m: "denoise.resmlp.0." if m[1] == "0" else f"denoise.resmlp.{int(m[1]) + 1}.resmlp.0.", k)
        official[k] = value.clone()
    # The official module registers CPEN and the denoiser twice (also under `diffusion.`) and saves the schedule.
    for k, v in list(official.items()):
        if k.startswith(("condition.", "denoise.")):
            official["diffusion." + k.replace("condition.", "condition.").replace("denoise.", "model.")] = v
    from mmig_core.diffrir.network import beta_schedule
    official["diffusion.betas"] = beta_schedule(c).float()
    return {"module." + k: v for k, v in official.items()}


def test_official_checkpoint_keys_map_and_load(tiny, tmp_path):
    assert OFFICIAL_RENAMES
    state = official_state_dict(tiny)
    assert "module.G.encoder_level1.0.attn.kernel.0.weight" in state and "module.condition.E.0.weight" in state
    torch.save({"params_ema": state}, tmp_path / "DiffRIR.pth")
    loaded = load_diffrir(tmp_path / "DiffRIR.pth")
    assert infer_official_config({k.removeprefix("module."): v for k, v in state.items()}) == tiny.config
    x = torch.rand(1, 6, 32, 32)
    torch.testing.assert_close(loaded(x, torch.Generator().manual_seed(0)), tiny(x, torch.Generator().manual_seed(0)))


class NotATensor:
    """An arbitrary object: unpickling it would run code, so weights_only refuses it."""


def test_pickled_objects_in_a_pth_are_refused(tmp_path):
    torch.save({"params": {"w": torch.zeros(1)}, "extra": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ModelFilesError, match="weights_only=True"):
        load_diffrir(tmp_path / "evil.pth")


@pytest.mark.parametrize("channels, ok", [(1, True), (4, True), (2, False)])
def test_channel_counts(tiny, channels, ok):
    images = torch.rand(1, 32, 32, channels)
    reference, mask = torch.rand(1, 32, 32, 3), torch.ones(1, 32, 32)
    if ok:
        assert restore_images(tiny, images, reference, mask, tile=0).shape == (1, 32, 32, 3)
    else:
        with pytest.raises(DiffRIRInputError, match="2 channels.*Convert it to RGB"):
            restore_images(tiny, images, reference, mask, tile=0)


@pytest.mark.parametrize("reference, mask, message", [
    (torch.rand(1, 32, 40, 3), torch.ones(1, 32, 32), "reference image is 40x32 but the generated image is 32x32"),
    (torch.rand(1, 32, 32, 3), torch.ones(1, 30, 32), "mask is 32x30 but the generated image is 32x32"),
    (torch.rand(2, 32, 32, 3), torch.ones(1, 32, 32), "reference image batch has 2 entries but the generated batch has 3"),
    (torch.rand(1, 32, 32, 3), torch.ones(2, 32, 32), "mask batch has 2 entries but the generated batch has 3"),
])
def test_mismatched_inputs_are_clear_errors(tiny, reference, mask, message):
    with pytest.raises(DiffRIRInputError, match=re.escape(message)):
        restore_images(tiny, torch.rand(3, 32, 32, 3), reference, mask, tile=0)
