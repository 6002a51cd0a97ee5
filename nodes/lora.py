"""LoRA merging into any SDXL checkpoint through the host's own LoRA loader (MUMU §5: the MUMU LoRA merges into
community fine-tunes), and the MUMU bundle loader."""
from __future__ import annotations

import dataclasses
import logging
import os

import folder_paths

from . import _host
from ..mmig_core import lora as core
from ..mmig_core import mumu_bundle
from ..mmig_core.model_files import ModelFilesError
from ._host_lora import host_lora_patches
from ._loaded import LoadedAdapter, LoadedVLM, require_unquantized


def check_min_matched_fraction(min_matched_fraction: float) -> None:
    """The guard's threshold must be a number in [0, 1]: a NaN would make every comparison false and let a LoRA
    that matches nothing of the model through unchanged."""
    if not 0.0 <= min_matched_fraction <= 1.0:
        raise core.LoRAError(f"min_matched_fraction must be a number from 0 to 1, got {min_matched_fraction!r}: "
                             f"set it to 1.0 to require every module of the LoRA to apply")


def merge_lora(model, state_dict: dict, strength: float, min_matched_fraction: float, label: str):
    """(patched clone, report): the host's own LoRA loader applies the file, as Load LoRA does. Raises, naming
    them, when modules cannot be applied, unless min_matched_fraction was lowered to let the rest through."""
    check_min_matched_fraction(min_matched_fraction)
    found = host_lora_patches(model, state_dict)
    report = f"{label}\n{found.report()}"
    if not found.applied:
        if found.total:
            what = f"none of its {found.total} UNet modules can be applied; the file holds {found.kind}"
        elif found.ignored:
            what = (f"it holds only text-encoder modules ({len(found.ignored)}): this node merges the UNet; use "
                    f"the host's Load LoRA with a CLIP for those")
        else:
            what = f"it holds no UNet modules but {found.kind}"
        raise core.LoRAError(f"{label.rstrip(':')}: {what}. Supported: LoRA, LoCon, "
                             f"Tucker LoCon, LoHa, LoKr, DoRA, full and bias diffs, for an SDXL UNet (is it a LoRA "
                             f"for another architecture, e.g. SD1.5? {100 * found.matched_fraction:.1f} % matched, "
                             f"min_matched_fraction {100 * min_matched_fraction:.0f} %). Nothing was merged."
                             f"\n{report}")
    if found.dropped and not found.matched_fraction >= min_matched_fraction:  # NaN-proof: a NaN never passes
        names = ", ".join(module for module, _ in found.dropped[:10]) + (" ..." if len(found.dropped) > 10 else "")
        raise core.LoRAError(
            f"{label.rstrip(':')}: {len(found.dropped)} of {found.total} UNet modules cannot be applied ({names}); "
            f"only {100 * found.matched_fraction:.1f} % would merge, below min_matched_fraction "
            f"{100 * min_matched_fraction:.0f} %. Nothing was merged: lower min_matched_fraction to merge the rest "
            f"on purpose.\n{report}")
    if found.dropped:
        logging.warning("MMIG LoRA: %s merged without %d modules (min_matched_fraction %.2f):\n%s", label,
                        len(found.dropped), min_matched_fraction, report)
    patched = model.clone()
    if strength != 0.0:
        patched.add_patches(found.patches, strength)
    return patched, report


def add_lora_patches(patcher, match, strength: float):
    """A clone of the host's ModelPatcher with the LoRA factors as the host's own LoRA patches: the host
    multiplies B·A out one layer at a time when it loads the model, so no second copy of the weights is held."""
    import comfy.lora

    patched = patcher.clone()
    if strength != 0.0:
        tensors, targets = match.factors()
        patched.add_patches(comfy.lora.load_lora(tensors, targets), strength)
    return patched


MIN_MATCHED_TOOLTIP = ("Which fraction of the LoRA's modules must apply. 1.0: all, else nothing is merged and the "
                       "error names the ones that cannot be applied. Lower it on purpose to merge the rest; the "
                       "report then lists every module dropped. (Workflows saved with older versions of the pack carry 0.9.)")


class MMIG_LoRAMerge:
    DESCRIPTION = ("Merges a LoRA into a MODEL (any SDXL checkpoint, e.g. a community fine-tune), as MUMU merges "
                   "its UNet LoRA into style fine-tunes. The host's own LoRA loader applies it, so it reads what "
                   "Load LoRA reads and gives the same weights: LoRA/LoCon (kohya, diffusers, peft), Tucker LoCon, "
                   "LoHa, LoKr, DoRA (computed by the pack where the host's loader lacks it), full and bias diffs. "
                   "Unlike Load LoRA it fails, naming them, when modules cannot be applied, and reports what "
                   "merged. Save Checkpoint bakes the result.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("A patched copy of the model (the input model is left unchanged).",
                       "Which LoRA modules matched which UNet weights, and which did not and why.")
    OUTPUT_NODE = True
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SDXL model to merge into, e.g. from Load Checkpoint."}),
                "lora_name": (folder_paths.get_filename_list("loras"), {
                    "tooltip": "A .safetensors LoRA in ComfyUI/models/loras/ (any format the host's Load LoRA "
                               "reads; kohya, diffusers or peft names)."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scale s of the LoRA's change (ΔW = s·(alpha/rank)·B·A for a "
                                                  "plain LoRA), as Load LoRA's strength_model; 0 leaves the model "
                                                  "as is."}),
            },
            "optional": {
                "min_matched_fraction": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": MIN_MATCHED_TOOLTIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        # Replaces the host's bare "value not in list" with where to put the file.
        if folder_paths.get_full_path("loras", lora_name) is None:
            return (f"LoRA {lora_name!r} not found in ComfyUI/models/loras/ (searched: "
                    f"{', '.join(folder_paths.get_folder_paths('loras'))}): put the .safetensors file there.")
        return True

    def merge(self, model, lora_name, strength, min_matched_fraction=1.0):
        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise ModelFilesError(f"LoRA {lora_name!r} is not in ComfyUI/models/loras/ "
                                  f"(searched: {', '.join(folder_paths.get_folder_paths('loras'))}).")
        state_dict, _metadata = core.load_lora_file(path)
        _host.throw_if_interrupted()
        merged, report = merge_lora(model, state_dict, strength, min_matched_fraction, f"LoRA {lora_name}:")
        return {"ui": {"text": [report]}, "result": (merged, report)}


def bundle_names() -> list[str]:
    """Folders in models/mmig/ that hold a MUMU bundle manifest."""
    names = set()
    for root in _host.model_search_paths("mmig"):
        if os.path.isdir(root):
            names.update(n for n in os.listdir(root) if mumu_bundle.is_bundle(os.path.join(root, n)))
    return sorted(names)


def find_bundle(name: str) -> str | None:
    """The bundle folder `name` (one folder directly in a models/mmig/ path, as `bundle_names` lists them).

    An absolute path, a '..' or a nested path is refused: a graph must not load a bundle from outside the
    model folders (e.g. one uploaded to input/). A symlinked folder inside models/mmig/ still loads.
    """
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.splitdrive(name)[0] \
            or "/" in name or "\\" in name or name in (".", ".."):
        return None
    for root in _host.model_search_paths("mmig"):
        if mumu_bundle.is_bundle(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def merge_vlm_lora(vlm: LoadedVLM, state_dict: dict, strength: float, min_matched_fraction: float):
    """(LoadedVLM whose patcher is a patched clone, report); the VLM's own weight names, under the holder's."""
    require_unquantized(vlm, "A VLM LoRA")
    shapes = {key: tuple(value.shape) for key, value in vlm.patcher.model_state_dict().items()}
    match = core.match_lora(state_dict, shapes, core.build_name_table(shapes, prefix="inner."))
    report = f"VLM LoRA:\n{match.report()}"
    check_min_matched_fraction(min_matched_fraction)
    if not match.matched_fraction >= min_matched_fraction:  # NaN-proof, as in merge_lora
        raise core.LoRAError(f"Only {100 * match.matched_fraction:.1f} % of the bundle's VLM LoRA modules match "
                             f"VLM '{vlm.name}': load the VLM base the bundle was trained on.\n{report}")
    return dataclasses.replace(vlm, patcher=add_lora_patches(vlm.patcher, match, strength)), report


def vlm_base_warning(expected: str, vlm: LoadedVLM) -> str | None:
    loaded = {vlm.name.lower(), os.path.basename(str(getattr(vlm.vlm.model.config, "_name_or_path", ""))).lower()}
    if os.path.basename(expected).lower() in loaded:
        return None
    return (f"Warning: the MUMU bundle was trained on VLM base '{expected}' but the connected VLM is "
            f"'{vlm.name}'; its conditioning may not fit the adapter.")


class MMIG_MUMULoader:
    DESCRIPTION = ("Loads a MUMU bundle from ComfyUI/models/mmig/<bundle>/ (mumu_bundle.json + adapter, UNet LoRA, "
                   "VLM LoRA): merges the UNet LoRA into any SDXL MODEL (e.g. a community fine-tune, MUMU §5) and "
                   "the VLM LoRA into the VLM, both on copies, and loads the adapter for MMIG MUMU Encode.")
    CATEGORY = _host.CATEGORY
    RETURN_TYPES = ("MODEL", "MMIG_VLM", "MMIG_ADAPTER", "STRING")
    RETURN_NAMES = ("model", "vlm", "adapter", "report")
    OUTPUT_TOOLTIPS = ("The model with the bundle's UNet LoRA (the input model is left unchanged).",
                       "The VLM with the bundle's VLM LoRA, for MMIG MUMU Encode.",
                       "The bundle's adapter, for MMIG MUMU Encode.",
                       "Which LoRA modules matched, and a warning when the VLM is not the bundle's base.")
    OUTPUT_NODE = True
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "bundle_name": (bundle_names(), {
                    "tooltip": "A folder in ComfyUI/models/mmig/ with mumu_bundle.json (from the pack's MUMU "
                               "training)."}),
                "model": ("MODEL", {"tooltip": "Any SDXL model, e.g. a community fine-tune from Load Checkpoint."}),
                "vlm": ("MMIG_VLM", {"tooltip": "From MMIG VLM Loader: the VLM base named in the bundle's manifest."}),
                "unet_strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                            "tooltip": "Strength of the UNet LoRA; 0 leaves the model as is."}),
                "vlm_strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                           "tooltip": "Strength of the VLM LoRA; 0 leaves the VLM as is."}),
                "dtype": (["auto", "fp32", "fp16", "bf16"], {
                    "default": "auto", "tooltip": "Adapter precision. auto: fp16 where the device runs it well."}),
            },
            "optional": {
                "min_matched_fraction": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": MIN_MATCHED_TOOLTIP}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, bundle_name):
        if find_bundle(bundle_name) is None:
            return (f"MUMU bundle {bundle_name!r} not found: bundle_name must be the name of a folder with "
                    f"{mumu_bundle.MANIFEST} directly in {', '.join(_host.model_search_paths('mmig'))} (no path, "
                    f"no '..'), as the pack's MUMU training writes it.")
        return True

    def load(self, bundle_name, model, vlm, unet_strength, vlm_strength, dtype, min_matched_fraction=1.0):
        from ..mmig_core.mumu_adapter import load_adapter

        folder = find_bundle(bundle_name)
        if folder is None:
            raise ModelFilesError(f"MUMU bundle {bundle_name!r} not found: a folder with {mumu_bundle.MANIFEST} in "
                                  f"{', '.join(_host.model_search_paths('mmig'))}.")
        bundle = mumu_bundle.read_bundle(folder)
        progress = _host.progress_bar(3)
        unet_state, _ = core.load_lora_file(bundle.unet_lora)
        merged_model, report = merge_lora(model, unet_state, unet_strength, min_matched_fraction, "UNet LoRA:")
        progress.update(1)
        _host.throw_if_interrupted()
        warning = vlm_base_warning(bundle.vlm_base, vlm)
        if warning:
            logging.warning("MMIG MUMU Loader: %s", warning)
            report = f"{warning}\n{report}"
        if bundle.vlm_lora is not None:
            vlm_state, _ = core.load_lora_file(bundle.vlm_lora)
            vlm, vlm_report = merge_vlm_lora(vlm, vlm_state, vlm_strength, min_matched_fraction)
            report = f"{report}\n{vlm_report}"
        progress.update(1)
        _host.throw_if_interrupted()
        adapter = load_adapter(bundle.adapter, dtype=_host.pick_dtype(dtype))
        progress.update(1)
        loaded_adapter = LoadedAdapter(adapter, _host.managed(adapter), f"{bundle_name}/{bundle.adapter.name}")
        return {"ui": {"text": [report]}, "result": (merged_model, vlm, loaded_adapter, report)}


NODE_CLASS_MAPPINGS = {"MMIG_LoRAMerge": MMIG_LoRAMerge, "MMIG_MUMULoader": MMIG_MUMULoader}
NODE_DISPLAY_NAME_MAPPINGS = {"MMIG_LoRAMerge": "MMIG LoRA Merge", "MMIG_MUMULoader": "MMIG MUMU Loader"}
