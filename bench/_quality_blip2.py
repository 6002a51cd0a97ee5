"""Quality part: the world BLIP-2 (devtools/world/weights/blip2) captions world images, against the same
architecture untrained (its initialisation, the step-0 weights of the trainer), on the same evaluation seeds.

Both go through the node's own path: `mmig_core.blip2.load_blip2` and `mmig_core.blip2.caption_images` (what MMIG
BLIP-2 Loader / MMIG BLIP-2 Caption call), greedy decoding (num_beams=1; the node's default is 3 beams).

Figures: blip2_caption_exact_match (`score.caption_matches`: exactly the scene's objects, order-free, and its
background(s)) and blip2_names_objects (`score.names_objects`: every object named with its colour and shape).
"""
from __future__ import annotations

import numpy as np

WEIGHTS = "devtools/world/weights/blip2"


def caption_all(folder, images, batch: int = 25) -> list[str]:
    import torch

    from mmig_core.blip2 import caption_images, load_blip2

    captioner = load_blip2(folder)
    out = []
    for i in range(0, len(images), batch):
        chunk = torch.from_numpy(np.stack(images[i:i + batch]).astype(np.float32) / 255.0)
        out += caption_images(captioner, chunk, max_new_tokens=40, num_beams=1)
    return out


def run(n_seeds: int):
    import torch

    from bench.quality import eval_seeds
    from devtools.paths import CACHE_DIR, REPO_ROOT
    from devtools.world import dataset
    from devtools.world.score import caption_matches, names_objects
    from devtools.world.train_blip2 import save_untrained

    torch.set_num_threads(1)
    trained = REPO_ROOT / WEIGHTS
    if not (trained / "model.safetensors").is_file():
        raise FileNotFoundError(f"no world BLIP-2 in {trained}: run `python -m devtools.world.train_blip2`")
    untrained = save_untrained(CACHE_DIR / "bench" / "world-untrained" / "blip2")
    data = dataset(eval_seeds(n_seeds))
    images = [image for _, image, _, _ in data]
    figures, predictions = {}, {}
    for name, folder in (("", trained), ("_untrained", untrained)):
        captions = caption_all(folder, images)
        predictions[name] = captions
        figures[f"blip2_caption_exact_match{name}"] = float(np.mean(
            [caption_matches(c, scene) for c, (scene, *_rest) in zip(captions, data)]))
        figures[f"blip2_names_objects{name}"] = float(np.mean(
            [names_objects(c, scene) for c, (scene, *_rest) in zip(captions, data)]))
    samples = [(f"BLIP-2: {predictions[''][i]} | untrained: {predictions['_untrained'][i][:30]}", images[i])
               for i in range(min(8, len(images)))]
    return figures, samples
