"""The tiny SDXL checkpoint (devtools/tiny_sdxl.py) loads, encodes, samples and decodes in the real
host's own code, run in-process: the same loaders a server uses for a real SDXL checkpoint."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports Hugging Face libraries
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import filecmp  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from devtools import tiny_sdxl  # noqa: E402
from devtools.tiny_sdxl import CLIP_G_PREFIX, CLIP_L_PREFIX, UNET_PREFIX, VAE_PREFIX  # noqa: E402

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "ddim"]
LATENT = (1, 4, 8, 8)  # a 64x64 px image


def _read(path: Path, prefixes: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}


@pytest.fixture(scope="session")
def support():
    """The host made importable and the tiny model config registered with it."""
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import devtools.tiny_host_support as support
    return support


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, support) -> Path:
    return tiny_sdxl.build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "tiny_sdxl.safetensors")


# The host runs every graph under inference mode, and its CLIP constructor relies on that (it
# writes into a parameter in place): so do the loading and everything that touches the models.

@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    import comfy.sd

    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(tiny_ckpt), output_vae=True, output_clip=True, embedding_directory=None)
    return model, clip, vae


def _encode(clip, text: str):
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


@pytest.fixture(scope="module")
def conditioning(loaded):
    _, clip, _ = loaded
    (cond, pooled), (neg, neg_pooled) = _encode(clip, "a photo of a cat"), _encode(clip, "")
    return [[cond, {"pooled_output": pooled}]], [[neg, {"pooled_output": neg_pooled}]]


def _sample(model, conditioning, sampler: str) -> torch.Tensor:
    import comfy.sample

    positive, negative = conditioning
    latent = torch.zeros(LATENT)
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed=0)
        return comfy.sample.sample(model, noise, 4, 5.0, sampler, "normal", positive, negative, latent,
                                   seed=0, disable_pbar=True)


def test_checkpoint_has_the_real_sdxl_layout(tiny_ckpt):
    with safe_open(str(tiny_ckpt), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    expected = {
        UNET_PREFIX + "input_blocks.0.0.weight": (32, 4, 3, 3),
        UNET_PREFIX + "label_emb.0.0.weight": (128, 2816),  # pooled 1280 + 6 x 256 size embeddings
        UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (64, 2048),
        UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_v.weight": (64, 2048),
        UNET_PREFIX + "output_blocks.5.1.proj_in.weight": (64, 64),  # linear, as in SDXL
        UNET_PREFIX + "out.2.weight": (4, 32, 3, 3),
        CLIP_L_PREFIX + "text_model.embeddings.token_embedding.weight": (49408, 768),
        CLIP_L_PREFIX + "text_model.embeddings.position_embedding.weight": (77, 768),
        CLIP_L_PREFIX + "text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
        CLIP_L_PREFIX + "text_model.final_layer_norm.weight": (768,),
        CLIP_G_PREFIX + "token_embedding.weight": (49408, 1280),
        CLIP_G_PREFIX + "positional_embedding": (77, 1280),
        CLIP_G_PREFIX + "transformer.resblocks.0.attn.in_proj_weight": (3840, 1280),
        CLIP_G_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight": (256, 1280),
        CLIP_G_PREFIX + "text_projection": (1280, 1280),
        CLIP_G_PREFIX + "ln_final.weight": (1280,),
        VAE_PREFIX + "taesd_encoder.0.weight": (64, 3, 3, 3),
        VAE_PREFIX + "taesd_decoder.1.weight": (64, 4, 3, 3),  # what makes comfy.sd.VAE pick TAESD
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert all(k.startswith((UNET_PREFIX, CLIP_L_PREFIX, CLIP_G_PREFIX, VAE_PREFIX)) for k in shapes)
    text_weights = [k for k in shapes if k.startswith((CLIP_L_PREFIX, CLIP_G_PREFIX))
                    and not k.endswith("position_ids")]
    assert {dtypes[k] for k in text_weights} == {"F16"}


def test_build_is_deterministic(tiny_ckpt, tmp_path):
    again = tiny_sdxl.build_tiny_sdxl(tmp_path / "again.safetensors", seed=0)
    assert filecmp.cmp(tiny_ckpt, again, shallow=False)
    other = tiny_sdxl._unet_state_dict(seed=1)
    assert not torch.equal(other[UNET_PREFIX + "out.2.weight"],
                           _read(tiny_ckpt, (UNET_PREFIX + "out.2.weight",))[UNET_PREFIX + "out.2.weight"])


def test_host_detects_the_tiny_config_and_nothing_real(tiny_ckpt, support, loaded):
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models

    detected = comfy.model_detection.detect_unet_config(_read(tiny_ckpt, (UNET_PREFIX,)), UNET_PREFIX)
    assert {k: detected.get(k) for k in support.TINY_UNET_CONFIG} == support.TINY_UNET_CONFIG
    matching = [m for m in comfy.supported_models.models if m.matches(detected)]
    assert [getattr(m, "MMIG_TINY", False) for m in matching] == [True]

    model, _, _ = loaded
    assert getattr(model.model.model_config, "MMIG_TINY", False)
    assert isinstance(model.model.model_config, comfy.supported_models.SDXL)
    assert isinstance(model.model, comfy.model_base.SDXL)


def test_every_weight_is_loaded(tiny_ckpt, loaded):
    model, clip, vae = loaded
    sd = _read(tiny_ckpt)
    unet = {k[len(UNET_PREFIX):] for k in sd if k.startswith(UNET_PREFIX)}
    assert set(model.model.diffusion_model.state_dict()) == unet
    assert set(vae.first_stage_model.state_dict()) == {k[len(VAE_PREFIX):] for k in sd if k.startswith(VAE_PREFIX)}

    clip_sd = model.model.model_config.process_clip_state_dict(dict(sd))
    missing = set(clip.cond_stage_model.state_dict()) - set(clip_sd)
    # Exactly what a real SDXL checkpoint leaves out: CLIP-L's unused projection and logit scale.
    assert missing == {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}


def test_clip_load_sd_routes_each_encoder_by_width(tiny_ckpt, loaded):
    """The path DualCLIPLoader takes: one Hugging Face-named text encoder state dict at a time."""
    model, clip, _ = loaded
    clip_sd = model.model.model_config.process_clip_state_dict(_read(tiny_ckpt))
    with torch.inference_mode():
        for name, allowed_missing in (("clip_g", set()), ("clip_l", {"text_projection.weight"})):
            prefix = f"{name}.transformer."
            part = {k[len(prefix):]: v for k, v in clip_sd.items() if k.startswith(prefix)}
            missing, unexpected = clip.load_sd(part)  # a wrong route raises on the width mismatch
            assert set(missing) <= allowed_missing, name
            assert set(unexpected) <= {"text_model.embeddings.position_ids"}, name  # an index buffer


def test_clip_encodes_to_sdxl_conditioning(loaded):
    _, clip, _ = loaded
    cond, pooled = _encode(clip, "a photo of a cat")
    assert cond.shape == (1, 77, 2048) and pooled.shape == (1, 1280)
    assert torch.isfinite(cond).all() and torch.isfinite(pooled).all()
    other, other_pooled = _encode(clip, "a painting of a dog")
    assert not torch.equal(cond, other) and not torch.equal(pooled, other_pooled)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_gives_finite_latents(loaded, conditioning, sampler):
    model, _, _ = loaded
    samples = _sample(model, conditioning, sampler)
    assert samples.shape == LATENT
    assert torch.isfinite(samples).all() and samples.std() > 0


def test_vae_decodes_to_an_image(loaded, conditioning):
    model, _, vae = loaded
    samples = _sample(model, conditioning, "euler")
    with torch.inference_mode():
        image = vae.decode(samples)
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0
