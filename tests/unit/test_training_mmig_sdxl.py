"""training/sdxl.py against the host: the tiny single-file SDXL loaded by diffusers computes what the host's UNet
computes, and the training side's mid-block hook is the host's output-block patch at ("output", 0)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from devtools.tiny_mmsm import tiny_mmsm_config  # noqa: E402
from devtools.tiny_models import TINY_SDXL  # noqa: E402
from mmig_core.mmsm import MMSM, OutputBlockPatch, init_mmsm  # noqa: E402
from mmig_core.model_files import ModelFilesError  # noqa: E402
from training import sdxl  # noqa: E402


@pytest.fixture(scope="module")
def both(tiny_models, load_tiny_sdxl_in_host):
    host_model = load_tiny_sdxl_in_host(inference_mode=False)[0]
    return host_model.model, sdxl.load_sdxl(tiny_models / TINY_SDXL)


def inputs(batch=2, size=12):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([999, 400][:batch]),
            torch.randn(batch, 77, 2048, generator=g), torch.randn(batch, 1280, generator=g))


def host_eps(base_model, x, t, context, pooled, patch=None):
    height, width = x.shape[-2] * 8, x.shape[-1] * 8
    y = base_model.encode_adm(pooled_output=pooled, width=width, height=height)
    options = {"patches": {"output_block_patch": [patch]}} if patch else {}
    with torch.no_grad():
        return base_model.diffusion_model(x, t, context=context, y=y, transformer_options=options)


def training_eps(parts, x, t, context, pooled):
    cond = sdxl.added_conditioning(pooled, x.shape[-2] * 8, x.shape[-1] * 8)
    with torch.no_grad():
        return parts.unet(x, t, context, added_cond_kwargs=cond).sample


def test_the_single_file_unet_converted_by_diffusers_matches_the_hosts(both):
    base_model, parts = both
    assert parts.unet.config.block_out_channels == [32, 64, 64]
    x, t, context, pooled = inputs()
    reference = host_eps(base_model, x, t, context, pooled)
    assert reference.abs().mean() > 1e-3  # a real output, not zeros
    assert (training_eps(parts, x, t, context, pooled) - reference).abs().max().item() < 1e-4


def test_the_mid_block_hook_is_the_hosts_output_block_0_patch(both):
    base_model, parts = both
    mmsm = init_mmsm(MMSM(tiny_mmsm_config()), seed=3, decoder_std=0.2)
    text = torch.randn(2, 5, mmsm.config.text_dim, generator=torch.Generator().manual_seed(1))
    x, t, context, pooled = inputs()
    host = host_eps(base_model, x, t, context, pooled, OutputBlockPatch(mmsm, text, None, 1.0))
    plain = training_eps(parts, x, t, context, pooled)
    with sdxl.mid_block_hook(parts.unet, lambda features: mmsm(text, features)):
        hooked = training_eps(parts, x, t, context, pooled)
    assert (hooked - plain).abs().max().item() > 1e-3  # the trained MMSM does change the output
    assert (hooked - host).abs().max().item() < 1e-4
    assert (training_eps(parts, x, t, context, pooled) - plain).abs().max().item() == 0  # hook removed


def test_the_taesd_latents_are_the_hosts(both, tiny_models):
    import comfy.sd
    import comfy.utils
    _, parts = both
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    checkpoint = comfy.utils.load_torch_file(str(tiny_models / TINY_SDXL))
    vae = comfy.sd.VAE(sd={k[len(sdxl.LDM_VAE_PREFIX):]: v for k, v in checkpoint.items()
                           if k.startswith(sdxl.LDM_VAE_PREFIX)})
    with torch.no_grad():  # the host's VAE Encode, then its SDXL latent scaling as the model takes it in
        host_latent = vae.encode(images.permute(0, 2, 3, 1)) * sdxl.SDXL_VAE_SCALING
        ours = parts.vae.encode(images)
    assert ours.shape == host_latent.shape == (1, 4, 4, 4)
    assert (ours - host_latent).abs().max().item() < 1e-4 * max(1.0, host_latent.abs().max().item())


def test_a_missing_or_pickled_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFilesError, match="not found"):
        sdxl.load_unet(tmp_path / "nope.safetensors")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(ModelFilesError, match="safetensors"):
        sdxl.load_unet(pickle)


def test_the_text_encoders_give_the_hosts_clip_text_encode(both, tiny_models):
    import comfy.sd

    from devtools.paths import host_dir
    with torch.inference_mode():  # as the host loads it
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_models / TINY_SDXL), output_vae=False,
                                                              output_clip=True, embedding_directory=None)
    encoders = sdxl.load_text_encoders(tiny_models / TINY_SDXL, host_dir() / "comfy" / "sd1_tokenizer")
    assert len(encoders.tokenizer) == 49408
    captions = ["a red cat beside a blue dog", "a house"]
    ours = encoders(captions)
    assert ours.context.shape == (2, 77, 2048) and ours.pooled.shape == (2, 1280)
    for i, caption in enumerate(captions):
        with torch.inference_mode():
            context, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
        assert (ours.context[i] - context[0].float()).abs().max().item() < 1e-3 * max(1, context.abs().max().item())
        assert (ours.pooled[i] - pooled[0].float()).abs().max().item() < 1e-3 * max(1, pooled.abs().max().item())
    with pytest.raises(ModelFilesError, match="tokenizer"):
        sdxl.load_text_encoders(tiny_models / TINY_SDXL)
