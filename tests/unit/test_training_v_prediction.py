"""v-prediction SDXL checkpoints (the host's `v_pred` key, as community v-prediction fine-tunes ship it) in the
training side: the recipes read the key as the host does, train the UNet's output against the velocity, and the
clean latent they infer from it is the host's own denoised value for the same sigma."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from devtools.tiny_models import TINY_SDXL  # noqa: E402
from training import sdxl  # noqa: E402


@pytest.fixture(scope="module")
def v_checkpoint(tiny_models, tmp_path_factory):
    state = load_file(str(tiny_models / TINY_SDXL))
    state["v_pred"] = torch.tensor([])
    path = tmp_path_factory.mktemp("vpred") / "tiny-sdxl-vpred.safetensors"
    save_file(state, str(path))
    return path


def test_the_v_pred_key_makes_the_training_schedule_v_prediction(tiny_models, v_checkpoint):
    assert sdxl.prediction_type(tiny_models / TINY_SDXL) == "epsilon"
    assert sdxl.prediction_type(v_checkpoint) == "v_prediction"
    assert sdxl.load_sdxl(v_checkpoint).scheduler.config.prediction_type == "v_prediction"
    assert sdxl.load_sdxl(tiny_models / TINY_SDXL).scheduler.config.prediction_type == "epsilon"


def test_the_velocity_target_and_x0_match_the_hosts_v_prediction_sampling(v_checkpoint):
    from devtools import tiny_sdxl
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import comfy.model_base
    import comfy.sd
    import devtools.tiny_host_support  # noqa: F401  (teaches the host the tiny SDXL)

    host = comfy.sd.load_checkpoint_guess_config(str(v_checkpoint), output_vae=False, output_clip=False,
                                                 embedding_directory=None)[0].model
    assert host.model_type == comfy.model_base.ModelType.V_PREDICTION  # the host reads the same key
    scheduler = sdxl.load_sdxl(v_checkpoint).scheduler
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([999, 500, 20])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    velocity = sdxl.prediction_target(scheduler, latents, noise, timesteps)
    assert not torch.allclose(velocity, noise)
    # the host samples in k-diffusion space: x = z_t / sqrt(a_t) at sigma_t, denoised from the model's v output
    sigma = host.model_sampling.sigma(timesteps.float())
    alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    host_x0 = host.model_sampling.calculate_denoised(sigma, velocity, noisy / alphas.sqrt())
    ours = sdxl.predicted_x0(scheduler, noisy, velocity, timesteps)
    torch.testing.assert_close(host_x0, latents, atol=2e-4, rtol=1e-4)  # the exact target denoises exactly
    torch.testing.assert_close(ours, host_x0, atol=2e-4, rtol=1e-4)
    wrong = torch.randn(velocity.shape, generator=g)
    torch.testing.assert_close(sdxl.predicted_x0(scheduler, noisy, wrong, timesteps),
                               host.model_sampling.calculate_denoised(sigma, wrong, noisy / alphas.sqrt()),
                               atol=2e-4, rtol=1e-4)


def test_epsilon_checkpoints_keep_the_noise_target(tiny_models):
    scheduler = sdxl.load_sdxl(tiny_models / TINY_SDXL).scheduler
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([700, 10])
    assert torch.equal(sdxl.prediction_target(scheduler, latents, noise, timesteps), noise)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    torch.testing.assert_close(sdxl.predicted_x0(scheduler, noisy, noise, timesteps), latents, atol=1e-3, rtol=1e-3)


def test_a_diffusers_folder_says_its_prediction_type_and_an_unknown_one_is_refused(tmp_path):
    from mmig_core.model_files import ModelFilesError
    (tmp_path / "scheduler").mkdir()
    config = tmp_path / "scheduler" / "scheduler_config.json"
    assert sdxl.prediction_type(tmp_path) == "epsilon"  # no scheduler config: SDXL's own epsilon
    config.write_text('{"prediction_type": "v_prediction"}')
    assert sdxl.prediction_type(tmp_path) == "v_prediction"
    config.write_text('{"prediction_type": "sample"}')
    with pytest.raises(ModelFilesError, match="sample"):
        sdxl.prediction_type(tmp_path)
