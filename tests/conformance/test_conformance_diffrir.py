"""DiffRIR against the official code (Zj-BinXia/DiffRIR), from the facts in tests/conformance/diffrir/.

- An official checkpoint at the published x1 config (names and shapes of the official DiffRIRS2's
  state_dict, with its shared tensors) loads through the pack's loader from `params_ema` and `params`;
  the x2/x4 super-resolution variants get an error naming the config found and the configs accepted.
- On a small config with seeded weights, the pack's restoration equals the official inference
  procedure's output (pad to 32, mask binarised at 0.5, crop, paste-back) within 1e-5.

Regenerate the facts with `python -m devtools.conformance diffrir --reference <checkout of Zj-BinXia/DiffRIR>`.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from devtools.conformance.diffrir import FIXTURES, manifest_entry, official_checkpoint, small_official_checkpoint
from mmig_core.diffrir import load_diffrir, restore_images
from mmig_core.model_files import ModelFilesError

FORWARD_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURES / "manifest.json").read_text())


def test_the_manifest_is_the_published_x1_network(manifest):
    x1 = manifest["x1"]
    assert x1["kwargs"]["ffn_expansion_factor"] == 2.2 and x1["kwargs"]["LayerNorm_type"] == "BiasFree"
    hidden = [x1["state_dict"][f"G.{level}.0.ffn.project_out.weight"][1]
              for level in ("encoder_level1", "encoder_level2", "encoder_level3", "latent")]
    assert hidden == [int(64 * 2 ** level * 2.2) for level in range(4)]  # 140, 281, 563, 1126: no single ratio
    assert any("diffusion.model." in name for group in x1["shared"] for name in group)


@pytest.mark.parametrize("key", ["params_ema", "params"])
def test_an_official_x1_checkpoint_loads(manifest, tmp_path, key):
    state = official_checkpoint(manifest["x1"])
    torch.save({key: state}, tmp_path / "DiffRIR.pth")
    model = load_diffrir(tmp_path / "DiffRIR.pth")
    c = model.config
    assert (c.dim, c.num_blocks, c.num_refinement_blocks, c.heads, c.ffn_expansion_factor, c.layernorm_with_bias,
            c.prior_res_blocks, c.timesteps) == (64, (13, 1, 1, 1), 13, (1, 2, 4, 8), 2.2, False, 9, 4)
    # Every learned official tensor landed somewhere: the pack's state is the de-duplicated official one.
    learned = {n for n in state if not n.startswith("diffusion.")}
    assert sum(v.numel() for v in model.state_dict().values()) == sum(state[n].numel() for n in learned)
    assert torch.equal(model.restorer.latent[0].ffn.project_out.weight, state["G.latent.0.ffn.project_out.weight"])
    if key == "params_ema":  # the published network runs end to end (one 32x32 step: the smallest it takes)
        out = restore_images(model, torch.rand(1, 32, 32, 3), torch.rand(1, 32, 32, 3), torch.ones(1, 32, 32), tile=0)
        assert out.shape == (1, 32, 32, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("variant, found", [("x2", "x2 (options/train_DiffRIRS2_x2.yml)"),
                                            ("x4", "x4 (options/train_DiffRIRS2_x4.yml)")])
def test_super_resolution_variants_are_refused_by_name(manifest, tmp_path, variant, found):
    torch.save({"params_ema": official_checkpoint(manifest[variant])}, tmp_path / f"DiffRIR_{variant}.pth")
    with pytest.raises(ModelFilesError) as error:
        load_diffrir(tmp_path / f"DiffRIR_{variant}.pth")
    message = str(error.value)
    assert found in message and "accepted: the official DiffRIRS2 x1 checkpoint" in message


def test_the_pack_computes_what_the_official_inference_computes(tmp_path):
    spec = json.loads((FIXTURES / "forward.json").read_text())
    fixture = load_file(str(FIXTURES / "forward.safetensors"))
    torch.save({"params_ema": small_official_checkpoint()}, tmp_path / "small.pth")
    model = load_diffrir(tmp_path / "small.pth")
    assert model.config.ffn_expansion_factor == spec["kwargs"]["ffn_expansion_factor"]

    def bhwc(x):
        return x.permute(0, 2, 3, 1)

    image, reference, mask = bhwc(fixture["image"]), bhwc(fixture["reference"]), fixture["mask"][:, 0]
    assert ((mask > 0) & (mask < 1)).any()  # a soft mask: the default binarises it as the official script does
    raw = restore_images(model, image, reference, mask, tile=0, paste_back=False, seed=spec["noise_seed"])
    pasted = restore_images(model, image, reference, mask, tile=0, seed=spec["noise_seed"])
    expected_raw = bhwc(fixture["network_output"]).clamp(0, 1)  # the node's IMAGE is clamped; 8-bit saving clamps too
    expected = bhwc(fixture["restored"]).clamp(0, 1)
    assert (bhwc(fixture["network_output"]) == expected_raw).float().mean() > 0.95  # little is clamped away
    print(f"DiffRIR forward vs official: max abs diff {(raw - expected_raw).abs().max():.3g} (network), "
          f"{(pasted - expected).abs().max():.3g} (restored)")
    torch.testing.assert_close(raw, expected_raw, atol=FORWARD_TOLERANCE, rtol=0)
    torch.testing.assert_close(pasted, expected, atol=FORWARD_TOLERANCE, rtol=0)
    # The soft mask is a different computation (the pack's option), not silently the same one.
    soft = restore_images(model, image, reference, mask, tile=0, seed=spec["noise_seed"], soft_mask=True)
    assert (soft - expected).abs().max() > 1e-3


@pytest.mark.parametrize("official_keys", [False, True])
def test_the_readme_conversion_works_on_shared_memory_tensors(tmp_path, official_keys):
    import subprocess
    import sys

    from safetensors.torch import save_file
    state = small_official_checkpoint()
    with pytest.raises(RuntimeError, match="share memory"):  # why a plain save_file fails on a real checkpoint
        save_file(state, str(tmp_path / "naive.safetensors"))
    torch.save({"params": state, "params_ema": state}, tmp_path / "DiffRIR.pth")
    command = [sys.executable, "-m", "mmig_core.diffrir.convert", str(tmp_path / "DiffRIR.pth"),
               str(tmp_path / "DiffRIR.safetensors")] + (["--official-keys"] if official_keys else [])
    done = subprocess.run(command, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    converted, original = load_diffrir(tmp_path / "DiffRIR.safetensors"), load_diffrir(tmp_path / "DiffRIR.pth")
    assert converted.config == original.config
    for (name, a), b in zip(converted.state_dict().items(), original.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("state, message", [
    (lambda: official_checkpoint(manifest_entry("small_s1")), "stage-one DiffRIRS1 teacher"),
    (lambda: {"conv_first.weight": torch.zeros(64, 3, 3, 3), "body.0.rdb1.conv1.weight": torch.zeros(32, 64, 3, 3)},
     "its keys start with body, conv_first"),  # an RRDBNet (Real-ESRGAN) state dict
])
def test_other_architectures_name_what_was_found_and_what_is_accepted(tmp_path, state, message):
    torch.save({"params_ema": state()}, tmp_path / "other.pth")
    with pytest.raises(ModelFilesError) as error:
        load_diffrir(tmp_path / "other.pth")
    assert message in str(error.value) and "accepted: the official DiffRIRS2 x1 checkpoint" in str(error.value)
