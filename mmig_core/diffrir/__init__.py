"""DiffRIR (LLMGA §3.4): reference-based restoration of inpainting/outpainting seams.

Official code and checkpoints: Zj-BinXia/DiffRIR (not dvlab-research/LLMGA, which releases the LLM side).

- `config`: sizes (`tiny_config()` for tests, `paper_config()` for real use).
- `network`: the restorer, the CPEN prior extractor and the 4-step diffusion prior.
- `restore`: input checks, padding, tiling with blending, paste-back (what the node calls).
- `weights`: the pack's safetensors (config in metadata) and the official checkpoint's keys.
- `convert`: `python -m mmig_core.diffrir.convert IN.pth OUT.safetensors` for the official checkpoint.
- `degradations`: D_1 (real-world) and D_2 (contrast/brightness), and the training masks.

Importing this package is cheap: torch only (the host already has it loaded).
"""
from .config import DiffRIRConfig, paper_config, tiny_config
from .network import DiffRIR
from .restore import DiffRIRInputError, check_inputs, restoration_tiles, restore_image, restore_images
from .weights import load_diffrir, save_diffrir

__all__ = ["DiffRIR", "DiffRIRConfig", "DiffRIRInputError", "check_inputs", "load_diffrir", "paper_config",
           "restoration_tiles", "restore_image", "restore_images", "save_diffrir", "tiny_config"]
