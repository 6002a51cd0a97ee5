"""Quality part `mmsm`: MMSM stage-1 trained against untrained (identity), on the world checkpoint, same seeds.

Text-to-image on evaluation scenes 1_000_000 + i: the caption through the host's CLIP (as in part t2i), the
world VLM reading the scene's render with "Describe the image." (`mmig_core.vlm.describe`, what MMIG MLLM
Describe runs) for e_llm, and the MMSM patched into the host MODEL by the pack's own MMIG MMSM Apply node; the
host samples (euler, part t2i's steps and CFG, the same noise per seed) and decodes. Scored against the
caption by `devtools.world.score`. The world MMSM is trained by `python -m devtools.world.train_mmsm` (the
pack's `mmig` recipe, stage 1) on world training scenes, never on these.

Figures (each over the same seeds and noise):
- mmsm_untrained_*: the same MMSM architecture freshly initialised; its zero decoder makes it the identity, so
  this is plain text-to-image (it equals part t2i's figures, measured again here side by side);
- mmsm_trained_*: the trained MMSM, e_llm from the VLM's generated description (the real pipeline: when the
  VLM misdescribes the scene, MMSM is told the wrong objects);
- mmsm_trained_teacher_forced_*: the trained MMSM, e_llm the VLM's hidden states teacher-forced on the true
  caption (how e_0 is made in training): MMSM's own effect, apart from the VLM's description errors;
- mmsm_vlm_description_names_objects: how often the generated description names every object;
- mmsm_trained_mean_abs_pixel_change (0..255): how much the trained MMSM changes the drawing at all, against the
  untrained one on the same seed (MMSM's delta enters at the mid block, and the world UNet's decoder leans on its
  skip connections: a change far below one grey level cannot move a score).
Each has `all_present`, `exact`, `present`, `colours_present`, `background` (part t2i's meanings), and the
`*_over_untrained` ratios of all_present and present.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

MMSM_WEIGHTS = Path(__file__).resolve().parents[1] / "devtools" / "world" / "weights" / "mmsm" / "mmsm.safetensors"
VLM_WEIGHTS = Path(__file__).resolve().parents[1] / "devtools" / "world" / "weights" / "vlm"
INSTRUCTION = "Describe the image."  # the mmig recipe's instruction, as train_mmsm trains with it
VARIANTS = ("untrained", "trained", "trained_teacher_forced")


def missing() -> str | None:
    """Why the figure cannot be measured here, or None when everything it needs exists."""
    from bench._quality_layered import world_checkpoint
    path, reason = world_checkpoint()
    if path is None:
        return reason
    if not (VLM_WEIGHTS / "model.safetensors").is_file():
        return f"skipped: no world VLM ({VLM_WEIGHTS} is missing), so no e_llm for MMSM"
    if not MMSM_WEIGHTS.is_file():
        return (f"skipped: no trained world MMSM ({MMSM_WEIGHTS} is missing: run "
                f"`python -m devtools.world.train_mmsm`)")
    return None


def teacher_forced_embeds(vlm, prompt, text: str):
    """e_0 as the mmig recipe makes it: the VLM's last hidden states over the true caption, teacher-forced."""
    import torch

    from mmig_core.mmt import response_inputs, teacher_forced
    from mmig_core.vlm import LLMEmbeds
    inputs, start = response_inputs(vlm, prompt, text, INSTRUCTION)
    with torch.inference_mode():
        _logits, hidden = teacher_forced(vlm, inputs, start)
    hidden = hidden.float().cpu()
    return LLMEmbeds(hidden_states=hidden, attention_mask=torch.ones(hidden.shape[:2], dtype=torch.bool))


def run(n_seeds: int):
    reason = missing()
    if reason:
        return {"skipped": reason, "n_seeds": 0}, []
    import torch

    from bench._quality_t2i import EVAL_SEED_BASE, _rates, _ratio, decode, encode, load_world_sdxl, sample
    from devtools.pack import import_pack_module
    from devtools.world import caption, render, sample_scene, to_tensor
    from devtools.world.score import names_objects, score
    from mmig_core import vlm as core
    from mmig_core.mm_prompt import MMPrompt
    from mmig_core.mmsm import MMSM, init_mmsm, load_mmsm

    torch.set_num_threads(1)
    model, clip, vae = load_world_sdxl()
    negative = encode(clip, "")
    vlm = core.load_vlm(VLM_WEIGHTS)
    nodes = import_pack_module("nodes.mmsm")
    apply = nodes.MMIG_MMSMApply().apply
    trained = load_mmsm(MMSM_WEIGHTS)
    mmsms = {"untrained": nodes.LoadedMMSM(init_mmsm(MMSM(trained.config), seed=0), "untrained"),
             "trained": nodes.LoadedMMSM(trained, MMSM_WEIGHTS.name)}
    settings = core.GenerationSettings(max_new_tokens=48)
    scores: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    named, samples, changes = [], [], []
    for i in range(n_seeds):
        scene = sample_scene(EVAL_SEED_BASE + i)
        text = caption(scene)
        prompt = MMPrompt(segments=(0,), images=(to_tensor(render(scene)[0])[0],))
        description, generated = core.describe(vlm, prompt, suffix=INSTRUCTION, max_new_tokens=settings)
        named.append(names_objects(description, scene))
        embeds = {"untrained": generated, "trained": generated,
                  "trained_teacher_forced": teacher_forced_embeds(vlm, prompt, text)}
        positive = encode(clip, text)
        drawn = {}
        for variant in VARIANTS:
            patched = apply(model, mmsms[variant.split("_teacher")[0]], embeds[variant], 1.0)[0]
            image = drawn[variant] = decode(vae, sample(patched, positive, negative, seed=i))
            scores[variant].append(score(image, text))
            if i < 2:
                samples.append((f"mmsm {variant}: {text}", image))
        changes.append(np.abs(drawn["trained"].astype(np.float32) - drawn["untrained"].astype(np.float32)).mean())
    figures: dict = {"n_seeds": n_seeds, "weights": MMSM_WEIGHTS.name,
                     "mmsm_trained_mean_abs_pixel_change": round(float(np.mean(changes)), 4)}
    for variant in VARIANTS:
        figures.update({f"mmsm_{variant}_{k}": v for k, v in _rates(scores[variant]).items()})
    base = _rates(scores["untrained"])
    for variant in VARIANTS[1:]:
        rates = _rates(scores[variant])
        for key in ("all_present", "present"):
            figures[f"mmsm_{variant}_{key}_over_untrained"] = _ratio(rates[key], base[key])
    figures["mmsm_vlm_description_names_objects"] = round(float(np.mean(named)), 4)
    return figures, samples
