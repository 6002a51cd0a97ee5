"""DiffRIR weights on disk: the pack's safetensors (config in the metadata) and the official checkpoint.

The pack's file: `save_diffrir(model, path)` writes the learned weights with safetensors and the
config as JSON under the metadata key "mmig.diffrir.config"; it is written atomically (temp file,
then os.replace) so a crash never leaves half a file under the loader's name.

The official DiffRIR/DiffIR checkpoint (a basicsr `.pth`: {"params_ema": ...} or {"params": ...},
keys such as `G.encoder_level1.0.attn.kernel.0.weight`, `condition.E.0.weight`,
`denoise.resmlp.0.weight`) is read with torch.load(weights_only=True) only, its sizes are inferred
from the tensor shapes (the feed-forward width per level, as the official int(width · 2.2)), and its
keys are renamed to this module's. Only the x1 network (same-size restoration) is accepted; the x2/x4
super-resolution variants and stage-one checkpoints get an error naming what was found. To get a
.safetensors, `python -m mmig_core.diffrir.convert` (see `convert`); a .safetensors with the official
keys loads here too.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch

from ..model_files import (ModelFilesError, check_tensors, load_safetensors_checked,
                           save_safetensors_atomic)
from .config import DiffRIRConfig
from .network import DiffRIR

CONFIG_KEY = "mmig.diffrir.config"
FORMAT_KEY = "mmig.format"
FORMAT = "diffrir-v1"

# Official name -> this module's name, applied in order to every key (after stripping "module.").
OFFICIAL_RENAMES = [
    (r"^G\.", "restorer."),
    (r"^condition\.", "prior_encoder."),
    (r"patch_embed\.proj\.", "embed."),
    (r"encoder_level(\d)\.", r"encoder\1."),
    (r"decoder_level(\d)\.", r"decoder\1."),
    (r"down(\d)_\d\.body\.0\.", r"down\1.0."),
    (r"up(\d)_(\d)\.body\.0\.", r"up\2.0."),
    (r"reduce_chan_level(\d)\.", r"reduce\1."),
    (r"\.norm(\d)\.body\.", r".norm\1."),
    (r"\.(attn|ffn)\.kernel\.0\.", r".\1.modulation.to_scale_shift."),
    (r"\.qkv_dwconv\.", ".qkv_depthwise."),
    (r"\.ffn\.dwconv\.", ".ffn.depthwise."),
    (r"^prior_encoder\.E\.0\.", "prior_encoder.stem."),
    (r"^prior_encoder\.mlp\.0\.", "prior_encoder.mlp.0."),
    (r"^prior_encoder\.mlp\.2\.", "prior_encoder.mlp.1."),
]


def _rename_official(key: str, res_blocks: int) -> str | None:
    key = key.removeprefix("module.")
    if key.startswith("diffusion."):  # duplicates of condition/denoise, and schedule buffers
        return None
    # denoise.resmlp = [Linear, LeakyReLU, ResMLP x n]; each ResMLP wraps [Linear, LeakyReLU]
    match = re.match(r"^denoise\.resmlp\.(\d+)\.(?:resmlp\.0\.)?(weight|bias)$", key)
    if match:
        index = int(match.group(1))
        return f"denoiser.layers.{0 if index == 0 else index - 1}.{match.group(2)}"
    for pattern, replacement in OFFICIAL_RENAMES:
        key = re.sub(pattern, replacement, key)
    # CPEN's Sequential E = [stem, LeakyReLU, ResBlock x n, conv, act, conv, act, conv, act, pool]
    match = re.match(r"^prior_encoder\.E\.(\d+)\.(.*)$", key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if 2 <= index < 2 + res_blocks:
            rest = re.sub(r"^body\.0\.", "conv1.", re.sub(r"^body\.2\.", "conv2.", rest))
            return f"prior_encoder.res_blocks.{index - 2}.{rest}"
        widen = {2 + res_blocks: 0, 4 + res_blocks: 1, 6 + res_blocks: 2}.get(index)
        return None if widen is None else f"prior_encoder.widen.{widen}.{rest}"
    # The tail: Upsampler convs at 0, 2, ... then the output conv.
    match = re.match(r"^restorer\.tail\.0\.(\d+)\.(.*)$", key)
    if match:
        return f"restorer.tail.{match.group(1)}.{match.group(2)}"
    match = re.match(r"^restorer\.tail\.1\.(.*)$", key)
    if match:
        return f"restorer.tail.@out.{match.group(1)}"  # index fixed once the tail length is known
    return key


def is_official_state_dict(state: dict) -> bool:
    return any(k.removeprefix("module.").startswith(("G.patch_embed", "condition.E.")) for k in state)


# The official DiffRIRS2's first convolutions by scale: the input stacked for that scale, pixel-unshuffled.
OFFICIAL_SCALES = {
    96: "x1 (inference_diffrir.py --scale 1): the generated image + the masked reference, 6 channels, "
        "pixel-unshuffled by 4; same-size output",
    60: "x2 (options/train_DiffRIRS2_x2.yml): a half-size image + the masked reference unshuffled by 2, "
        "15 channels, unshuffled by 2 again; 2x super-resolved output",
    51: "x4 (options/train_DiffRIRS2_x4.yml): a quarter-size image + the masked reference unshuffled by 4, "
        "51 channels; 4x super-resolved output",
}
ACCEPTED = ("accepted: the official DiffRIRS2 x1 checkpoint (96 input channels at G.patch_embed; any width, "
            "block counts, heads, ffn_expansion_factor and LayerNorm type), or a .safetensors written by this "
            "pack (config in its metadata)")
LEVELS = ("encoder_level1", "encoder_level2", "encoder_level3", "latent")


def ffn_expansion_for(widths: list[int], hidden: list[int]) -> float:
    """The factor f with int(width * f) == hidden at every level, as the official FeedForward computes it.

    The official network takes int(width · 2.2) at each level (140, 281, 563, 1126 for width 64), so no
    single ratio hidden/width fits all levels; the shortest decimal in the intersection of the levels'
    intervals [h / w, (h + 1) / w) does, and is what the published configs write.
    """
    low = max(h / w for w, h in zip(widths, hidden))
    high = min((h + 1) / w for w, h in zip(widths, hidden))
    for digits in range(1, 9):
        step = 10 ** -digits
        candidate = round(math.ceil(low / step - 1e-9) * step, digits)
        for f in (candidate, round(candidate + step, digits)):
            if low <= f < high and all(int(w * f) == h for w, h in zip(widths, hidden)):
                return f
    raise ValueError(f"feed-forward widths {hidden} at level widths {widths} fit no single ffn_expansion_factor")


def describe_official(state: dict) -> str:
    """What an official-looking checkpoint is, in the words of its config, for error messages."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    parts = []
    embed = state.get("G.patch_embed.proj.weight")
    if embed is not None:
        parts.append(f"G.patch_embed {list(embed.shape)} (dim {embed.shape[0]}, {embed.shape[1]} input channels)")
    cpen = state.get("condition.E.0.weight")
    if cpen is not None:
        parts.append(f"condition.E.0 {cpen.shape[1]} input channels")
    if not any(k.startswith("denoise.") for k in state):
        parts.append("no denoise.* keys (a stage-one DiffRIRS1 teacher, which needs the ground truth at inference)")
    return ", ".join(parts) or "no G.patch_embed / condition.E keys"


def infer_official_config(state: dict) -> DiffRIRConfig:
    """The sizes of an official checkpoint, read from its tensor shapes; other scales/stages are refused."""
    state = {k.removeprefix("module."): v for k, v in state.items()}

    def count(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})

    embed = state["G.patch_embed.proj.weight"]
    dim, in_channels = embed.shape[0], embed.shape[1]
    if in_channels != 96 or not any(k.startswith("denoise.") for k in state):
        found = OFFICIAL_SCALES.get(in_channels) if any(k.startswith("denoise.") for k in state) else None
        if found:
            raise ModelFilesError(f"this official DiffRIR checkpoint is {found} [{describe_official(state)}]; the "
                                  f"pack restores at the image's own size only ({ACCEPTED}).")
        raise ModelFilesError(f"this checkpoint is not one the pack can run: {describe_official(state)} ({ACCEPTED}).")
    image_channels = state["G.tail.1.weight"].shape[0]
    unshuffle = int(round((in_channels / (2 * image_channels)) ** 0.5))
    widths = [dim * 2 ** level for level in range(4)]
    hidden = [state[f"G.{level}.0.ffn.project_out.weight"].shape[1] for level in LEVELS]
    heads = tuple(state[f"G.{level}.0.attn.temperature"].shape[0] for level in LEVELS)
    prior_dim = state["condition.mlp.0.weight"].shape[0]
    res_blocks = sum(1 for i in range(64) if f"condition.E.{i}.body.0.weight" in state)
    betas = state.get("diffusion.betas")
    timesteps = betas.shape[0] if betas is not None else 4
    try:
        ffn = ffn_expansion_for(widths, hidden)
    except ValueError as e:
        raise ModelFilesError(f"this official DiffRIR checkpoint does not fit the official network: {e}") from None
    return DiffRIRConfig(
        image_channels=image_channels, unshuffle=unshuffle, dim=dim,
        num_blocks=tuple(count(f"G.{level}.") for level in LEVELS),
        num_refinement_blocks=count("G.refinement."), heads=heads, ffn_expansion_factor=ffn,
        bias="G.encoder_level1.0.attn.qkv.bias" in state,
        layernorm_with_bias="G.encoder_level1.0.norm1.body.bias" in state,
        prior_dim=prior_dim, prior_features=state["condition.E.0.weight"].shape[0], prior_res_blocks=res_blocks,
        denoise_res_blocks=count("denoise.resmlp.") - 1,  # [Linear, LeakyReLU, ResMLP x n]; ReLU has no keys
        timesteps=timesteps,
        # float32 in the file: round away the storage error (the schedule is defined by two short decimals)
        linear_start=round(float(betas[0]), 6) if betas is not None else 0.1,
        linear_end=round(float(betas[-1]), 6) if betas is not None else 0.99)


def map_official_state_dict(state: dict, config: DiffRIRConfig) -> dict:
    tail_out = f"restorer.tail.{2 * int(math.log2(config.unshuffle))}."
    mapped = {}
    for key, value in state.items():
        new = _rename_official(key, config.prior_res_blocks)
        if new is not None:
            mapped[new.replace("restorer.tail.@out.", tail_out)] = value
    return mapped


def load_into(model: DiffRIR, state: dict, source: str) -> DiffRIR:
    """Load a state dict, or say which keys are missing, unexpected or of the wrong shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} (file {list(state[k].shape)}, config {list(expected[k].shape)})"
                   for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        parts = [f"{len(wrong)} with other shapes: {show(wrong)}" if wrong else "",
                 f"{len(missing)} missing: {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {show(unexpected)}" if unexpected else ""]
        raise ModelFilesError(
            f"{source} does not fit its DiffRIR config {model.config.to_json()}: "
            + "; ".join(p for p in parts if p) + ". The weights were saved for another config; "
            "re-save them with the config they were trained with.")
    model.load_state_dict(state)
    return model


def save_diffrir(model: DiffRIR, path: str | os.PathLike) -> Path:
    metadata = {CONFIG_KEY: model.config.to_json(), FORMAT_KEY: FORMAT}
    return save_safetensors_atomic(model.state_dict(), path, metadata)


def read_pth(path: Path) -> dict:
    """The state dict of a .pth checkpoint (params_ema, else params), read as tensors only."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFilesError(
            f"{path} cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}): it holds more "
            f"than tensors, and the pack never unpickles other objects. In the environment that made it, re-save "
            f"its weights alone (torch.save({{'params_ema': state_dict}}, 'DiffRIR.pth')) and use that file.") from None
    return check_tensors(_unwrap_checkpoint(raw, path), path)


def load_diffrir(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> DiffRIR:
    """Read the pack's safetensors, an official checkpoint (.pth/.pt), or a safetensors with official keys."""
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"DiffRIR weights not found: {path}.")
    if path.suffix in (".pth", ".pt"):
        state = read_pth(path)
        metadata = {}
    else:
        state, metadata = load_safetensors_checked(path)
    if CONFIG_KEY in metadata:
        try:
            config = DiffRIRConfig.from_json(metadata[CONFIG_KEY])
        except (ValueError, TypeError) as e:
            raise ModelFilesError(f"{path} has an unreadable DiffRIR config in its metadata: {e}") from None
    elif is_official_state_dict(state):
        try:
            config = infer_official_config(state)
        except KeyError as e:
            raise ModelFilesError(f"{path} looks like an official DiffRIR checkpoint but lacks {e} "
                                  f"(found: {describe_official(state)}; {ACCEPTED}).") from None
        except ModelFilesError as e:
            raise ModelFilesError(f"{path}: {e}") from None
        state = map_official_state_dict(state, config)
    else:
        prefixes = sorted({k.removeprefix("module.").split(".")[0] for k in state})
        raise ModelFilesError(
            f"{path} is neither a DiffRIR file written by this pack (no '{CONFIG_KEY}' metadata) nor an official "
            f"DiffRIR checkpoint (no G.patch_embed / condition.E keys; its keys start with "
            f"{', '.join(prefixes[:8]) or 'nothing'}); {ACCEPTED}.")
    try:
        config.check()  # before anything is allocated
    except (ValueError, TypeError) as e:
        raise ModelFilesError(f"{path} has an unusable DiffRIR config: {e}") from None
    model = load_into(DiffRIR(config), state, str(path))
    return model.to(dtype).eval().requires_grad_(False)


def _unwrap_checkpoint(raw, path: Path) -> dict:
    if isinstance(raw, dict):
        for key in ("params_ema", "params", "state_dict"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ModelFilesError(f"{path} holds no state dict of tensors (looked under params_ema, params, state_dict).")
    return raw
