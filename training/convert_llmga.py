"""Convert an LLMGA MLLM in the original LLaVA layout into a transformers LLaVA folder.

    python -m training.convert_llmga SRC OUT --vision-tower CLIP_FOLDER [--conversation MODE]

SRC is a released LLMGA MLLM folder (binxia/llmga-llama-2-7b-chat-full-finetune, -vicuna-, -mistral_instruct-,
...): `llava_llama` / `llava_mistral` config, `model.mm_projector` weights, no processor. CLIP_FOLDER is a local copy
of the tower its config names (openai/clip-vit-large-patch14-336; a CLIPModel or a CLIPVisionModel folder).
OUT gets a LlavaForConditionalGeneration folder in the llava-hf layout (what llava-hf/llava-1.5-7b-hf holds, which
transformers 4.x and 5.x both load): the language model and projector weights renamed, the CLIP tower copied in, the
`<image>` token added to the tokenizer with the embeddings and LM head grown by one row each, a LlavaProcessor
(the CLIP image processor, padding to a square with the mean colour as LLMGA's `image_aspect_ratio: pad` does, plus
the LLaMA tokenizer) and a chat template that renders LLMGA's conversation format and system prompt exactly
(`--conversation`, default: the mode LLMGA's CLIs pick from the folder name).

Deviation: the new `<image>` rows are the mean of the existing rows (transformers' own llava conversion samples
around the mean; the mean is deterministic). The embedding row is never read (image features replace it); the LM
head row gives `<image>` an average logit.

Deviation (tokenization, measured with a SentencePiece LLaMA tokenizer, not in the suite: it needs sentencepiece):
LLMGA tokenizes the text between `<image>` tokens chunk by chunk, so each chunk after an image starts with LLaMA's
"▁" prefix piece. The converted tokenizer splits on the added `<image>` token instead; with a tokenizer saved with
`legacy: true` the ids are identical, with `legacy: false` the one "▁" piece after each `<image>` is absent (as in
transformers' own llava-hf conversions). Text-only prompts and multi-turn `<s>` separators are identical either way.

Weights are read from .safetensors, or from .bin files only through torch.load(weights_only=True); they are written
as .safetensors only, one output shard per input shard, into OUT.partial, renamed to OUT when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from mmig_core import llava_layout, llmga_tags
from mmig_core.llava_layout import LayoutError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def weight_files(folder: Path, what: str) -> list[Path]:
    """The folder's weight shards: safetensors when present, else .bin (never both)."""
    for pattern in WEIGHT_PATTERNS:
        files = sorted(p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith("training_args"))
        if files:
            return files
    raise LayoutError(f"{folder} holds no weights (*.safetensors or *.bin) for the {what}.")


def read_weights(path: Path) -> dict:
    import torch
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:  # a truncated or foreign file: say which
            raise LayoutError(f"{path} is not a readable safetensors file ({exc}).") from exc
    try:
        weights = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LayoutError(f"{path} is a pickle that torch.load(weights_only=True) refuses ({type(exc).__name__}); "
                          f"the converter does not run pickled code. Convert it to .safetensors with a tool you "
                          f"trust, or download the safetensors version.") from exc
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise LayoutError(f"{path} does not hold a plain name -> tensor dictionary.")
    return weights


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LayoutError(f"{path.parent} has no {path.name} ({what}).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayoutError(f"{path} is not readable JSON ({exc}).") from exc
    if not isinstance(value, dict):
        raise LayoutError(f"{path} is not a JSON object.")
    return value


def _grow(weight, rows: int):
    """`weight` with rows appended up to `rows`, each the mean of the existing rows (see the module docstring)."""
    import torch
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0).contiguous()


def _processor(clip: Path, tokenizer, config: dict, vision: dict, mode: str):
    from transformers import CLIPImageProcessor, LlavaProcessor
    preprocessor = _read_json(clip / "preprocessor_config.json", "the CLIP image processor")
    kwargs = llava_layout.image_processor_kwargs(preprocessor)
    if config.get("image_aspect_ratio", "square") == "pad":
        try:
            from transformers import LlavaImageProcessor  # pads to a square with the mean colour, as expand2square
        except ImportError:
            import transformers
            raise LayoutError(f"transformers {transformers.__version__} has no LlavaImageProcessor, which does "
                              f"LLMGA's pad-to-square preprocessing; upgrade transformers (4.50 or later is "
                              f"tested) and convert again.") from None
        image_processor = LlavaImageProcessor(do_pad=True, **kwargs)
    else:
        image_processor = CLIPImageProcessor(**kwargs)
    strategy = llava_layout.SELECT_FEATURE[config.get("mm_vision_select_feature", "patch")]
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                          vision_feature_select_strategy=strategy, chat_template=llava_layout.chat_template(mode),
                          image_token=llava_layout.IMAGE_TOKEN, num_additional_image_tokens=1)


def convert(src, out, vision_tower, conversation: str | None = None, log=print) -> Path:
    """Write the converted folder to `out` (through `out`.partial); returns `out`."""
    from safetensors.torch import save_file
    from transformers import AddedToken, AutoTokenizer

    src, out, clip = Path(src), Path(out), Path(vision_tower)
    if not src.is_dir():
        raise LayoutError(f"{src} is not a folder (expected an LLMGA MLLM folder in the original LLaVA layout).")
    config = llava_layout.read_config(src)
    if config is None:
        raise LayoutError(f"{src} has no readable config.json; expected an LLMGA MLLM folder.")
    if not llava_layout.is_original_layout(src):
        raise LayoutError(f"{src} is not in the original LLaVA layout (config.json model_type "
                          f"{config.get('model_type')!r}, no mm_vision_tower): nothing to convert. A transformers "
                          f"LLaVA folder loads as it is.")
    text_type = llava_layout.check_convertible(config, src)
    tower_id = config.get("mm_vision_tower", "openai/clip-vit-large-patch14-336")
    if not clip.is_dir():
        raise LayoutError(f"--vision-tower {clip} is not a folder. Give a local copy of {tower_id}, the tower "
                          f"{src.name} was trained with (a folder with config.json, preprocessor_config.json and "
                          f"its weights).")
    vision = llava_layout.clip_vision_config(_read_json(clip / "config.json", "the CLIP config"), clip)
    if vision["hidden_size"] != config["mm_hidden_size"]:
        raise LayoutError(f"--vision-tower {clip} is a CLIP of width {vision['hidden_size']}, but {src.name}'s "
                          f"projector takes mm_hidden_size={config['mm_hidden_size']} features (its tower is "
                          f"{tower_id}; CLIP ViT-L/14 is 1024 wide). Give the tower the checkpoint names.")
    layer = config.get("mm_vision_select_layer", -2)
    if not -vision["num_hidden_layers"] <= layer <= vision["num_hidden_layers"]:
        raise LayoutError(f"{src.name} selects CLIP layer {layer}, but {clip} has {vision['num_hidden_layers']}.")
    mode = conversation or llmga_tags.conversation_mode(src.name)
    if mode not in llava_layout.CONVERSATIONS:
        raise LayoutError(f"conversation mode {mode!r} has no chat template in the converter; choose one of "
                          f"{', '.join(llava_layout.CONVERSATIONS)} with --conversation.")
    if out.exists():
        raise LayoutError(f"{out} already exists; remove it or choose another OUT.")
    src_files, clip_files = weight_files(src, "language model"), weight_files(clip, "vision tower")

    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it reads config.json and warns that llava_llama is not a tokenizer's type
    try:
        with warnings.catch_warnings():  # and that its null rope_scaling is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - missing/corrupt tokenizer files, or a version that cannot read them
        hint = ("The folder needs the tokenizer files it was released with (tokenizer.model / tokenizer.json and "
                "tokenizer_config.json).")
        if not (src / "tokenizer.json").is_file() and (src / "tokenizer.model").is_file():
            import importlib.util
            if importlib.util.find_spec("sentencepiece") is None:
                hint = ("Its LLaMA tokenizer is a SentencePiece tokenizer.model (LLaVA saves the slow tokenizer): "
                        "pip install sentencepiece, then convert again; the converted folder gets a tokenizer.json "
                        "and no longer needs it.")
        raise LayoutError(f"could not read the tokenizer in {src}: {type(exc).__name__}: "
                          f"{str(exc).rstrip('.')}. {hint}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if llava_layout.IMAGE_TOKEN in tokenizer.get_vocab():
        raise LayoutError(f"{src}'s tokenizer already has {llava_layout.IMAGE_TOKEN}; it is not a released "
                          f"original-layout checkpoint this converter knows.")
    tokenizer.add_special_tokens({"additional_special_tokens": [
        AddedToken(llava_layout.IMAGE_TOKEN, normalized=False, special=True)]})
    image_token_id = tokenizer.convert_tokens_to_ids(llava_layout.IMAGE_TOKEN)
    if isinstance(config.get("tokenizer_model_max_length"), int):
        tokenizer.model_max_length = config["tokenizer_model_max_length"]
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token  # LLMGA's training pads with unk
    rows = max(int(config["vocab_size"]), image_token_id + 1)
    processor = _processor(clip, tokenizer, config, vision, mode)  # before any weight is written: fail early

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        index, seen, total = {}, set(), 0
        shards = [(f, "language model") for f in src_files] + [(f, "vision tower") for f in clip_files]
        own_tower, lm_dtype = False, None
        for number, (path, what) in enumerate(shards, start=1):
            weights = read_weights(path)
            mapped = {}
            for key, tensor in weights.items():
                name = llava_layout.hub_key(key) if what == "language model" else llava_layout.clip_hub_key(key)
                if name is None:
                    continue
                if what == "vision tower" and own_tower:
                    continue  # the checkpoint's own (fine-tuned) tower wins over the CLIP folder's
                if name in seen:
                    raise LayoutError(f"{path}: weight {key} appears in more than one shard.")
                if name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
                    tensor = _grow(tensor, rows)
                if what == "language model" and tensor.is_floating_point():
                    lm_dtype = lm_dtype or tensor.dtype
                elif what == "vision tower" and tensor.is_floating_point() and lm_dtype is not None:
                    tensor = tensor.to(lm_dtype)  # LLaVA runs its tower in the model's dtype; CLIP-L ships fp32
                mapped[name] = tensor.contiguous()
            own_tower = own_tower or any(n.startswith("vision_tower.") for n in mapped) and what == "language model"
            if not mapped:
                continue
            shard = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(mapped, str(partial / shard), metadata={"format": "pt"})
            for name, tensor in mapped.items():
                index[name] = shard
                total += tensor.numel() * tensor.element_size()
            seen.update(mapped)
            log(f"convert_llmga: {path.name} -> {shard} ({len(mapped)} tensors)")
        _check_complete(seen, config, src, clip, vision)
        (partial / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2) + "\n")
        hf_config = llava_layout.llava_config(config, vision, text_type, rows, image_token_id)
        (partial / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if (src / "generation_config.json").is_file():
            shutil.copyfile(src / "generation_config.json", partial / "generation_config.json")
        processor.save_pretrained(str(partial))
        (partial / "CONVERTED_FROM.json").write_text(json.dumps(
            {"source": src.name, "source_model_type": config["model_type"], "vision_tower": tower_id,
             "vision_tower_folder": clip.name, "conversation": mode, "image_token_id": image_token_id,
             "rows_added": rows - int(config["vocab_size"]), "converter": "training.convert_llmga"}, indent=2) + "\n")
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"convert_llmga: wrote {out} (conversation {mode}, <image> = token {image_token_id})")
    return out


def _check_complete(seen: set, config: dict, src: Path, clip: Path, vision: dict) -> None:
    layers = config.get("num_hidden_layers")
    needed = {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
              "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight",
              "vision_tower.vision_model.embeddings.patch_embedding.weight"}
    if not config.get("tie_word_embeddings", False):
        needed.add("language_model.lm_head.weight")
    if isinstance(layers, int):
        needed |= {f"language_model.model.layers.{i}.self_attn.q_proj.weight" for i in range(layers)}
    needed |= {f"vision_tower.vision_model.encoder.layers.{i}.self_attn.q_proj.weight"
               for i in range(vision["num_hidden_layers"])}
    missing = sorted(needed - seen)
    if missing:
        where = clip if missing[0].startswith("vision_tower") else src
        raise LayoutError(f"{where} lacks weights the converted model needs, e.g. {', '.join(missing[:3])}.")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m training.convert_llmga", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="the LLMGA MLLM folder (original LLaVA layout)")
    parser.add_argument("out", type=Path, help="where to write the transformers LLaVA folder (must not exist)")
    parser.add_argument("--vision-tower", type=Path, required=True,
                        help="a local copy of the CLIP tower the checkpoint names (openai/clip-vit-large-patch14-336)")
    parser.add_argument("--conversation", choices=sorted(llava_layout.CONVERSATIONS), default=None,
                        help="LLMGA conversation mode for the chat template (default: from the folder name)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.out, args.vision_tower, args.conversation)
    except LayoutError as exc:
        print(f"convert_llmga: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
