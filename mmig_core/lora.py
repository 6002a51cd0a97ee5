"""LoRA files: the pack's own matching (kohya, diffusers and peft layouts onto an SDXL UNet or any named
model, for training and the VLM LoRA), and the host-agnostic facts and maths the UNet merge needs around the
host's own LoRA loader (tensor families of every format, module names, DoRA).

MUMU trains rank-8 LoRAs on SDXL's UNet and merges them into community fine-tunes (MUMU §5). The UNet can
be in the original ldm layout (`diffusion_model.input_blocks.4.1...`, what ComfyUI and .safetensors
checkpoints use) or the diffusers layout (`down_blocks.1.attentions.0...`); LoRA files name modules in
either. Every LoRA module is matched to one model weight, and ΔW = scale·(alpha/rank)·B·A.
MMIG LoRA Merge leaves the UNet's key mapping and every format's ΔW to the host (nodes/_host_lora.py).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model_files import ModelFilesError, load_safetensors_checked, save_safetensors_atomic

LDM_PREFIX = "diffusion_model."
# SDXL's UNet: up levels 0 and 1 (the two deepest) have transformers, so their upsampler sits at index 2.
SDXL_UP_LEVELS_WITH_ATTENTION = frozenset({0, 1})

_RESNET_LDM_TO_DIFFUSERS = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                            "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}
_TOP_LDM_TO_DIFFUSERS = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
                         "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
                         "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}
_TOP_DIFFUSERS_TO_LDM = {v: k for k, v in _TOP_LDM_TO_DIFFUSERS.items()}
# The host's key map also names SDXL's label embedding as diffusers' class embedding.
_CLASS_EMBEDDING = {"label_emb.0.0": "class_embedding.linear_1", "label_emb.0.2": "class_embedding.linear_2"}
_TOP_DIFFUSERS_TO_LDM.update({v: k for k, v in _CLASS_EMBEDDING.items()})

# Suffixes of the tensors of one LoRA module, per layout.
_TENSOR_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora.down.weight", "down"),
                    (".lora.up.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up"),
                    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"), (".alpha", "alpha"))
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "te1", "te2", "base_model.model.text_model")
# Old diffusers attention-processor names: attn1.processor.to_q_lora -> attn1.to_q.
_PROCESSOR_NAME = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


class LoRAError(ValueError):
    """A LoRA that cannot be applied; the message names the key and what to fix."""


def _sub_module(block: str, is_resnet: bool, inner: str, mapping: dict) -> str | None:
    if is_resnet:
        mapped = mapping.get(inner)
        return None if mapped is None else f"{block}.{mapped}"
    return f"{block}.{inner}" if inner else block  # transformer internals share their names


def ldm_to_diffusers_module(path: str) -> str | None:
    """`input_blocks.4.1.proj_in` -> `down_blocks.1.attentions.0.proj_in`; None for names SDXL does not have."""
    if path in _TOP_LDM_TO_DIFFUSERS:
        return _TOP_LDM_TO_DIFFUSERS[path]
    parts = path.split(".")
    try:
        if parts[0] == "input_blocks" and len(parts) >= 3 and parts[1] != "0":
            level, index = divmod(int(parts[1]) - 1, 3)
            if index == 2:  # the level's downsampler
                return f"down_blocks.{level}.downsamplers.0.conv" if parts[2:] == ["0", "op"] else None
            kind = {"0": "resnets", "1": "attentions"}.get(parts[2])
            return kind and _sub_module(f"down_blocks.{level}.{kind}.{index}", kind == "resnets",
                                        ".".join(parts[3:]), _RESNET_LDM_TO_DIFFUSERS)
        if parts[0] == "middle_block" and len(parts) >= 2:
            position = int(parts[1])
            block = "mid_block.attentions.0" if position == 1 else f"mid_block.resnets.{position // 2}"
            return _sub_module(block, position != 1, ".".join(parts[2:]), _RESNET_LDM_TO_DIFFUSERS)
        if parts[0] == "output_blocks" and len(parts) >= 3:
            level, index = divmod(int(parts[1]), 3)
            if parts[3:] == ["conv"]:
                return f"up_blocks.{level}.upsamplers.0.conv"
            kind = {"0": "resnets", "1": "attentions"}.get(parts[2])
            return kind and _sub_module(f"up_blocks.{level}.{kind}.{index}", kind == "resnets",
                                        ".".join(parts[3:]), _RESNET_LDM_TO_DIFFUSERS)
    except ValueError:
        return None
    return None


def diffusers_to_ldm_module(path: str, up_levels_with_attention=SDXL_UP_LEVELS_WITH_ATTENTION) -> str | None:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`; None for names SDXL does not have."""
    if path in _TOP_DIFFUSERS_TO_LDM:
        return _TOP_DIFFUSERS_TO_LDM[path]
    parts = path.split(".")
    try:
        if parts[0] == "down_blocks" and len(parts) >= 4:
            level = int(parts[1])
            if parts[2:5] == ["downsamplers", "0", "conv"] and len(parts) == 5:
                return f"input_blocks.{3 * (level + 1)}.0.op"
            sub = {"resnets": "0", "attentions": "1"}.get(parts[2])
            return sub and _sub_module(f"input_blocks.{3 * level + int(parts[3]) + 1}.{sub}", sub == "0",
                                       ".".join(parts[4:]), _RESNET_DIFFUSERS_TO_LDM)
        if parts[0] == "mid_block" and len(parts) >= 3:
            if parts[1] == "attentions":
                return _sub_module("middle_block.1", False, ".".join(parts[3:]), _RESNET_DIFFUSERS_TO_LDM)
            if parts[1] == "resnets":
                return _sub_module(f"middle_block.{2 * int(parts[2])}", True, ".".join(parts[3:]),
                                   _RESNET_DIFFUSERS_TO_LDM)
        if parts[0] == "up_blocks" and len(parts) >= 4:
            level = int(parts[1])
            if parts[2:5] == ["upsamplers", "0", "conv"] and len(parts) == 5:
                return f"output_blocks.{3 * level + 2}.{2 if level in up_levels_with_attention else 1}.conv"
            sub = {"resnets": "0", "attentions": "1"}.get(parts[2])
            return sub and _sub_module(f"output_blocks.{3 * level + int(parts[3])}.{sub}", sub == "0",
                                       ".".join(parts[4:]), _RESNET_DIFFUSERS_TO_LDM)
    except ValueError:
        return None
    return None


def build_key_table(model_keys) -> dict[str, str]:
    """Every name a LoRA may use for a weight (ldm or diffusers, dotted or kohya-flat) -> the model's key.

    Model keys may be ldm (`diffusion_model.…`, also under `model.`) or diffusers (`down_blocks.…`).
    """
    weights = [k for k in model_keys if k.endswith(".weight")]
    up_with_attention = {int(m.group(1)) for k in weights if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    table = {}
    for key in weights:
        module = key[:-len(".weight")]
        if LDM_PREFIX in module:
            ldm = module.split(LDM_PREFIX, 1)[1]
            aliases = (ldm, ldm_to_diffusers_module(ldm), _CLASS_EMBEDDING.get(ldm))
        else:
            aliases = (module, diffusers_to_ldm_module(module, up_with_attention or SDXL_UP_LEVELS_WITH_ATTENTION))
        for alias in aliases:
            if alias:
                table[alias] = key
                table["flat:" + alias.replace(".", "_")] = key
    return table


@dataclass
class LoRAModule:
    name: str            # as written in the file, without the tensor suffix
    layout: str          # kohya / diffusers / peft / ldm
    lookup: str          # the name looked up in the key table
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


def _classify(name: str) -> tuple[str, str] | None:
    """(layout, lookup name) of a module name; None for text-encoder modules."""
    if name.startswith(_TEXT_ENCODER_PREFIXES) or name.startswith("unet.text_model"):
        return None
    if name.startswith("lora_unet_"):
        return "kohya", "flat:" + name[len("lora_unet_"):]
    name = _PROCESSOR_NAME.sub(lambda m: "." + m.group(1) + (".0" if m.group(1) == "to_out" else ""), name)
    if name.startswith("base_model.model."):
        rest = name[len("base_model.model."):]
        return "peft", rest[len("unet."):] if rest.startswith("unet.") else rest
    if name.startswith("unet."):
        return "diffusers", name[len("unet."):]
    if LDM_PREFIX in name:
        return "ldm", name.split(LDM_PREFIX, 1)[1]
    return "diffusers", name


def group_lora_modules(state_dict: dict) -> tuple[list[LoRAModule], list[str], list[str]]:
    """(UNet modules, ignored text-encoder modules, keys of no known LoRA tensor)."""
    modules: dict[str, LoRAModule] = {}
    ignored, unknown = set(), []
    for key, tensor in state_dict.items():
        suffix = next(((s, part) for s, part in _TENSOR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        name = key[:-len(suffix[0])]
        classified = _classify(name)
        if classified is None:
            ignored.add(name)
            continue
        module = modules.setdefault(name, LoRAModule(name, *classified))
        if suffix[1] == "alpha":
            module.alpha = float(tensor.float().reshape(-1)[0])
        else:
            setattr(module, suffix[1], tensor)
    return list(modules.values()), sorted(ignored), sorted(unknown)


def check_shapes(module: LoRAModule, target_shape, model_key: str) -> None:
    """Raises LoRAError naming the key and both shapes when B·A cannot patch the target weight."""
    down, up = module.down, module.up
    rank = down.shape[0]
    if up.ndim < 2 or up.shape[1] != rank or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise LoRAError(f"LoRA module {module.name}: rank mismatch, up {tuple(up.shape)} does not fit "
                        f"down {tuple(down.shape)} (up must be [out, {rank}] or [out, {rank}, 1, 1]).")
    product_shape = (up.shape[0], *down.shape[1:])  # conv LoRA: down carries the kernel
    target_shape = tuple(target_shape)
    squeezed = lambda shape: tuple(s for s in shape if s != 1)  # noqa: E731 (a linear LoRA on a 1x1 conv)
    if product_shape != target_shape and (squeezed(product_shape) != squeezed(target_shape)
                                          or len(product_shape) == len(target_shape)):
        raise LoRAError(f"LoRA module {module.name}: shape mismatch, B·A is {product_shape} but the "
                        f"model weight {model_key} is {target_shape}.")


def lora_delta(module: LoRAModule, target_shape) -> torch.Tensor:
    """ΔW = (alpha/rank)·B·A in float32, shaped like the target weight (strength is applied by the caller)."""
    down, up = module.down, module.up
    scale = module.alpha / down.shape[0] if module.alpha is not None else 1.0
    delta = (up.flatten(1).float() @ down.flatten(1).float()) * scale
    return delta.reshape(tuple(target_shape))


@dataclass
class LoRAMatch:
    """Which modules of one LoRA matched which model weights; ΔW is computed only on request."""
    matched: list = field(default_factory=list)        # (LoRA module name, model key)
    matched_modules: list = field(default_factory=list)  # (LoRAModule, model key, target shape)
    unmatched: list = field(default_factory=list)      # (LoRA module, reason)
    ignored: list = field(default_factory=list)        # text-encoder modules: not for the UNet
    unknown_keys: list = field(default_factory=list)
    alpha_missing: list = field(default_factory=list)
    layouts: Counter = field(default_factory=Counter)

    def deltas(self) -> dict:
        """{model key: ΔW} (float32, without strength). Holds every ΔW at once: for tests and tools; the
        node hands the factors to the host instead, which multiplies them out one layer at a time."""
        deltas = {}
        for module, key, shape in self.matched_modules:
            deltas[key] = deltas.get(key, 0) + lora_delta(module, shape)
        return deltas

    def factors(self) -> tuple[dict, dict]:
        """(tensors, {LoRA name: model key}) with every matched module under its own name, as
        `name.lora_down.weight` / `name.lora_up.weight` / `name.alpha` (alpha = rank where it was missing)."""
        tensors, targets = {}, {}
        for index, (module, key, _shape) in enumerate(self.matched_modules):
            name = f"lora{index}"
            tensors[name + ".lora_down.weight"] = module.down
            tensors[name + ".lora_up.weight"] = module.up
            tensors[name + ".alpha"] = torch.tensor(float(module.alpha if module.alpha is not None
                                                          else module.down.shape[0]))
            targets[name] = key
        return tensors, targets

    @property
    def matched_fraction(self) -> float:
        total = len(self.matched) + len(self.unmatched)
        return len(self.matched) / total if total else 0.0

    def report(self, limit: int = 40) -> str:
        total = len(self.matched) + len(self.unmatched)
        layouts = ", ".join(f"{n} {layout}" for layout, n in sorted(self.layouts.items())) or "none"
        lines = [f"LoRA UNet modules matched: {len(self.matched)}/{total} ({100 * self.matched_fraction:.1f} %); "
                 f"layouts: {layouts}."]
        if self.ignored:
            lines.append(f"Text-encoder modules ignored (only the UNet is merged): {len(self.ignored)}.")
        if self.alpha_missing:
            lines.append(f"No alpha for {len(self.alpha_missing)} modules: alpha = rank used (scale 1), "
                         f"the convention. First: {self.alpha_missing[0]}")
        if self.unknown_keys:
            lines.append(f"Keys that are no LoRA tensor ({len(self.unknown_keys)}): "
                         + ", ".join(self.unknown_keys[:10]))
        if self.unmatched:
            lines.append("Unmatched:")
            lines += [f"  {name}: {reason}" for name, reason in self.unmatched[:limit]]
            if len(self.unmatched) > limit:
                lines.append(f"  ... and {len(self.unmatched) - limit} more")
        lines.append("Matched:")
        lines += [f"  {name} -> {key}" for name, key in self.matched[:limit]]
        if len(self.matched) > limit:
            lines.append(f"  ... and {len(self.matched) - limit} more")
        return "\n".join(lines)


def build_name_table(model_keys, prefix: str = "") -> dict[str, str]:
    """For any other model (e.g. the VLM): its own module names, dotted and kohya-flat, -> its keys."""
    table = {}
    for key in model_keys:
        if key.endswith(".weight") and key.startswith(prefix):
            module = key[len(prefix):-len(".weight")]
            table[module] = key
            table["flat:" + module.replace(".", "_")] = key
    return table


def match_lora(state_dict: dict, model_shapes: dict, table: dict | None = None) -> LoRAMatch:
    """Match a LoRA state dict onto a model given as {model key: weight shape}; check every shape.

    `table` maps the names a LoRA may use to model keys; by default the SDXL UNet's (build_key_table)."""
    table = build_key_table(model_shapes) if table is None else table
    modules, ignored, unknown = group_lora_modules(state_dict)
    result = LoRAMatch(ignored=ignored, unknown_keys=unknown)
    for module in modules:
        result.layouts[module.layout] += 1
        if module.down is None or module.up is None:
            missing = "down (lora_down / lora_A)" if module.down is None else "up (lora_up / lora_B)"
            result.unmatched.append((module.name, f"has no {missing} tensor"))
            continue
        model_key = table.get(module.lookup)
        if model_key is None:
            result.unmatched.append((module.name, "no weight of this name in the model"))
            continue
        try:
            check_shapes(module, model_shapes[model_key], model_key)
        except LoRAError as e:
            result.unmatched.append((module.name, str(e)))
            continue
        if module.alpha is None:
            result.alpha_missing.append(module.name)
        result.matched_modules.append((module, model_key, tuple(model_shapes[model_key])))
        result.matched.append((module.name, model_key))
    return result


def load_lora_file(path) -> tuple[dict, dict]:
    """(tensors, metadata) of a .safetensors LoRA; a clear error for anything else or a corrupt file."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelFilesError(f"{path.name}: LoRA files are read as .safetensors only (no pickles); convert "
                              f"it, e.g. with safetensors.torch.save_file.")
    # An integer LoRA would merge as garbage and a NaN one gives NaN images: refuse both, naming the tensor.
    try:
        return load_safetensors_checked(path, integer_scalars=(".alpha",))
    except ModelFilesError:
        raise
    except Exception as e:  # noqa: BLE001 — any other decode failure means a corrupt file
        raise ModelFilesError(f"{path} could not be read as safetensors ({e}); download it again.") from None


def to_kohya_state_dict(state_dict: dict, up_levels_with_attention=SDXL_UP_LEVELS_WITH_ATTENTION) -> dict:
    """A diffusers/peft/ldm UNet LoRA in the kohya layout with ldm names (as sd-scripts writes SDXL LoRAs)."""
    modules, _ignored, _unknown = group_lora_modules(state_dict)
    out = {}
    for module in modules:
        if module.down is None or module.up is None:
            raise LoRAError(f"LoRA module {module.name} lacks its {'down' if module.down is None else 'up'} tensor.")
        if module.layout == "kohya":
            ldm = module.lookup[len("flat:"):]
        elif module.layout == "ldm":
            ldm = module.lookup.replace(".", "_")
        else:
            dotted = diffusers_to_ldm_module(module.lookup, up_levels_with_attention)
            if dotted is None:
                raise LoRAError(f"LoRA module {module.name} names no SDXL UNet layer; cannot export it.")
            ldm = dotted.replace(".", "_")
        name = "lora_unet_" + ldm
        out[name + ".lora_down.weight"] = module.down.contiguous()
        out[name + ".lora_up.weight"] = module.up.contiguous()
        out[name + ".alpha"] = torch.tensor(float(module.alpha if module.alpha is not None else module.down.shape[0]))
    return out


def save_lora_file(state_dict: dict, path, metadata: dict | None = None) -> None:
    """Writes a LoRA .safetensors atomically."""
    save_safetensors_atomic(state_dict, path, metadata)


def export_kohya(source, target, alpha: float | None = None) -> int:
    """Converts a LoRA file (or a MUMU bundle folder's UNet LoRA) to the kohya layout; `alpha` fills in
    modules without one (peft keeps it in adapter_config.json). Returns the number of modules written."""
    from .mumu_bundle import is_bundle, read_bundle

    if is_bundle(source):  # a MUMU bundle folder: its UNet LoRA
        source = read_bundle(source).unet_lora
    state_dict, _metadata = load_lora_file(source)
    modules, _ignored, _unknown = group_lora_modules(state_dict)
    if not modules:
        raise LoRAError(f"{source} holds no UNet LoRA modules (lora_down/lora_up or lora_A/lora_B tensors).")
    if alpha is not None:
        for module in modules:
            if module.alpha is None:
                state_dict[module.name + ".alpha"] = torch.tensor(float(alpha))
    kohya = to_kohya_state_dict(state_dict)
    save_lora_file(kohya, target, metadata={"ss_network_module": "networks.lora",
                                            "mmig_exported_from": Path(source).name})
    return len(modules)


# --- Around the host's LoRA loader: what a file holds, in which spelling ---------------------------------------

# Tensor suffixes of one module, per format family: facts of the kohya, LyCORIS, diffusers and peft file formats.
LORA_FAMILIES = {
    "LoRA": (".lora_up.weight", ".lora_down.weight", "_lora.up.weight", "_lora.down.weight", ".lora.up.weight",
             ".lora.down.weight", ".lora_B.weight", ".lora_A.weight", ".lora_B.default.weight",
             ".lora_A.default.weight", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight",
             ".lora_B", ".lora_A"),
    "Tucker LoCon": (".lora_mid.weight",),
    "LoHa": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2"),
    "LoKr": (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t1",
             ".lokr_t2"),
    "DoRA": (".dora_scale",),
    "GLoRA": (".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight"),
    "OFT/BOFT": (".oft_blocks", ".oft_diag", ".rescale"),
    "IA3": (".on_input",),
    "norm diff": (".w_norm", ".b_norm"),
    "full diff": (".diff", ".diff_b", ".set_weight"),
    "scale": (".alpha", ".reshape_weight"),
}
_SUFFIXES = sorted(((s, family) for family, suffixes in LORA_FAMILIES.items() for s in suffixes),
                   key=lambda item: -len(item[0]))
# The kohya spelling every host version reads, for the down/up tensors of the other layouts.
_KOHYA_TENSOR = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight",
                 ".lora_A.default.weight": ".lora_down.weight", ".lora_B.default.weight": ".lora_up.weight",
                 ".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight",
                 "_lora.down.weight": ".lora_down.weight", "_lora.up.weight": ".lora_up.weight",
                 ".lora_linear_layer.down.weight": ".lora_down.weight",
                 ".lora_linear_layer.up.weight": ".lora_up.weight", ".lora_A": ".lora_down.weight",
                 ".lora_B": ".lora_up.weight"}
_HOST_TEXT_ENCODER_PREFIXES = _TEXT_ENCODER_PREFIXES + ("lora_prior_te", "text_encoders.", "text_encoder_2.")


def split_lora_key(key: str) -> tuple[str, str]:
    """(module, tensor suffix): `lora_unet_x.hada_w1_a` -> (`lora_unet_x`, `.hada_w1_a`); an unknown tensor
    splits at its last dot (`x.weight` -> `x`, `.weight`)."""
    for suffix, _family in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)], suffix
    module, dot, last = key.rpartition(".")
    return (module, dot + last) if module else (key, "")


def suffix_family(suffix: str) -> str | None:
    return next((family for s, family in _SUFFIXES if s == suffix), None)


def group_lora_keys(state_dict) -> dict[str, dict[str, str]]:
    """{module: {tensor suffix: key}} of every key of a file."""
    groups: dict[str, dict[str, str]] = {}
    for key in state_dict:
        module, suffix = split_lora_key(key)
        groups.setdefault(module, {})[suffix] = key
    return groups


def is_text_encoder_module(module: str) -> bool:
    return module.startswith(_HOST_TEXT_ENCODER_PREFIXES) or module.startswith("unet.text_model")


def module_kind(suffixes) -> str:
    """The format of one module from its tensor suffixes, as a report names it (e.g. `LoHa (Tucker) + DoRA`)."""
    suffixes = set(suffixes)
    families = {suffix_family(s) for s in suffixes} - {None, "scale"}
    if not families:
        return "unknown (" + ", ".join(sorted(suffixes)) + ")"
    dora = " + DoRA" if "DoRA" in families else ""
    families.discard("DoRA")
    if "Tucker LoCon" in families:
        families.discard("LoRA")
    if {".hada_t1", ".lokr_t2", ".lokr_t1"} & suffixes:
        families = {f"{f} (Tucker)" if f in ("LoHa", "LoKr") else f for f in families}
    if families == {"full diff"}:
        families = {"bias diff" if suffixes & {".diff", ".diff_b", ".set_weight"} == {".diff_b"} else "full diff"}
    return " + ".join(sorted(families)) + dora if families else "DoRA scale only"


def file_kind(state_dict) -> str:
    """What a file that is no LoRA of a known family holds, for the error that refuses it."""
    keys = list(state_dict)
    if not keys:
        return "an empty file"
    prefixes = {"model.diffusion_model.": "a full checkpoint (load it with Load Checkpoint)",
                "control_model.": "a ControlNet (load it with Load ControlNet Model)",
                "image_proj.": "an IP-Adapter", "ip_adapter.": "an IP-Adapter",
                "first_stage_model.": "a VAE inside a checkpoint", "encoder.down.": "a VAE (load it with Load VAE)"}
    for prefix, kind in prefixes.items():
        if any(k.startswith(prefix) for k in keys):
            return kind
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") or k.startswith("string_to_param.")
           for k in keys):
        return "a textual-inversion embedding (put it in ComfyUI/models/embeddings/)"
    if any(k.startswith(("input_blocks.", "down_blocks.", "diffusion_model.")) and k.endswith(".weight")
           and suffix_family(split_lora_key(k)[1]) is None for k in keys):
        return "a bare UNet state dict (a model, not a LoRA)"
    families = sorted({f for k in keys if (f := suffix_family(split_lora_key(k)[1])) not in (None, "scale")})
    if families:
        return "LoRA tensors of the kinds " + ", ".join(families)
    return "unknown tensors (first keys: " + ", ".join(keys[:5]) + ")"


def kohya_module_name(module: str) -> str | None:
    """A module named in the diffusers, peft or ldm-dotted layout, in the kohya spelling (`lora_unet_` + the
    dotted name with underscores) that every version of the host's key map holds; None if already kohya."""
    if module.startswith(("lora_unet_", "lora_prior_unet_", "lycoris_")):
        return None
    name = re.sub(r"\.processor\.(to_q|to_k|to_v)$", r".\1", module)  # old diffusers attention processors
    name = re.sub(r"\.processor\.to_out$", ".to_out.0", name)
    for prefix in ("base_model.model.", "unet.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    if LDM_PREFIX in name:
        name = name.split(LDM_PREFIX, 1)[1]
    return "lora_unet_" + name.replace(".", "_")


def kohya_tensor_suffix(suffix: str) -> str:
    """`.lora_A.weight` -> `.lora_down.weight` (the kohya spelling); other suffixes are the same everywhere."""
    return _KOHYA_TENSOR.get(suffix, suffix)


def dora_weight_change(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA (weight-decomposed LoRA): the change of `weight` at strength 1, as the newest ComfyUI computes it.

    W' = m · (W + ΔW) / ‖·‖ with the magnitude m = dora_scale. Its shape picks the axis: [out, 1, ...] normalises
    per output channel, [1, in, ...] per input channel. Per output channel the newest host divides by the norm of
    W itself, not of W + ΔW (LyCORIS uses W + ΔW): the pack follows the host, since the merge must give the
    weights Load LoRA gives. A strength s blends W + s·(W' - W), as the host does. float32 in, float32 out.
    """
    merged = weight + delta
    eps = torch.finfo(weight.dtype).eps
    if dora_scale.shape[0] == merged.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale.to(weight.dtype) / (norm + eps)) - weight
