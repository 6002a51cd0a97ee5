"""Quality part: the world VLM (devtools/world/weights/vlm, a small Idefics2) answers the world's describe and edit
instructions, against the same architecture untrained (the trainer's step-0 weights), on the same evaluation seeds.

Both go through the functions MMIG MLLM Describe calls, in the pack's prompt style (what its prompt_style "auto"
picks for an Idefics2 folder), greedy decoding:
- describe: `mmig_core.vlm.describe` on "<image1> Describe the image." (the node's task "as written");
  vlm_describe_names_objects: the response names every object of the scene (`score.names_objects`);
- edit: `mmig_core.vlm.describe_edit` (the node's task "edit": LLMGA's "Generate a similar image" turn, then the
  instruction, e.g. "Make the circle blue.", from devtools/world/edits.py); the description is the prompt between
  the <gen_image> tags (`llmga_tags.extract_generation_prompt`, the node's "llmga prompt" mode);
  vlm_edit_correct: that description matches the edited scene's caption (`score.caption_matches`: the objects,
  order-free, and the background); vlm_edit_exact_string: it equals the edited caption word for word;
  vlm_tags_rate: responses with a complete tag pair; vlm_describe_background: the description names the scene's
  background(s) exactly (a part of the scene the model learns before the objects).
"""
from __future__ import annotations

import numpy as np

WEIGHTS = "devtools/world/weights/vlm"
EDIT_SEED_OFFSET = 7  # the edit of eval scene s is sample_edit(scene, s + EDIT_SEED_OFFSET)


def answers(folder, data, *, max_new_tokens: int = 48) -> tuple[list[str], list[str], list[str]]:
    """(describe responses, edit responses, edit instructions) for [(scene, image, ...)]."""
    from devtools.world import to_tensor
    from devtools.world.edits import sample_edit
    from mmig_core import vlm as core
    from mmig_core.llmga_tags import EDIT_FIRST_TURN
    from mmig_core.mm_prompt import build_prompt

    vlm = core.load_vlm(folder)
    settings = core.GenerationSettings(max_new_tokens=max_new_tokens)
    described, edited, instructions = [], [], []
    for scene, image, *_ in data:
        tensor = to_tensor(image)
        described.append(core.describe(vlm, build_prompt("<image1> Describe the image.", {1: tensor}),
                                       max_new_tokens=settings)[0])
        edit = sample_edit(scene, scene.seed + EDIT_SEED_OFFSET)
        instructions.append(edit.instruction)
        _first, response, _ = core.describe_edit(vlm, build_prompt(f"<image1> {edit.instruction}", {1: tensor}),
                                                 EDIT_FIRST_TURN, max_new_tokens=settings)
        edited.append(response)
    return described, edited, instructions


def run(n_seeds: int):
    import torch

    from bench.quality import eval_seeds
    from devtools.paths import CACHE_DIR, REPO_ROOT
    from devtools.world import caption, dataset
    from devtools.world.edits import sample_edit
    from devtools.world.score import caption_matches, names_objects, parse_caption
    from devtools.world.train_vlm import save_untrained
    from mmig_core.llmga_tags import extract_generation_prompt

    torch.set_num_threads(1)
    trained = REPO_ROOT / WEIGHTS
    if not (trained / "model.safetensors").is_file():
        raise FileNotFoundError(f"no world VLM in {trained}: run `python -m devtools.world.train_vlm`")
    untrained = save_untrained(CACHE_DIR / "bench" / "world-untrained" / "vlm")
    data = dataset(eval_seeds(n_seeds))
    targets = [sample_edit(scene, scene.seed + EDIT_SEED_OFFSET).scene for scene, *_ in data]
    figures, shown = {}, {}
    for name, folder in (("", trained), ("_untrained", untrained)):
        described, edited, instructions = answers(folder, data)
        prompts = [extract_generation_prompt(r) for r in edited]
        figures[f"vlm_describe_names_objects{name}"] = float(np.mean(
            [names_objects(r, scene) for r, (scene, *_rest) in zip(described, data)]))
        figures[f"vlm_describe_background{name}"] = float(np.mean(
            [set(parse_caption(r)[1]) == {g for g in (scene.background, scene.background2) if g}
             for r, (scene, *_rest) in zip(described, data)]))
        figures[f"vlm_edit_correct{name}"] = float(np.mean(
            [p is not None and caption_matches(p, t) for p, t in zip(prompts, targets)]))
        figures[f"vlm_edit_exact_string{name}"] = float(np.mean(
            [p == caption(t) for p, t in zip(prompts, targets)]))
        figures[f"vlm_tags_rate{name}"] = float(np.mean([p is not None for p in prompts]))
        shown[name] = (described, edited, instructions)
    described, edited, instructions = shown[""]
    samples = []
    for i in range(min(4, len(data))):
        samples.append((f"describe: {described[i]}", data[i][1]))
        samples.append((f"{instructions[i]} -> {extract_generation_prompt(edited[i]) or edited[i]}", data[i][1]))
    return figures, samples
