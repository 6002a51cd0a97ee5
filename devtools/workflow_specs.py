"""What the example workflows say to a user: their stages, their note, and where each model comes from.

Data only; `devtools.workflow_layout` turns it into groups, a Note node and a `models` list. A workflow
without an entry in SPECS still gets a layout (a "Models" group and one for the rest), so a new API
twin can be converted before its spec is written.
"""
from __future__ import annotations

import tomllib

from devtools.paths import REPO_ROOT

PROJECT_URLS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["urls"]
REPO_URL = PROJECT_URLS["Repository"]

# (node type, input) -> the ComfyUI model folder (folder_paths key) the value is looked up in.
MODEL_DIRS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("VAELoader", "vae_name"): "vae",
    ("MMIG_BLIP2Loader", "model_name"): "blip2",
    ("MMIG_VLMLoader", "model_name"): "vlm",
    ("MMIG_VLMLoader", "mm_adapter_name"): "mmig",
    ("MMIG_VLMLoader", "lora_name"): "loras",
    ("MMIG_AdapterLoader", "adapter_name"): "mmig",
    ("MMIG_MMSMLoader", "mmsm_name"): "mmig",
    ("MMIG_MUMULoader", "bundle_name"): "mmig",
    ("MMIG_DiffRIRLoader", "model_name"): "diffrir",
    ("MMIG_LoRAMerge", "lora_name"): "loras",
}

# Where each model a workflow names can be had. Hugging Face folders (BLIP-2, VLMs) are repositories,
# not files: the frontend cannot download them, but its missing-models dialog still names the folder.
# Files the pack's training writes point at the README section that makes them.
MODEL_URLS = {
    "sd_xl_base_1.0.safetensors":
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    "animagine-xl-3.0.safetensors":
        "https://huggingface.co/cagliostrolab/animagine-xl-3.0/resolve/main/animagine-xl-3.0.safetensors",
    "v1-5-pruned-emaonly.safetensors":
        "https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/v1-5-pruned-emaonly.safetensors",
    "idefics2-8b": "https://huggingface.co/HuggingFaceM4/idefics2-8b",
    "blip2-opt-2.7b": "https://huggingface.co/Salesforce/blip2-opt-2.7b",
    "mumu-adapter-sdxl.safetensors": f"{REPO_URL}#mumu-training-mumu-5",
    "mumu-sdxl-bundle": f"{REPO_URL}#mumu-training-mumu-5",
    "mmsm-sdxl-idefics2.safetensors": f"{REPO_URL}#mmig-training-mmig-35",
    "diffrir.safetensors": f"{REPO_URL}#training-headless",
}
FOLDER_MODELS = {"idefics2-8b", "blip2-opt-2.7b", "mumu-sdxl-bundle"}  # a folder, not one file

NODE_BLURBS = {
    "MMIG_BLIP2Loader": "loads a BLIP-2 folder from models/blip2/",
    "MMIG_BLIP2Caption": "writes a caption per image (MMIG Eq. 4), shown on the node and optionally saved as .txt",
    "MMIG_VLMLoader": "loads an Idefics2-family VLM folder from models/vlm/ (optional MM-Adapter, LoRA)",
    "MMIG_MultimodalPrompt": "text with <image1>..<image4> markers, each bound to an image input",
    "MMIG_AdapterLoader": "loads a MUMU adapter (.safetensors) from models/mmig/",
    "MMIG_MUMUEncode": "VLM hidden states -> adapter -> SDXL conditioning (MUMU)",
    "MMIG_MLLMDescribe": "the multimodal LLM answers image + instruction (MMIG Eq. 1; LLMGA prompt mode extracts "
                         "the generation prompt)",
    "MMIG_DiffRIRLoader": "loads a DiffRIR restoration network from models/diffrir/",
    "MMIG_DiffRIRRestore": "removes seams and colour shifts around an inpainted/outpainted area (LLMGA §3.4)",
    "MMIG_AStarGuidance": "A-STAR attention guidance on the UNet's cross-attention, so every concept shows up",
    "MMIG_LayeredEmbeddings": "optimises a blend of foreground and background prompts inside the mask "
                              "(MMIG Eqs. 2-3)",
    "MMIG_LoRAMerge": "merges a LoRA file into any SDXL MODEL, reporting every module it could not apply",
    "MMIG_MUMULoader": "loads a MUMU bundle folder from models/mmig/: UNet LoRA, VLM LoRA and adapter",
    "MMIG_MMSMLoader": "loads an MMSM (MMIG §3.2) from models/mmig/",
    "MMIG_MMSMApply": "fuses the LLM embedding into the SDXL UNet's mid block (MMIG Eqs. 9-13)",
    "MMIG_DirectInversion": "DDIM-inverts the source latent with the source prompt (Direct Inversion, LLMGA §3.1)",
    "MMIG_PromptToPrompt": "edits the inverted image towards the target prompt with prompt-to-prompt attention "
                           "control; the source branch reconstructs the input exactly",
}

# Group colours of the frontend's palette, one per kind of stage.
COLORS = {"models": "#3f789e", "inputs": "#8A8", "mmig": "#a1309b", "generate": "#b58b2a", "outputs": "#88A"}

SPECS = {
    "txt2img_caption": {
        "summary": "SDXL text-to-image, then a BLIP-2 caption of the result, saved beside the image.",
        "stages": [("Models", "models", [1, 8]), ("Prompt", "inputs", [2, 3, 4]),
                   ("Generate", "generate", [5, 6, 7]), ("Caption (BLIP-2)", "mmig", [9])],
    },
    "mumu_multimodal_prompt": {
        "summary": "MUMU: a prompt that interleaves text and reference images (\"a <image1> man and his "
                   "<image2> dog\") drives SDXL through a VLM and the MUMU adapter. Replace the Empty Image "
                   "nodes with Load Image.",
        "stages": [("Models", "models", [1, 5, 6]), ("Reference images + prompt", "inputs", [2, 3, 4]),
                   ("MUMU encode", "mmig", [7, 8]), ("Generate", "generate", [9, 10, 11, 12])],
    },
    "llmga_prompt_assistant": {
        "summary": "LLMGA prompt assistant: the multimodal LLM turns an image + instruction into a detailed "
                   "prompt (shown on the node, saved as .txt), which SDXL then renders.",
        "stages": [("Models", "models", [1, 4]), ("Image + instruction", "inputs", [2, 3]),
                   ("LLMGA prompt", "mmig", [5]), ("Generate", "generate", [6, 7, 8, 9, 10, 11])],
    },
    "llmga_outpaint_restore": {
        "summary": "LLMGA outpainting: a source image is widened, the LLM writes the prompt for the wider "
                   "scene, SDXL inpaints the padding, and DiffRIR removes the seams. Replace nodes 4-6 with "
                   "Load Image to outpaint your own picture.",
        "stages": [("Models", "models", [1, 16, 12]), ("Source image", "inputs", [2, 3, 4, 5, 6]),
                   ("LLMGA outpaint prompt", "mmig", [17, 18]), ("Outpaint", "generate", [7, 8, 9, 10, 11, 15]),
                   ("DiffRIR restore", "mmig", [13, 14])],
    },
    "mmig_dem_edit": {
        "summary": "MMIG editing: Layered Embeddings blend a foreground and a background prompt inside an object "
                   "mask, and A-STAR guidance keeps both concepts; the source image is re-sampled at denoise "
                   "0.75.",
        "stages": [("Models", "models", [1]), ("Source image", "inputs", [2, 3, 4, 5, 6]),
                   ("Mask + layer prompts", "inputs", [7, 8, 9, 10, 11, 12]),
                   ("Layered Embeddings + A-STAR", "mmig", [13, 14]), ("Edit", "generate", [15, 16, 17])],
    },
    "mmig_full": {
        "summary": "The whole MMIG pipeline (Eqs. 1-5): MLLM description, MMSM in the UNet, Layered Embeddings "
                   "and A-STAR, then a BLIP-2 caption of the new image. `make demo` runs it.",
        "stages": [("Models", "models", [1, 4, 6, 20]), ("Input image + instruction", "inputs", [2, 3]),
                   ("MLLM describe + MMSM", "mmig", [5, 7]),
                   ("Mask + layer prompts", "inputs", [8, 9, 10, 11, 12, 13, 14, 22]),
                   ("Layered Embeddings + A-STAR", "mmig", [15, 16, 23]), ("Edit", "generate", [17, 18, 19]),
                   ("Caption (BLIP-2)", "mmig", [21])],
    },
    "mumu_lora_merge": {
        "summary": "A MUMU bundle on a community SDXL fine-tune: its UNet LoRA is merged into the checkpoint, "
                   "its VLM LoRA into the VLM, and its adapter encodes the interleaved prompt.",
        "stages": [("Models", "models", [1, 2, 6]), ("Reference images + prompt", "inputs", [3, 4, 5]),
                   ("MUMU encode", "mmig", [8, 9]), ("Generate", "generate", [10, 11, 12, 13])],
    },
    "llmga_instruction_edit": {
        "summary": "LLMGA instruction editing (§3.1): the MLLM writes a prompt for the source image and one for the "
                   "edited image; Direct Inversion inverts the photo and prompt-to-prompt edits it, the source "
                   "branch reconstructing the input exactly. Replace the Empty Image with Load Image.",
        "stages": [("Models", "models", [1, 4]), ("Source image", "inputs", [2, 3]),
                   ("LLMGA source + target prompts", "mmig", [5, 6, 7, 8]),
                   ("Encode prompts", "inputs", [9, 10, 11]), ("Invert + edit", "mmig", [12, 13]),
                   ("Outputs", "outputs", [14, 15, 16, 17])],
    },
    "llmga_instruction_edit_conversation": {
        "summary": "A two-instruction LLMGA conversation: edit the image, then edit the edit (the second "
                   "instruction reads the first turn as history).",
        "stages": [("Models", "models", [1, 4]), ("Source image", "inputs", [2, 3]),
                   ("LLMGA source + first edit prompts", "mmig", [5, 6, 7, 8]),
                   ("Encode prompts", "inputs", [9, 10, 11]), ("Invert + first edit", "mmig", [12, 13]),
                   ("First edit outputs", "outputs", [14, 15, 16, 17]),
                   ("Second instruction (edit the edit)", "mmig", [18, 19, 20]),
                   ("Invert + second edit", "mmig", [21, 22]), ("Second edit output", "outputs", [23, 24])],
    },
}
