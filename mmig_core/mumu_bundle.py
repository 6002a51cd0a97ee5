"""A MUMU bundle: the adapter, the UNet LoRA and the VLM LoRA of one training run (MUMU §5), in one folder
under models/mmig/ with a manifest naming the VLM base they were trained on.

    models/mmig/<bundle>/mumu_bundle.json   {"format": "mmig-mumu-bundle", "version": 1, "vlm_base": "idefics2-8b",
                                             "adapter": "adapter.safetensors", "unet_lora": "unet_lora.safetensors",
                                             "vlm_lora": "vlm_lora.safetensors"}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .model_files import ModelFilesError

MANIFEST = "mumu_bundle.json"
BUNDLE_FORMAT = "mmig-mumu-bundle"
FILE_FIELDS = ("adapter", "unet_lora", "vlm_lora")


@dataclass
class MUMUBundle:
    folder: Path
    vlm_base: str
    adapter: Path
    unet_lora: Path
    vlm_lora: Path | None  # a bundle may carry no VLM LoRA (adapter-only VLM training)


def is_bundle(folder) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_bundle(folder) -> MUMUBundle:
    """The bundle in `folder`; a clear error naming the manifest field or file that is wrong."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFilesError(f"MUMU bundle {folder}: cannot read {MANIFEST} ({e}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ModelFilesError(f"MUMU bundle {folder}: {MANIFEST} must be a JSON object with "
                              f'"format": "{BUNDLE_FORMAT}".')
    if not isinstance(manifest.get("vlm_base"), str) or not manifest["vlm_base"]:
        raise ModelFilesError(f"MUMU bundle {folder}: {MANIFEST} must name the VLM base it was trained on "
                              f'("vlm_base", e.g. "idefics2-8b").')
    files = {}
    for name in FILE_FIELDS:
        value = manifest.get(name)
        if value is None and name == "vlm_lora":
            files[name] = None
            continue
        path = (folder / str(value)).resolve() if isinstance(value, str) else None
        if path is None or folder.resolve() not in path.parents or not path.is_file():
            raise ModelFilesError(f"MUMU bundle {folder}: {MANIFEST} field {name!r} must name a .safetensors file "
                                  f"inside the bundle folder (got {value!r}).")
        files[name] = path
    return MUMUBundle(folder, manifest["vlm_base"], **files)


def write_manifest(folder, vlm_base: str, adapter="adapter.safetensors", unet_lora="unet_lora.safetensors",
                   vlm_lora: str | None = "vlm_lora.safetensors") -> Path:
    """Writes the manifest (atomically) beside the bundle's files, as training does after saving them."""
    import os

    folder = Path(folder)
    manifest = {"format": BUNDLE_FORMAT, "version": 1, "vlm_base": vlm_base, "adapter": adapter,
                "unet_lora": unet_lora, "vlm_lora": vlm_lora}
    temp = folder / (MANIFEST + ".tmp")
    temp.write_text(json.dumps(manifest, indent=2))
    os.replace(temp, folder / MANIFEST)
    return folder / MANIFEST
