"""A tiny random-weight checkpoint in the real SDXL single-file layout, for tests.

The interface widths are SDXL's (2048-d cross-attention context, 1280-d pooled vector, 2816-d `adm`
input, 4 latent channels, 8x VAE downscale, 49408-token vocabulary, 77 positions); everything inside
is shrunk. The host loads it with its own loaders once `devtools/tiny_host_support` (a test-only
custom node) has registered the matching model config; the architecture lives in that node's JSON
files, so the builder and the node cannot drift apart.

    python -m devtools.tiny_sdxl OUT_FILE [--seed N]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import torch

from devtools.paths import host_dir

SUPPORT_DIR = Path(__file__).resolve().parent / "tiny_host_support"

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

# What the host's own TAESD-XL loader (nodes.VAELoader.load_taesd) sets for SDXL latents.
TAESDXL_VAE_SCALE = 0.13025


def load_support_config(name: str) -> dict:
    """One of the architecture files shared with the support node: unet, clip_l or clip_g."""
    return json.loads((SUPPORT_DIR / f"{name}_config.json").read_text())


def import_host() -> None:
    """Make the host's `comfy` package importable in this process; safe to call again.

    The host goes at the end of sys.path: it ships top-level `nodes.py` and `tests/`, which must
    not shadow this repository's packages of the same names.
    """
    path = str(host_dir())
    if path not in sys.path:
        sys.path.append(path)
    if "comfy.model_management" in sys.modules:
        return  # already configured by whoever imported it first
    import comfy.options  # noqa: F401  (leaves argument parsing off, so cli_args parses no argv)
    import comfy.cli_args

    # model_management asks CUDA for its device at import time; without a GPU that fails unless told.
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


def _generator(seed: int, part: str) -> torch.Generator:
    # One stream per part: reshaping one part leaves the others' weights unchanged.
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{part}".encode()))


@torch.no_grad()
def _initialise(module: torch.nn.Module, gen: torch.Generator) -> None:
    # The host's layers skip weight init (comfy.ops.disable_weight_init): fill every tensor ourselves.
    for name, param in module.named_parameters():
        if param.dim() > 1:
            param.copy_(torch.empty(param.shape).normal_(0.0, 0.02, generator=gen))
        elif name.endswith("bias"):
            param.zero_()
        else:  # norm scales (and 0-d scalars, which callers overwrite)
            param.fill_(1.0)


def unet_build_config() -> dict:
    """UNetModel arguments: the detected part (JSON) plus what the host's SDXL config adds."""
    config = load_support_config("unet")
    config.update(image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential",
                  use_checkpoint=False, use_temporal_resblock=False, num_heads=-1, num_head_channels=64)
    return config


@torch.no_grad()
def _unet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**unet_build_config(), dtype=torch.float32, device="cpu",
                     operations=comfy.ops.disable_weight_init)
    _initialise(unet, _generator(seed, "unet"))
    return {UNET_PREFIX + k: v.float().contiguous() for k, v in unet.state_dict().items()}


@torch.no_grad()
def _vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from comfy.taesd.taesd import TAESD

    vae = TAESD()
    _initialise(vae, _generator(seed, "vae"))
    vae.vae_scale.fill_(TAESDXL_VAE_SCALE)
    if hasattr(vae, "vae_shift"):  # newer hosts' TAESD: latent = raw / scale + shift; SDXL has no shift
        vae.vae_shift.fill_(0.0)
    vae.taesd_decoder[-1].bias.fill_(0.5)  # mid-grey images, not ones clamped flat at black
    return {VAE_PREFIX + k: v.float().contiguous() for k, v in vae.state_dict().items()}


@torch.no_grad()
def _text_model(config: dict, seed: int, part: str) -> dict[str, torch.Tensor]:
    """A CLIP text model in Hugging Face naming (text_model.*, text_projection.weight), float16."""
    import comfy.clip_model
    import comfy.ops

    if (config["vocab_size"], config["max_position_embeddings"]) != (49408, 77):
        raise ValueError("the host's CLIP embeddings are fixed at 49408 tokens x 77 positions")
    model = comfy.clip_model.CLIPTextModel(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    _initialise(model, _generator(seed, part))
    return {k: v.half().contiguous() for k, v in model.state_dict().items()}


def _clip_l_state_dict(seed: int) -> dict[str, torch.Tensor]:
    hf = _text_model(load_support_config("clip_l"), seed, "clip_l")
    hf.pop("text_projection.weight")  # SDXL's CLIP-L has no projection: only its hidden states are used
    out = {CLIP_L_PREFIX + k: v for k, v in hf.items()}
    out[CLIP_L_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    return out


def _to_open_clip(hf: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face CLIP text naming -> open_clip naming, as SDXL stores its CLIP-G."""
    out = {
        "token_embedding.weight": hf.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": hf.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": hf.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": hf.pop("text_model.final_layer_norm.bias"),
        # open_clip multiplies x @ text_projection; a Linear stores the transpose.
        "text_projection": hf.pop("text_projection.weight").t().contiguous(),
    }
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
               "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for i in range(num_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{new}.{kind}"] = hf.pop(f"{src}{old}.{kind}")
        for kind in ("weight", "bias"):  # q, k, v fused in one in_proj, in that order
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [hf.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"]).contiguous()
    if hf:
        raise AssertionError(f"unconverted CLIP-G keys: {sorted(hf)}")
    return out


def _clip_g_state_dict(seed: int) -> dict[str, torch.Tensor]:
    config = load_support_config("clip_g")
    open_clip = _to_open_clip(_text_model(config, seed, "clip_g"), config["num_hidden_layers"])
    open_clip["logit_scale"] = torch.tensor(math.log(100.0), dtype=torch.float16)
    return {CLIP_G_PREFIX + k: v for k, v in open_clip.items()}


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint to `path` (one .safetensors file) and return the path.

    Deterministic for a given seed. UNet and VAE are stored in float32, the text encoders (nearly all
    of the file: two full 49408-token embedding tables) in float16.
    """
    from safetensors.torch import save_file

    import_host()
    path = Path(path)
    state_dict = {}
    for part in (_unet_state_dict, _clip_l_state_dict, _clip_g_state_dict, _vae_state_dict):
        state_dict.update(part(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    # One metadata entry only: safetensors writes several in random order, and the bytes must not vary.
    save_file(state_dict, str(partial), metadata={"format": "pt"})
    partial.replace(path)  # atomic: concurrent test sessions never see half a file
    return path


def count_parameters(path: Path) -> dict[str, int]:
    """Parameters per part of a checkpoint written by build_tiny_sdxl."""
    from safetensors import safe_open

    parts = {"unet": UNET_PREFIX, "clip_l": CLIP_L_PREFIX, "clip_g": CLIP_G_PREFIX, "vae": VAE_PREFIX}
    counts = dict.fromkeys(parts, 0)
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key.endswith("position_ids"):
                continue  # an index buffer, not a weight
            part = next(name for name, prefix in parts.items() if key.startswith(prefix))
            counts[part] += math.prod(f.get_slice(key).get_shape())
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_file", type=Path, help="where to write the .safetensors checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = build_tiny_sdxl(args.out_file, seed=args.seed)
    elapsed = time.perf_counter() - start
    counts = ", ".join(f"{name} {n / 1e6:.2f} M" for name, n in count_parameters(path).items())
    print(f"{path}: {path.stat().st_size / 2**20:.0f} MiB in {elapsed:.1f} s; parameters: {counts}")


if __name__ == "__main__":
    main()
