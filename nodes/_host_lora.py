"""A UNet LoRA through the host's own LoRA loader, with an account of every module it did not apply.

The host maps the names (`comfy.lora.model_lora_keys_unet`) and turns every format it knows into patches
(`comfy.lora.load_lora`), exactly as its Load LoRA node does. That loader only logs what it skips, so the pack
runs it on a dict that records which tensors it reads, and names each module left out instead of merging the
rest silently. Two things the host's loader lacks on some versions are filled in:
- the diffusers / peft spelling (`unet.…lora.down.weight`, `base_model.model.…lora_A.weight`) of modules the
  running host does not map: they are handed to it again in the kohya spelling every version reads;
- DoRA (`dora_scale`) on hosts before DoRA support (the pinned 2024-03 host): the pack computes each such layer's
  change once, as the newest host computes it, and adds it as a plain `diff` patch.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch

from ..mmig_core import lora as core

# Patch kinds whose ΔW does not depend on the weight it patches: the pack can rebuild DoRA on top of them.
_DORA_FALLBACK_KINDS = ("lora", "loha", "lokr")


class _ReadRecorder(dict):
    """A state dict that remembers which of its tensors the host's loader read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


@dataclass
class HostLoRA:
    """What the host's loader makes of one file on one model."""
    patches: dict = field(default_factory=dict)    # {model key: host patch}, for add_patches
    applied: list = field(default_factory=list)    # (module as in the file, model key, kind)
    dropped: list = field(default_factory=list)    # (module, reason)
    ignored: list = field(default_factory=list)    # text-encoder modules: not for the UNet
    by_pack: list = field(default_factory=list)    # modules whose DoRA the pack computed (host without DoRA)
    respelled: int = 0                             # modules handed to the host in the kohya spelling
    kind: str = ""                                 # what the file holds when nothing of it is a known LoRA

    @property
    def total(self) -> int:
        return len(self.applied) + len(self.dropped)

    @property
    def matched_fraction(self) -> float:
        return len(self.applied) / self.total if self.total else 0.0

    def report(self, limit: int = 40) -> str:
        kinds = {}
        for _module, _key, kind in self.applied:
            kinds[kind] = kinds.get(kind, 0) + 1
        kinds_text = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none"
        lines = [f"LoRA UNet modules matched: {len(self.applied)}/{self.total} "
                 f"({100 * self.matched_fraction:.1f} %), by the host's LoRA loader; kinds: {kinds_text}."]
        if self.dropped:
            lines.append(f"DROPPED, not merged ({len(self.dropped)}):")
            lines += [f"  {module}: {reason}" for module, reason in self.dropped[:limit]]
            if len(self.dropped) > limit:
                lines.append(f"  ... and {len(self.dropped) - limit} more")
        if self.by_pack:
            lines.append(f"DoRA computed by the pack (this host's loader has no DoRA), as the newest host does: "
                         f"{len(self.by_pack)} modules.")
        if self.respelled:
            lines.append(f"Modules this host maps only in the kohya spelling, handed to it so: {self.respelled}.")
        if self.ignored:
            lines.append(f"Text-encoder modules ignored (only the UNet is merged): {len(self.ignored)}.")
        lines.append("Matched:")
        lines += [f"  {module} -> {key} ({kind})" for module, key, kind in self.applied[:limit]]
        if len(self.applied) > limit:
            lines.append(f"  ... and {len(self.applied) - limit} more")
        return "\n".join(lines)


def host_lora_patches(model, state_dict: dict) -> HostLoRA:
    """The host's patches for a UNet LoRA on `model` (the host's ModelPatcher), and what it left out."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    state_dict = _host_converted(state_dict)
    result = HostLoRA()
    groups = core.group_lora_keys(state_dict)  # {module: {tensor suffix: key}}
    unet = [m for m in groups if not core.is_text_encoder_module(m)]
    result.ignored = [m for m in groups if core.is_text_encoder_module(m)]

    # First the file as it is, as Load LoRA reads it; then what this host read nothing of, in the kohya spelling.
    spelled = {m: (m, {k: k for k in groups[m].values()}) for m in unet if m in key_map}
    loaded = _load_lora(state_dict, spelled, key_map)
    names = set(groups)
    for module in unet:
        if module in spelled and _patch_keys(loaded[module], key_map[module]):
            continue
        name = module if module in key_map else core.kohya_module_name(module)
        if name in key_map and (name == module or name not in names):
            names.add(name)
            respelled = {name + core.kohya_tensor_suffix(s): k for s, k in groups[module].items()}
            if name != module or set(respelled) != set(groups[module].values()):
                loaded.update(_load_lora(state_dict, {module: (name, respelled)}, key_map))
                result.respelled += 1
                spelled[module] = (name, respelled)

    model_weights = model.model_state_dict()
    dora_pending = []
    for module in unet:
        suffixes = sorted(groups[module])
        kind = core.module_kind(suffixes)
        if module not in spelled:
            result.dropped.append((module, f"no weight of this name in the model ({kind})"))
            continue
        name, tensor_keys = spelled[module]
        host_patches, read = loaded[module]
        target = key_map[name][0] if isinstance(key_map[name], tuple) else key_map[name]
        patch_keys = _patch_keys(loaded[module], key_map[name])
        unread = sorted(k for k in tensor_keys if k not in read)
        if not patch_keys:
            result.dropped.append((module, f"this host's LoRA loader applies none of its tensors ({kind}: "
                                           f"{', '.join(suffixes)})"))
            continue
        missing = [k for k in patch_keys if k not in model_weights]
        if missing:
            result.dropped.append((module, f"the model has no {', '.join(missing)}"))
            continue
        failure = next((f for k in patch_keys if (f := _trial_failure(model, host_patches[k], model_weights[k], k))),
                       None)
        if failure:
            result.dropped.append((module, f"this host cannot compute its {kind} patch for {target} "
                                           f"{tuple(model_weights[target].shape)}: {failure}"))
            continue
        dora_key = name + ".dora_scale"
        if unread == [dora_key] and _patch_kind(host_patches[target])[0] in _DORA_FALLBACK_KINDS:
            dora_pending.append((module, target, host_patches[target], state_dict[tensor_keys[dora_key]], kind))
            result.patches.update({k: host_patches[k] for k in patch_keys if k != target})  # a bias diff as is
            continue
        if unread:
            result.dropped.append((module, "this host's LoRA loader ignores " + ", ".join(unread) +
                                   ": the rest alone would compute something else"))
            continue
        for key in patch_keys:
            result.patches[key] = host_patches[key]
        result.applied.append((module, target, kind))

    if dora_pending:
        changes = _dora_changes(model, [(target, patch, scale) for _m, target, patch, scale, _k in dora_pending])
        for (module, target, _patch, _scale, kind), change in zip(dora_pending, changes):
            result.patches[target] = ("diff", (change,))
            result.applied.append((module, target, kind))
            result.by_pack.append(module)
    if not result.applied:
        result.kind = core.file_kind({k: v for k, v in state_dict.items()
                                      if not core.is_text_encoder_module(core.split_lora_key(k)[0])})
    return result


def _load_lora(state_dict: dict, spelled: dict, key_map: dict) -> dict:
    """{module: (host patches, keys the host read)}: the host's load_lora on the modules `spelled` names,
    each as (name given to the host, {tensor key given: key in the file})."""
    import comfy.lora

    given = _ReadRecorder({given_key: state_dict[key] for _name, keys in spelled.values()
                           for given_key, key in keys.items()})
    to_load = {name: key_map[name] for name, _keys in spelled.values()}
    if "log_missing" in inspect.signature(comfy.lora.load_lora).parameters:
        patches = comfy.lora.load_lora(given, to_load, log_missing=False)  # the pack reports what is left out
    else:
        patches = comfy.lora.load_lora(given, to_load)
    return {module: (patches, {k for k in keys if k in given.read}) for module, (_name, keys) in spelled.items()}


def _patch_keys(loaded, target) -> list:
    """The model keys (the weight, its bias) the host made patches for from one module."""
    patches, _read = loaded
    target = target[0] if isinstance(target, tuple) else target
    return [k for k in (target, target[:-len(".weight")] + ".bias") if k in patches]


def _host_converted(state_dict: dict) -> dict:
    """The file as the host's Load LoRA sees it: newer hosts first convert a few foreign layouts."""
    try:
        from comfy.lora_convert import convert_lora
    except ImportError:  # the pinned host has no converter
        return state_dict
    return convert_lora(state_dict)


def _patch_kind(patch) -> tuple[str, tuple]:
    """(kind, factors) of a host patch: a weight-adapter object on newer hosts, a (kind, factors) tuple before."""
    if hasattr(patch, "weights") and hasattr(patch, "name"):
        return patch.name, tuple(patch.weights)
    if isinstance(patch, tuple) and len(patch) == 2 and isinstance(patch[0], str):
        return patch[0], tuple(patch[1])
    return "diff", tuple(patch)


class _Records(logging.Handler):
    """The host's warnings about one weight key (every such message of the host names the key)."""

    def __init__(self, key: str):
        super().__init__(logging.WARNING)
        self.key = key
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if self.key in message:
            self.messages.append(message)


def _host_calculate(model, patch, weight, key):
    """The host's own weight calculation of one patch at strength 1 on `weight`."""
    import comfy.lora

    if hasattr(comfy.lora, "calculate_weight"):  # newer hosts
        return comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight, key)
    return model.calculate_weight([(1.0, patch, 1.0)], weight, key)


def _trial_failure(model, patch, weight, key) -> str | None:
    """What the host logs when it cannot compute a patch (it skips the layer then, silently for the user), from a
    trial on the meta device, confirmed on real zeros (a few kernels lack meta versions)."""
    for device in ("meta", "cpu"):
        records = _Records(key)
        root = logging.getLogger()
        root.addHandler(records)
        try:
            _host_calculate(model, patch, torch.zeros(weight.shape, dtype=torch.float32, device=device), key)
        except Exception as e:  # noqa: BLE001 — any failure here is a failure of this patch
            records.messages.append(f"{type(e).__name__}: {e}")
        finally:
            root.removeHandler(records)
        if not records.messages:
            return None
    return records.messages[0]


def _dora_changes(model, items) -> list:
    """On a host whose loader has no DoRA: each layer's DoRA change at strength 1, against the weight as the
    model patches it so far, as the `diff` a strength s then scales (the newest host blends W + s·(W' - W))."""
    import comfy.model_management

    calculate = getattr(model, "calculate_weight", None)  # a ModelPatcher method on hosts without DoRA
    if calculate is None:
        raise core.LoRAError("This ComfyUI's LoRA loader reads no dora_scale and the pack cannot compute DoRA "
                             "on it: update ComfyUI, or use a LoRA without DoRA.")
    comfy.model_management.unload_model_clones(model)  # the shared weights back to unpatched, as merges do
    weights = model.model_state_dict()
    changes = []
    for target, patch, dora_scale in items:
        base = weights[target]
        current = calculate(model.patches.get(target, []), base.to(torch.float32, copy=True), target)
        delta = calculate([(1.0, patch, 1.0)], torch.zeros_like(current), target)
        change = core.dora_weight_change(current, delta, dora_scale.to(current.device, torch.float32))
        changes.append(change.to(model.offload_device, base.dtype))
    return changes
