"""Quality part `mumu`: with an object's image in the prompt and no colour (or no colour and shape) in its text, the
fraction of generations whose object takes the reference image's colour (and shape), against the same text alone.

The bundle is devtools/world/weights/mumu/world-mumu (trained by `python -m devtools.world.train_mumu`, the pack's
`mumu` recipe on the world SDXL and the world VLM). Everything runs through the pack's nodes in-process, as a
graph would: MMIG VLM Loader (the world VLM, perceiver dropped, 32 px images as trained), MMIG MUMU Loader (the
bundle's UNet LoRA merged into the host's world checkpoint by the host's LoRA loader, its VLM LoRA into the VLM),
MMIG MUMU Encode (768 x 768 size conditioning, as trained), then the host's sampler (part t2i's steps, CFG and
noise per seed; the negative is CLIP Text Encode of "", as the workflows pair them) and VAE.

Each evaluation scene 1_000_000 + i is drawn with one object; its crop (the training crops' box) is the
reference image. Figures, each over the same seeds and noise:
- mumu_colour_from_image: "a <image1> circle on a grey background" (the shape said, the colour not): the drawn
  object has the reference's colour; mumu_colour_text_only: the same text without the image (chance level);
- mumu_colour_and_shape_from_image: "a <image1> on a grey background": the drawn object has the reference's
  colour and shape; mumu_colour_and_shape_text_only: "a on a grey background", without the image;
- mumu_full_caption_with_image: the scene's whole caption with the crop before its shape word (the ceiling:
  the text says everything too);
- `*_over_text_only` ratios;
- mumu_<variant>_largest: the stricter reading of the same images: the LARGEST object the scorer finds has the
  reference's colour (and shape, where the variant asks for it). The figures above count any region of the
  colour, and the world UNet often paints several colours, so its text-only rate sits far above 1 in 7.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

WORLD = Path(__file__).resolve().parents[1] / "devtools" / "world" / "weights"
BUNDLE_NAME = "world-mumu"
BUNDLE = WORLD / "mumu"
VLM_NAME = "vlm"  # devtools/world/weights/vlm, registered as a models/vlm search path
SIZE_CONDITIONING = 768
IMAGE_RESOLUTION = 32  # the bundle's 16 tokens per image at the world VLM's 8 px patches
# what each variant's success is (devtools.world.score): the reference's colour, or its colour and shape
SCORED = {"colour_from_image": "colours_present", "colour_text_only": "colours_present",
          "colour_and_shape_from_image": "present", "colour_and_shape_text_only": "present",
          "full_caption_with_image": "present"}


def missing() -> str | None:
    from bench._quality_layered import world_checkpoint
    path, reason = world_checkpoint()
    if path is None:
        return reason
    if not (WORLD / VLM_NAME / "model.safetensors").is_file():
        return f"skipped: no world VLM ({WORLD / VLM_NAME} is missing)"
    if not (BUNDLE / BUNDLE_NAME / "mumu_bundle.json").is_file():
        return (f"skipped: no world MUMU bundle ({BUNDLE / BUNDLE_NAME} is missing: run "
                f"`python -m devtools.world.train_mumu`)")
    return None


def prompts(scene) -> dict[str, str]:
    """The prompt texts of one single-object scene, by variant."""
    from devtools.world import _article, caption
    obj = scene.objects[0]
    ground = (f"on a {scene.background} and {scene.background2} background" if scene.background2
              else f"on a {scene.background} background")
    full = caption(scene)
    at = full.index(obj.shape)
    return {"colour_from_image": f"{_article(obj.shape)} <image1> {obj.shape} {ground}",
            "colour_text_only": f"{_article(obj.shape)} {obj.shape} {ground}",
            "colour_and_shape_from_image": f"a <image1> {ground}",
            "colour_and_shape_text_only": f"a {ground}",
            "full_caption_with_image": f"{full[:at]}<image1> {full[at:]}"}


def largest_matches(image, scene, with_shape: bool) -> bool:
    """The biggest object found in the image has the scene's (single) object's colour, and shape if asked."""
    from devtools.world.score import detect
    found = detect(image)
    if not found:
        return False
    biggest, obj = max(found, key=lambda d: d.area), scene.objects[0]
    return biggest.colour == obj.colour and (not with_shape or biggest.shape == obj.shape)


def run(n_seeds: int):
    reason = missing()
    if reason:
        return {"skipped": reason, "n_seeds": 0}, []
    import torch

    from bench._quality_t2i import EVAL_SEED_BASE, decode, encode, load_world_sdxl, sample
    from devtools.pack import import_pack_module
    from devtools.world import render, sample_scene, to_tensor
    from devtools.world.score import score
    from devtools.world.train_mumu import crop_box
    from mmig_core.mm_prompt import build_prompt

    torch.set_num_threads(1)
    model, clip, vae = load_world_sdxl()
    import folder_paths
    encoder, lora = import_pack_module("nodes.encoder"), import_pack_module("nodes.lora")
    folder_paths.add_model_folder_path("vlm", str(WORLD))
    folder_paths.add_model_folder_path("mmig", str(BUNDLE))
    vlm = encoder.MMIG_VLMLoader().load(VLM_NAME, "fp32", True, IMAGE_RESOLUTION)[0]
    model, vlm, adapter, _report = lora.MMIG_MUMULoader().load(BUNDLE_NAME, model, vlm, 1.0, 1.0, "fp32")["result"]
    encode_node = encoder.MMIG_MUMUEncode()
    negative = encode(clip, "")
    scores: dict[str, list[dict]] = {}
    samples = []
    for i in range(n_seeds):
        scene = sample_scene(EVAL_SEED_BASE + i, n_objects=1)
        picture = render(scene)[0]
        x0, y0, x1, y1 = crop_box(scene.objects[0])
        crop = to_tensor(np.ascontiguousarray(picture[y0:y1, x0:x1]))
        for variant, text in prompts(scene).items():
            images = {1: crop} if "<image1>" in text else {}
            positive = encode_node.encode(vlm, adapter, [build_prompt(text, images)], SIZE_CONDITIONING,
                                          SIZE_CONDITIONING)[0]
            image = decode(vae, sample(model, positive, negative, seed=i))
            result = score(image, scene)
            result["largest"] = largest_matches(image, scene, SCORED[variant] == "present")
            scores.setdefault(variant, []).append(result)
            if i < 2 and variant in ("colour_from_image", "colour_and_shape_from_image"):
                reference = f"[{scene.objects[0].colour} {scene.objects[0].shape}]"
                samples.append((f"mumu: {text.replace('<image1>', reference)}", image))
    figures: dict = {"n_seeds": n_seeds, "bundle": BUNDLE_NAME}
    for variant, results in scores.items():
        figures[f"mumu_{variant}"] = round(float(np.mean([r[SCORED[variant]] for r in results])), 4)
        figures[f"mumu_{variant}_largest"] = round(float(np.mean([r["largest"] for r in results])), 4)
    for what in ("colour", "colour_and_shape"):
        for suffix in ("", "_largest"):
            base = figures[f"mumu_{what}_text_only{suffix}"]
            figures[f"mumu_{what}_from_image{suffix}_over_text_only"] = (
                None if base == 0 else round(figures[f"mumu_{what}_from_image{suffix}"] / base, 3))
    return figures, samples
