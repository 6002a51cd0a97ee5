"""Quality part `editing`: LLMGA-style instruction editing (MMIG Direct Inversion + MMIG Prompt-to-Prompt) on the
world SDXL, against plain img2img, on the same evaluation scenes and recolour edits as part `layered`.

For eval scene 1_000_000 + i, one object is recoloured (`bench._quality_layered.edit_task`); the instruction is the
world's "Make the circle blue." (`devtools.world.edits.recolour`). Methods, each from the scene's latent (the world
VAE's encoding), all scored the same way:
- `instruction`: what workflows/llmga_instruction_edit does: the world VLM gives the source prompt (task "similar
  image") and the target prompt (task "edit": LLMGA's two turns), both read between the <gen_image> tags; then
  Direct Inversion of the source prompt and Prompt-to-Prompt (refine, cross 0.4, self 0.6, LocalBlend on the
  edited object's shape word, left out when a VLM prompt does not name it) to the target prompt, as the nodes run them (`nodes.editing`);
- `p2p_true_prompts`: the same inversion and edit with the true captions as source and target prompts (the edit
  alone, without the VLM's errors);
- `img2img`: plain img2img to the true edited caption at denoise 0.75 (part `layered`'s baseline).
Figures per method: `<method>_edit_success_rate` (the new colour with the object's shape, centred inside the
dilated object mask), `<method>_colour_in_mask_rate`, `<method>_background_psnr_db` (mean masked PSNR outside the
mask against the source; higher is better); `vlm_target_prompt_correct_rate` (the VLM's target prompt names the
edited scene, `score.caption_matches`).
"""
from __future__ import annotations

import numpy as np

STEPS, CFG = 20, 5.0
CROSS, SELF = 0.4, 0.6  # the workflow's cross_replace_steps / self_replace_steps


def vlm_prompts(vlm, image, instruction: str) -> tuple[str, str]:
    """(source prompt, target prompt) as the instruction-edit workflow's two MMIG MLLM Describe nodes give them."""
    from devtools.world import to_tensor
    from mmig_core import vlm as core
    from mmig_core.llmga_tags import EDIT_FIRST_TURN, TASK_TEMPLATES, extract_generation_prompt
    from mmig_core.mm_prompt import build_prompt
    tensor = to_tensor(image)
    settings = core.GenerationSettings(max_new_tokens=48)
    similar = core.describe(vlm, build_prompt(f"<image1> {TASK_TEMPLATES['similar image']}", {1: tensor}),
                            max_new_tokens=settings)[0]
    _first, edited, _ = core.describe_edit(vlm, build_prompt(f"<image1> {instruction}", {1: tensor}),
                                           EDIT_FIRST_TURN, max_new_tokens=settings)
    return (extract_generation_prompt(similar) or similar, extract_generation_prompt(edited) or edited)


def p2p_edit(model, clip, latent, source: str, target: str, negative, blend: str, encode_text):
    """The edited latent of MMIG Direct Inversion (source prompt) + MMIG Prompt-to-Prompt (to the target)."""
    import torch
    from devtools.pack import import_pack_module
    editing = import_pack_module("nodes.editing")
    if not all(blend in prompt.lower().split() for prompt in (source, target)):
        blend = ""  # LocalBlend needs the word in both prompts; a VLM prompt may not name the object
    src, tgt = encode_text(clip, source), encode_text(clip, target)
    with torch.inference_mode():
        inversion, _ = editing.MMIG_DirectInversion().invert(model, {"samples": latent}, src, STEPS)
        result, _ = editing.run_edit(model, inversion, src, tgt, clip, source, target, negative, CFG, "refine",
                                     CROSS, SELF, blend_words=blend)
    return result.edited


def run(n_seeds: int):
    from bench._quality_layered import (MASK_DILATION, decode, edit_succeeded, edit_task, encode_text, img2img,
                                        load_checkpoint, world_checkpoint)
    path, reason = world_checkpoint()
    if path is None:
        return {"skipped": reason, "n_seeds": 0}, []
    import torch
    import torch.nn.functional as F

    from bench._quality_vlm import WEIGHTS
    from devtools.paths import REPO_ROOT
    from devtools.world import caption, render
    from devtools.world.edits import recolour
    from devtools.world.score import caption_matches, masked_psnr
    from mmig_core import vlm as core

    torch.set_num_threads(1)
    model, clip, vae = load_checkpoint(path)
    vlm = core.load_vlm(REPO_ROOT / WEIGHTS)
    negative = encode_text(clip, "")
    methods = ("instruction", "p2p_true_prompts", "img2img")
    rates = {m: {"edit": [], "colour": [], "psnr": []} for m in methods}
    vlm_correct, samples = [], []
    for i in range(n_seeds):
        scene, edited, j, colour = edit_task(i)
        edit = recolour(scene, j, colour)
        image, masks = render(scene)
        obj_mask = torch.from_numpy(masks[j].astype(np.float32))
        mask = F.max_pool2d(obj_mask[None, None], 2 * MASK_DILATION + 1, stride=1, padding=MASK_DILATION)[0, 0]
        mask = mask.numpy() > 0.5
        with torch.inference_mode():
            latent = vae.encode(torch.from_numpy(image.astype(np.float32) / 255)[None]).clone()
        source_prompt, target_prompt = vlm_prompts(vlm, image, edit.instruction)
        vlm_correct.append(caption_matches(target_prompt, edited))
        shape = scene.objects[j].shape
        latents = {
            "instruction": p2p_edit(model, clip, latent, source_prompt, target_prompt, negative, shape, encode_text),
            "p2p_true_prompts": p2p_edit(model, clip, latent, caption(scene), caption(edited), negative, shape,
                                         encode_text),
            "img2img": img2img(model, latent, encode_text(clip, caption(edited)), negative, seed=i),
        }
        for name, out_latent in latents.items():
            out = decode(vae, out_latent)
            rates[name]["edit"].append(edit_succeeded(out, mask, colour, shape))
            rates[name]["colour"].append(edit_succeeded(out, mask, colour, None))
            rates[name]["psnr"].append(masked_psnr(out, image, ~mask))
            if i < 2:
                samples.append((f"{edit.instruction} {name}" + (f": {target_prompt}" if name == "instruction"
                                                                  else ""), out))
    figures = {"n_seeds": n_seeds, "checkpoint": path.name, "steps": STEPS, "cfg": CFG,
               "vlm_target_prompt_correct_rate": float(np.mean(vlm_correct))}
    for name, r in rates.items():
        finite = [p for p in r["psnr"] if np.isfinite(p)]
        figures[f"{name}_edit_success_rate"] = float(np.mean(r["edit"]))
        figures[f"{name}_colour_in_mask_rate"] = float(np.mean(r["colour"]))
        figures[f"{name}_background_psnr_db"] = float(np.mean(finite)) if finite else float("inf")
    return figures, samples
