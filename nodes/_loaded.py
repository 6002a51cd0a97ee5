"""The loaded-model values that cross node boundaries (MMIG_VLM, MMIG_ADAPTER) and the picker of pack model
files by their metadata format: one small module that the encoder, LoRA and MMSM nodes all import, so none of
them imports another."""
from __future__ import annotations

from dataclasses import dataclass

import folder_paths

from ..mmig_core import vlm as vlm_core
from ..mmig_core.model_files import ModelFilesError, check_safetensors_file


@dataclass
class LoadedVLM:
    """The MMIG_VLM value: the model and the host's memory-managed handle on it."""
    vlm: vlm_core.VLM
    patcher: object
    name: str


@dataclass
class LoadedAdapter:
    """The MMIG_ADAPTER value."""
    adapter: object
    patcher: object
    name: str


def adapter_files(file_format: str) -> list[str]:
    """The .safetensors files in models/mmig/ whose metadata says `file_format` (MUMU adapter, MM-Adapter, MMSM)."""
    names = []
    for name in folder_paths.get_filename_list("mmig"):
        if name.endswith(".safetensors"):
            try:  # reads the header only
                if check_safetensors_file(folder_paths.get_full_path("mmig", name)).get("format") == file_format:
                    names.append(name)
            except (ModelFilesError, OSError):
                continue  # a broken file is reported by the loader that reads it, not here
    return sorted(names)
