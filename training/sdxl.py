"""The training side of SDXL, shared by the recipes (mmig, mumu): UNet, latents, noise, conditioning, L_SDM.

    parts = load_sdxl("models/checkpoints/sd_xl_base_1.0.safetensors")   # or a diffusers folder
    latents = parts.vae.encode(images)                         # [B, 3, H, W] in 0..1 -> the UNet's latents
    noisy, noise, timesteps = add_noise(parts.scheduler, latents, batch)     # per-sample seeds
    cond = load_text_encoders(path, tokenizer_folder)(captions)   # or empty_text_conditioning(B, parts.unet)
    eps = parts.unet(noisy, timesteps, cond.context, added_cond_kwargs=added_conditioning(cond.pooled, H, W)).sample
    loss = denoising_loss(eps, noise)                          # L_SDM, MMIG Eq. 14

What loads:
- a diffusers folder (`unet/`, `vae/`, `scheduler/` subfolders, as `save_pretrained` writes them; or one
  folder holding a UNet's config.json), through `UNet2DConditionModel.from_pretrained`;
- a single-file SDXL checkpoint in the original ldm layout (`model.diffusion_model.*`, what ComfyUI loads).
  Its UNet config is read off the weights' shapes (`detect_unet_config`), so an SDXL-family file of any
  width loads, the pack's tiny test SDXL included, and diffusers' own `from_single_file` converts the keys.
  A UNet trained against it (an MMSM, a LoRA) therefore matches the host's model exactly. The VAE is the
  checkpoint's own: TAESD (`first_stage_model.taesd_*`, the tiny SDXL) as diffusers' AutoencoderTiny, or
  SDXL's KL autoencoder as AutoencoderKL with SDXL's VAE config.

Latents are in the UNet's space: the VAE's output times its scaling factor (0.13025 for SDXL's KL VAE; 1 for
TAESD, whose encoder already outputs UNet latents, the same as the host's TAESD-XL loader).

Noise schedule: DDPM, 1000 steps, SDXL's scaled-linear betas 0.00085..0.012 (the host's SDXL `model_sampling` is
the same schedule). The prediction is epsilon, or v when a single-file checkpoint carries the `v_pred` key (the
marker the host's SDXL config reads as V_PREDICTION, as community v-prediction fine-tunes ship it): a recipe's
L_SDM then compares the UNet's output with `prediction_target` (the velocity), as the host samples it.

Text conditioning (the UNet's cross-attention context [B, 77, 2048] and pooled vector [B, 1280]):
- `load_text_encoders(path, tokenizer_folder)` -> `SDXLTextEncoders`: SDXL's own CLIP-L + CLIP-G, frozen, giving
  exactly what the host's CLIP Text Encode gives for a caption (checked against the host on the tiny SDXL). A
  single-file checkpoint carries no tokenizer files: name a folder with CLIP's vocab.json + merges.txt (e.g.
  ComfyUI's comfy/sd1_tokenizer); a diffusers folder has its own tokenizer/.
- `empty_text_conditioning`: zeros, the conditioning of no prompt (what ConditioningZeroOut gives); a recipe
  that uses it must say so: the caption then reaches the UNet only through what the recipe trains.

Mid-block hook (`mid_block_hook`): a forward hook on `unet.mid_block` that may replace its output. This is
the same point as the host's output-block patch at ("output", 0) (`mmig_core.mmsm.OutputBlockPatch`): there
`h` is the middle block's output before the skip connection is concatenated, which in diffusers is exactly
what `mid_block` returns to `up_blocks[0]`. tests/unit/test_training_mmig_sdxl.py checks it against the
host's UNet on the tiny SDXL.

Never imports comfy; diffusers is imported inside the functions.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mmig_core.model_files import ModelFilesError, check_safetensors_file
from training.recipe import sample_generators

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
SDXL_VAE_SCALING = 0.13025
SDXL_HEAD_CHANNELS = 64  # SDXL fixes the head width (num_head_channels), the weights' shapes do not show heads
SDXL_POOLED_DIM = 1280
SDXL_TEXT_TOKENS = 77
SOURCE_HINT = ("SDXL checkpoints come from e.g. stabilityai/stable-diffusion-xl-base-1.0 (the single file "
               "sd_xl_base_1.0.safetensors, or the diffusers folder).")


@dataclass
class SDXLParts:
    unet: Any  # diffusers UNet2DConditionModel
    vae: "LatentCodec"
    scheduler: Any  # diffusers DDPMScheduler


class LatentCodec(torch.nn.Module):
    """Images [B, 3, H, W] in 0..1 <-> the UNet's latents, around a diffusers autoencoder (frozen)."""

    def __init__(self, autoencoder, scaling_factor: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.scaling_factor = float(scaling_factor)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.autoencoder.encode(images * 2 - 1)
        latents = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        return latents * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable (no no_grad here): L_BLIP2 back-propagates through it."""
        images = self.autoencoder.decode(latents / self.scaling_factor).sample
        return ((images + 1) / 2).clamp(0, 1)


# --- loading -------------------------------------------------------------------------------------------------

def _indices(keys, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def _transformer_depth(keys, block: str) -> int:
    return len(_indices(keys, re.escape(block) + r"\.1\.transformer_blocks\.(\d+)\."))


def detect_unet_config(ldm_unet: dict[str, torch.Tensor]) -> dict:
    """The diffusers UNet2DConditionModel config of an SDXL-family UNet in ldm naming (keys without prefix)."""
    keys = list(ldm_unet)
    try:
        conv_in = ldm_unet["input_blocks.0.0.weight"]
        adm = ldm_unet["label_emb.0.0.weight"]
    except KeyError as e:
        raise ModelFilesError(f"not an SDXL UNet: {e.args[0]!r} is missing (an SDXL UNet has an `adm` input, "
                              f"label_emb). {SOURCE_HINT}") from None
    in_channels = conv_in.shape[1]
    blocks = _indices(keys, r"input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]  # input block indices of each level's resnets
    for i in blocks[1:]:
        if f"input_blocks.{i}.0.op.weight" in ldm_unet:
            levels.append([])
        else:
            levels[-1].append(i)
    channels = [ldm_unet[f"input_blocks.{level[0]}.0.out_layers.3.weight"].shape[0] for level in levels]
    depths = [max(_transformer_depth(keys, f"input_blocks.{i}") for i in level) for level in levels]
    up_depths = [max(_transformer_depth(keys, f"output_blocks.{i}") for i in range(n * (len(levels[0]) + 1),
                                                                                  (n + 1) * (len(levels[0]) + 1)))
                 for n in range(len(levels))]
    mid_depth = _transformer_depth(keys, "middle_block")
    if up_depths != depths[::-1] or (mid_depth and mid_depth != depths[-1]) or len({len(lv) for lv in levels}) != 1:
        raise ModelFilesError(f"unsupported UNet layout: transformer depths down {depths}, up {up_depths}, "
                              f"mid {mid_depth}; expected SDXL's symmetric layout")
    attention = next((k for k in keys if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    if attention is None:
        raise ModelFilesError("not an SDXL UNet: it has no cross-attention layers")
    proj_in = next(k for k in keys if k.endswith(".1.proj_in.weight"))
    return {
        "sample_size": 128,
        "in_channels": in_channels,
        "out_channels": ldm_unet["out.2.weight"].shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in depths[::-1]],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": len(levels[0]),
        "transformer_layers_per_block": [max(d, 1) for d in depths],
        "attention_head_dim": [max(c // SDXL_HEAD_CHANNELS, 1) for c in channels],  # diffusers: heads per level
        "cross_attention_dim": ldm_unet[attention].shape[1],
        "use_linear_projection": ldm_unet[proj_in].dim() == 2,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": adm.shape[1],
        "norm_num_groups": 32,
    }


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _single_file(path: Path) -> Path:
    if not path.is_file():
        raise ModelFilesError(f"SDXL checkpoint not found: {path}. Give a single-file .safetensors checkpoint or "
                              f"a diffusers folder. {SOURCE_HINT}")
    if path.suffix != ".safetensors":
        raise ModelFilesError(f"{path}: training reads .safetensors checkpoints only (no pickles). {SOURCE_HINT}")
    check_safetensors_file(path)
    return path


def _from_single_file(model_class, checkpoint: dict, config: dict):
    """diffusers' own ldm -> diffusers key conversion, with a config we give (no hub lookup)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        return model_class.from_single_file(checkpoint, config=folder, local_files_only=True)


def _cast(module, dtype):
    return module if dtype == torch.float32 else module.to(dtype)


def load_unet(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """An SDXL UNet2DConditionModel from a diffusers folder or a single-file ldm checkpoint (see module doc)."""
    from diffusers import UNet2DConditionModel
    path = Path(path)
    if path.is_dir():
        folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ModelFilesError(f"{path} is not a diffusers SDXL folder: no unet/config.json. {SOURCE_HINT}")
        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True,
                                                    use_safetensors=True)
    ldm_unet = _read_prefixed(_single_file(path), LDM_UNET_PREFIX)
    if not ldm_unet:
        raise ModelFilesError(f"{path} has no UNet weights ({LDM_UNET_PREFIX}*): not an SDXL checkpoint. {SOURCE_HINT}")
    config = detect_unet_config(ldm_unet)
    checkpoint = {LDM_UNET_PREFIX + k: v for k, v in ldm_unet.items()}
    return _cast(_from_single_file(UNet2DConditionModel, checkpoint, config), dtype)


def _taesd_to_diffusers(taesd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TAESD's `taesd_encoder.N` / `taesd_decoder.N` -> AutoencoderTiny's `encoder.layers.N` / `decoder.layers.N-1`.

    TAESD's decoder starts with a parameter-free clamp at index 0, which AutoencoderTiny applies in forward."""
    out = {}
    for key, value in taesd.items():
        if key.startswith("taesd_encoder."):
            out["encoder.layers." + key[len("taesd_encoder."):]] = value
        elif key.startswith("taesd_decoder."):
            index, rest = key[len("taesd_decoder."):].split(".", 1)
            out[f"decoder.layers.{int(index) - 1}.{rest}"] = value
    return out


SDXL_KL_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 1024,
    "block_out_channels": [128, 256, 512, 512], "scaling_factor": SDXL_VAE_SCALING,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LatentCodec:
    from diffusers import AutoencoderKL, AutoencoderTiny
    path = Path(path)
    if path.is_dir():
        folder = path / "vae"
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else None
        if config is None:
            raise ModelFilesError(f"{path} has no vae/config.json: a diffusers SDXL folder has one. {SOURCE_HINT}")
        cls = AutoencoderTiny if config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL
        vae = cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True, use_safetensors=True)
        return LatentCodec(vae, vae.config.scaling_factor)
    ldm_vae = _read_prefixed(_single_file(path), LDM_VAE_PREFIX)
    if any(k.startswith("taesd_") for k in ldm_vae):
        vae = AutoencoderTiny(latent_channels=4, scaling_factor=1.0)
        missing, unexpected = vae.load_state_dict(_taesd_to_diffusers(ldm_vae), strict=False)
        if missing or unexpected:
            raise ModelFilesError(f"{path}: its TAESD weights do not fit (missing {missing[:3]}, unexpected "
                                  f"{unexpected[:3]})")
        # the host's TAESD-XL decodes latent * vae_scale / 0.13025-scaled latents: the UNet sees encoder output
        return LatentCodec(_cast(vae, dtype), 1.0)
    if not ldm_vae:
        raise ModelFilesError(f"{path} has no VAE weights ({LDM_VAE_PREFIX}*); use a checkpoint with its VAE baked in")
    checkpoint = {LDM_VAE_PREFIX + k: v for k, v in ldm_vae.items()}
    vae = _from_single_file(AutoencoderKL, checkpoint, SDXL_KL_VAE_CONFIG)
    return LatentCodec(_cast(vae, dtype), SDXL_VAE_SCALING)


V_PREDICTION_KEY = "v_pred"  # the host's marker of a v-prediction SDXL checkpoint (supported_models.SDXL)


def noise_scheduler(prediction_type: str = "epsilon"):
    """SDXL's training schedule: DDPM, 1000 steps, scaled-linear betas 0.00085..0.012; epsilon or v_prediction."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type, clip_sample=False)


def prediction_type(path: str | os.PathLike) -> str:
    """"v_prediction" for a single-file checkpoint with the host's `v_pred` key or a diffusers folder whose
    scheduler config says so; else "epsilon"."""
    path = Path(path)
    if path.is_dir():
        config = path / "scheduler" / "scheduler_config.json"
        kind = json.loads(config.read_text()).get("prediction_type", "epsilon") if config.is_file() else "epsilon"
        if kind not in ("epsilon", "v_prediction"):
            raise ModelFilesError(f"{config}: prediction_type {kind!r} is not trained here (epsilon or v_prediction)")
        return kind
    from safetensors import safe_open
    with safe_open(str(_single_file(path)), "pt") as f:
        return "v_prediction" if V_PREDICTION_KEY in f.keys() else "epsilon"


def load_sdxl(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> SDXLParts:
    """UNet + VAE + noise schedule, all frozen (requires_grad False, eval mode); a recipe unfreezes what trains."""
    unet, vae = load_unet(path, dtype), load_vae(path, dtype)
    for module in (unet, vae):
        module.requires_grad_(False).eval()
    return SDXLParts(unet=unet, vae=vae, scheduler=noise_scheduler(prediction_type(path)))


# --- text conditioning: SDXL's two CLIP text encoders ---------------------------------------------------------

@dataclass
class TextConditioning:
    context: torch.Tensor  # [B, 77, cross_attention_dim]
    pooled: torch.Tensor  # [B, 1280]


LDM_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
LDM_CLIP_G_PREFIX = "conditioner.embedders.1.model."
CLIP_TOKENS = 77


class SDXLTextEncoders(torch.nn.Module):
    """SDXL's text conditioning as the host computes it (CLIP Text Encode), frozen.

    context = [CLIP-L penultimate hidden states, CLIP-G penultimate hidden states] (768 + 1280 = 2048 wide for
    SDXL), pooled = CLIP-G's projected end token. One 77-token chunk: start token, up to 75 caption tokens (a
    longer caption is cut; the host would add a second chunk), end token, then CLIP-L pads with the end token
    and CLIP-G with token 0, as the host's SDXL tokenizers do."""

    def __init__(self, tokenizer, clip_l, clip_g):
        super().__init__()
        self.tokenizer, self.clip_l, self.clip_g = tokenizer, clip_l, clip_g

    def token_ids(self, captions: list[str], pad_id: int) -> torch.Tensor:
        start, end = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        rows = []
        for caption in captions:
            ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"][:CLIP_TOKENS - 2]
            rows.append([start, *ids, end] + [pad_id] * (CLIP_TOKENS - 2 - len(ids)))
        return torch.tensor(rows, device=self.clip_l.device)

    @torch.no_grad()
    def forward(self, captions: list[str]) -> TextConditioning:
        out_l = self.clip_l(self.token_ids(captions, self.tokenizer.eos_token_id), output_hidden_states=True)
        out_g = self.clip_g(self.token_ids(captions, 0), output_hidden_states=True)
        context = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        return TextConditioning(context=context, pooled=out_g.text_embeds)


def _clip_config(embedding: torch.Tensor, positions: int, layers: int, intermediate: int, projection_dim: int,
                 hidden_act: str):
    """A CLIP text config from the weights' shapes; SDXL's heads are 64 wide, activations fixed per encoder."""
    from transformers import CLIPTextConfig
    hidden = embedding.shape[1]
    return CLIPTextConfig(vocab_size=embedding.shape[0], hidden_size=hidden, num_attention_heads=hidden // 64,
                          num_hidden_layers=layers, intermediate_size=intermediate, max_position_embeddings=positions,
                          projection_dim=projection_dim, hidden_act=hidden_act, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=1)


def _load_strict(model, state: dict, where: str):
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 dropped the prefix here
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelFilesError(f"{where}: the text encoder weights do not fit (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model


def load_text_encoders(path: str | os.PathLike, tokenizer_folder: str | os.PathLike | None = None,
                       dtype: torch.dtype = torch.float32) -> SDXLTextEncoders:
    """SDXL's CLIP-L and CLIP-G from a diffusers folder (text_encoder/, text_encoder_2/, tokenizer/) or a
    single-file checkpoint, whose CLIP tokenizer files (vocab.json, merges.txt) are not in the file:
    `tokenizer_folder` names them (e.g. ComfyUI's comfy/sd1_tokenizer, or a diffusers SDXL's tokenizer/)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizerFast
    path = Path(path)
    if path.is_dir():
        tokenizer_folder = tokenizer_folder or path / "tokenizer"
        clip_l = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, use_safetensors=True)
        clip_g = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", local_files_only=True,
                                                             use_safetensors=True)
    else:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
        if not tokenizer_folder:
            raise ModelFilesError(f"{path} holds no CLIP tokenizer: name a folder with the CLIP tokenizer files "
                                  f"(vocab.json, merges.txt), e.g. ComfyUI/comfy/sd1_tokenizer")
        hf_l = _read_prefixed(_single_file(path), LDM_CLIP_L_PREFIX)
        open_clip = {LDM_CLIP_G_PREFIX + k: v for k, v in _read_prefixed(path, LDM_CLIP_G_PREFIX).items()}
        if not hf_l or not open_clip:
            raise ModelFilesError(f"{path} lacks SDXL's text encoders ({LDM_CLIP_L_PREFIX}*, {LDM_CLIP_G_PREFIX}*)")
        embedding = hf_l["text_model.embeddings.token_embedding.weight"]
        config_l = _clip_config(embedding, hf_l["text_model.embeddings.position_embedding.weight"].shape[0],
                                len(_indices(hf_l, r"text_model\.encoder\.layers\.(\d+)\.")),
                                hf_l["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], embedding.shape[1],
                                "quick_gelu")
        clip_l = _load_strict(CLIPTextModel(config_l), hf_l, str(path))
        # CLIP-G is stored in open_clip's naming: diffusers converts it (q/k/v split, projection transposed)
        g = LDM_CLIP_G_PREFIX
        config_g = _clip_config(open_clip[g + "token_embedding.weight"], open_clip[g + "positional_embedding"].shape[0],
                                len(_indices(open_clip, re.escape(g) + r"transformer\.resblocks\.(\d+)\.")),
                                open_clip[g + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                                open_clip[g + "text_projection"].shape[1], "gelu")
        clip_g = CLIPTextModelWithProjection(config_g)
        _load_strict(clip_g, convert_open_clip_checkpoint(clip_g, open_clip, prefix=LDM_CLIP_G_PREFIX), str(path))
    # the fast tokenizer (same ids as the host's) gives character offsets: concept words -> token columns
    tokenizer = CLIPTokenizerFast.from_pretrained(str(tokenizer_folder), local_files_only=True)
    if len(tokenizer) != clip_l.config.vocab_size:
        raise ModelFilesError(f"the CLIP tokenizer in {tokenizer_folder} has {len(tokenizer)} tokens, the text "
                              f"encoders {clip_l.config.vocab_size}: use SDXL's CLIP tokenizer")
    encoders = SDXLTextEncoders(tokenizer, clip_l.to(dtype).eval(), clip_g.to(dtype).eval())
    return encoders.requires_grad_(False)


# --- one training step's pieces ------------------------------------------------------------------------------


def empty_text_conditioning(batch: int, unet, device=None, dtype=None) -> TextConditioning:
    """Zero context and pooled vector: the conditioning of no prompt (see "Text conditioning" above)."""
    width = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return TextConditioning(context=torch.zeros(batch, SDXL_TEXT_TOKENS, width, device=device, dtype=dtype),
                            pooled=torch.zeros(batch, pooled, device=device, dtype=dtype))


def added_conditioning(pooled: torch.Tensor, height: int, width: int, crop_top: int = 0,
                       crop_left: int = 0) -> dict[str, torch.Tensor]:
    """SDXL's micro-conditioning: pooled text embeds + time ids (original size, crop, target size, in pixels)."""
    ids = torch.tensor([height, width, crop_top, crop_left, height, width], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": pooled, "time_ids": ids.expand(pooled.shape[0], -1)}


def add_noise(scheduler, latents: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z_t, eps and t for each sample, every draw from that sample's own seed (`batch["sample_seed"]`)."""
    noises, steps = [], []
    for latent, generator in zip(latents, sample_generators(batch)):
        steps.append(torch.randint(0, scheduler.config.num_train_timesteps, (), generator=generator))
        noises.append(torch.randn(latent.shape, generator=generator))
    noise = torch.stack(noises).to(latents.device, latents.dtype)
    timesteps = torch.stack(steps).to(latents.device)
    return scheduler.add_noise(latents, noise, timesteps), noise, timesteps


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output: the noise (epsilon) or the velocity sqrt(a_t) eps - sqrt(1 - a_t) x_0."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def predicted_x0(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The clean latent the UNet's output implies: (z_t - sqrt(1 - a_t) eps) / sqrt(a_t) for epsilon,
    sqrt(a_t) z_t - sqrt(1 - a_t) v for v-prediction."""
    alphas = scheduler.alphas_cumprod.to(noisy.device, noisy.dtype)[timesteps].view(-1, *[1] * (noisy.dim() - 1))
    if scheduler.config.prediction_type == "v_prediction":
        return alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
    return (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()


def denoising_loss(eps_prediction: torch.Tensor, noise: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """L_SDM (MMIG Eq. 14): ||eps - eps_theta(z_t, t)||^2, mean over elements and batch. For a v-prediction UNet
    pass `prediction_target(...)` (the velocity) as `noise`.

    `weight` (broadcast to the prediction, e.g. [B, 1, h, w]) makes it a weighted mean: sum(w e^2) / sum(w)."""
    if weight is None:
        return F.mse_loss(eps_prediction.float(), noise.float())
    error = (eps_prediction.float() - noise.float()).square()
    weight = weight.float().expand_as(error)
    return (weight * error).sum() / weight.sum()


@contextmanager
def mid_block_hook(unet, replace: Callable[[torch.Tensor], torch.Tensor | None]):
    """While active, `replace(mid_block_output)` runs on every UNet call; a returned tensor replaces the output.

    The host's output-block patch at ("output", 0) sees the same tensor (see the module doc)."""
    def hook(_module, _args, output):
        return replace(output)

    handle = unet.mid_block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
