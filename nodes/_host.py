"""What every node file needs from the host: model folders, memory management, progress, interruption.

Written against ComfyUI's long-lived module APIs (folder_paths, comfy.model_management,
comfy.model_patcher, comfy.utils) that both the pinned 2024-03 host and the newest one provide.
"""
from __future__ import annotations

import os
import posixpath

import folder_paths

CATEGORY = "MMIG"

# Model kinds the pack reads, each a folder under ComfyUI/models/ (extra_model_paths.yaml can add more).
MODEL_FOLDERS = {
    "blip2": "BLIP-2 captioning models (Hugging Face folders)",
    "vlm": "vision-language models (Hugging Face folders)",
    "mmig": "MMIG/MUMU adapters, MMSM and bundles (.safetensors)",
    "diffrir": "DiffRIR restoration networks (.safetensors)",
}


# Folders other packs keep the same kind of model in: listed after the pack's own (models/LLM/ holds the VLMs of
# the Qwen-VL / Florence-2 / JoyCaption packs).
SHARED_FOLDERS = {"vlm": ("LLM",)}


def register_model_folders() -> None:
    """Add models/<kind> for each kind, keeping any paths extra_model_paths.yaml registered first; then the
    shared folders' paths (their own extra_model_paths.yaml entries included) after the kind's."""
    for name in MODEL_FOLDERS:
        default = os.path.join(folder_paths.models_dir, name)
        entry = folder_paths.folder_names_and_paths.get(name)
        if entry is None:
            folder_paths.folder_names_and_paths[name] = ([default], set())
        elif default not in entry[0]:
            entry[0].insert(0, default)
    for name, shared in SHARED_FOLDERS.items():
        paths = folder_paths.folder_names_and_paths[name][0]
        for other in shared:
            entry = folder_paths.folder_names_and_paths.get(other)
            for path in [*(entry[0] if entry else []), os.path.join(folder_paths.models_dir, other)]:
                if path not in paths:
                    paths.append(path)


def model_search_paths(kind: str) -> list[str]:
    return folder_paths.get_folder_paths(kind)


def list_hf_model_folders(kind: str) -> list[str]:
    """Names of the Hugging Face model folders (holding config.json) one or two levels below each path."""
    names = set()
    for root in model_search_paths(kind):
        if not os.path.isdir(root):
            continue
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.is_dir():
                continue
            if os.path.isfile(os.path.join(entry.path, "config.json")):
                names.add(entry.name)
            else:  # an organisation folder, e.g. Salesforce/blip2-opt-2.7b
                for sub in os.scandir(entry.path):
                    if sub.is_dir() and os.path.isfile(os.path.join(sub.path, "config.json")):
                        names.add(f"{entry.name}/{sub.name}")
    return sorted(names)


def resolve_model_folder(kind: str, name: str) -> str | None:
    """The first search path holding `name`, as an absolute folder path; None if none does."""
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        return None  # names come from the combo; never let a graph point outside the model folders
    for root in model_search_paths(kind):
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    return None


def missing_model_message(kind: str, label: str, name: str, expected: str, source: str) -> str:
    searched = ", ".join(model_search_paths(kind))
    return (f"{label} model '{name}' not found. Searched: {searched}. Expected a folder there holding "
            f"{expected}. {source}")


def torch_device():
    import comfy.model_management
    return comfy.model_management.get_torch_device()


def pick_dtype(choice: str):
    """'auto' is fp16 where the host says the device runs it well, else fp32."""
    import torch
    import comfy.model_management
    if choice == "auto":
        device = torch_device()
        return torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def _holder(model):
    """A plain torch module holding `model`, for the host's ModelPatcher to manage.

    Newer hosts record where a model lives by assigning `model.device` (and a few counters) on the
    module they manage; a Hugging Face model has a read-only `device` property, so that assignment
    fails. The holder takes those attributes instead; its `.to()` still moves every weight of `model`.
    """
    import torch

    class HostManagedModule(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            first = next(inner.parameters(), None)
            self.device = first.device if first is not None else None

    return HostManagedModule(model)


def managed(model):
    """Wrap a torch module so the host's memory manager loads it to the device and offloads it (whole, in every
    memory mode: see nodes/_memory.py)."""
    import comfy.model_management
    from ._memory import whole_model_patcher
    return whole_model_patcher(_holder(model), load_device=comfy.model_management.get_torch_device(),
                               offload_device=comfy.model_management.unet_offload_device())


def load_to_device(*patchers) -> None:
    """Load one or more managed models together (one call, so loading one does not offload another)."""
    from ._memory import load_whole
    load_whole(patchers)


def throw_if_interrupted() -> None:
    import comfy.model_management
    comfy.model_management.throw_exception_if_processing_interrupted()


def interrupted() -> bool:
    """Whether the user pressed Cancel (POST /interrupt), without clearing the flag: generation loops poll it
    through a stopping criterion, then the node calls `throw_if_interrupted` to end the prompt as the host does."""
    import comfy.model_management
    return bool(comfy.model_management.processing_interrupted())


def progress_bar(total: int):
    import comfy.utils
    return comfy.utils.ProgressBar(total)


def safe_filename_prefix(filename_prefix: str) -> str:
    """`filename_prefix` normalised as the host's Save Image reads it (subfolders allowed), or a ValueError.

    The host itself refuses a folder outside the output folder; a prefix whose last part is '.', '..' or empty
    (e.g. 'captions/..') would make every file the same hidden name, so it is refused here too.
    """
    prefix = (filename_prefix or "").replace("\\", "/")
    normal = posixpath.normpath(prefix) if prefix else ""
    name = posixpath.basename(normal)
    if (not prefix or os.path.isabs(prefix) or os.path.splitdrive(prefix)[0] or name in ("", ".", "..")
            or normal == ".." or normal.startswith("../") or prefix.endswith("/")):
        raise ValueError(f"filename_prefix {filename_prefix!r} must name a file inside the output folder, e.g. "
                         f"'captions/caption' (a relative path ending in a file name, without '..').")
    return normal


def save_text_file(text: str, filename_prefix: str) -> dict:
    """Write text to the output folder with the host's numbering; returns the UI file entry.

    Never overwrites: each file is created exclusively, and a name taken meanwhile moves to the next counter.
    """
    prefix = safe_filename_prefix(filename_prefix)
    output_dir = folder_paths.get_output_directory()
    try:
        full_folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, output_dir)
    except Exception as e:  # noqa: BLE001 - the host raises a bare Exception for a folder outside the output
        raise ValueError(f"filename_prefix {filename_prefix!r} points outside the output folder {output_dir}: "
                         f"use a relative path such as 'captions/caption'.") from e
    for _ in range(100000):
        name = f"{filename}_{counter:05}_.txt"
        try:
            with open(os.path.join(full_folder, name), "x", encoding="utf-8") as f:
                f.write(text + "\n")
        except FileExistsError:
            counter += 1
            continue
        return {"filename": name, "subfolder": subfolder, "type": "output"}
    raise ValueError(f"filename_prefix {filename_prefix!r}: no free file name in {full_folder}; choose a new prefix.")


def preview_images(images) -> list[dict]:
    """Save an IMAGE batch to the host's temp folder, as its Preview Image node does; the UI entries the frontend
    shows on the node (`{"ui": {"images": ...}}`). Temp files are the host's to clear, so nothing is kept."""
    import nodes as host_nodes  # the host's nodes.py, loaded before any custom node
    return host_nodes.PreviewImage().save_images(images, filename_prefix="MMIG_preview")["ui"]["images"]
