"""A tiny random-weight LLMGA MLLM in the ORIGINAL LLaVA repository layout, and a tiny CLIP vision tower folder.

`build(out, seed=0)` writes
- `out/llmga-llama-2-7b-chat-tiny/`: config.json as LLMGA's training code saves it (`llava_llama`, the LLaMA fields
  plus `mm_vision_tower` = the hub id of CLIP-L/336, `mm_projector_type` "mlp2x_gelu", `mm_vision_select_layer` -2,
  `image_aspect_ratio` "pad", ...), model.safetensors with the original names (`model.embed_tokens`,
  `model.layers.*`, `model.norm`, `lm_head`, `model.mm_projector.0/2.*`), and the tokenizer files (no `<image>`
  token, no chat template, no processor), as the released folders hold them;
- `out/clip-vit-tiny-patch14-56/`: a `CLIPVisionModel` saved with `save_pretrained` and its `CLIPImageProcessor`
  (the OpenAI CLIP mean/std, shortest-edge resize + center crop), standing in for openai/clip-vit-large-patch14-336.

Deviations from a real release, all for size: widths are tiny, the tower is 56 px / 14 px patches (16 patches, real
576), and the tokenizer is a byte-level BPE trained offline (a tokenizer.json) where the release has LLaMA's
SentencePiece tokenizer.model; its ids 0/1/2 are <unk>/<s>/</s> and it prepends <s>, as LLaMA's does.
`model_type="llava_mistral"` writes the Mistral variant. Deterministic in `seed`, offline.

    python -m devtools.tiny_llmga_original OUT_DIR
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from devtools.tiny_builder_cli import run_builder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ORIGINAL_NAME = "llmga-llama-2-7b-chat-tiny"
MISTRAL_NAME = "llmga-mistral_instruct-tiny"
CLIP_NAME = "clip-vit-tiny-patch14-56"
CLIP_HIDDEN = 32
TEXT_HIDDEN = 64
CLIP_VISION = dict(hidden_size=CLIP_HIDDEN, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                   image_size=56, patch_size=14, projection_dim=16)
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _tokenizer():
    from devtools.tiny_vlm_families._common import train_tokenizer
    return train_tokenizer(base_special=["<unk>", "<s>", "</s>"], added_special=[], bos="<s>", eos="</s>",
                           unk="<unk>", pad="<unk>", prepend_bos=True, model_max_length=4096)


def original_config(model_type: str, vocab: int, *, mm_hidden: int = CLIP_HIDDEN) -> dict:
    """config.json as LLMGA's training code writes it (LlavaConfig(LlamaConfig/MistralConfig) + the mm_* fields)."""
    text = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": TEXT_HIDDEN, "initializer_range": 0.02, "intermediate_size": 128,
            "max_position_embeddings": 4096, "num_attention_heads": 4, "num_hidden_layers": 2,
            "num_key_value_heads": 2, "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_scaling": None,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "use_cache": True, "vocab_size": vocab}
    if model_type == "llava_mistral":
        text.update(sliding_window=None, rope_theta=1000000.0, architectures=["LlavaMistralForCausalLM"])
    else:
        text.update(pretraining_tp=1, architectures=["LlavaLlamaForCausalLM"])
    return {"_name_or_path": "./checkpoints/llava-llama-2-7b-chat-pretrain", **text, "model_type": model_type,
            "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "mm_hidden_size": mm_hidden,
            "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
            "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
            "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right", "torch_dtype": "float32",
            "transformers_version": "4.37.2", "tune_mm_mlp_adapter": False, "use_mm_proj": True}


def build_clip(folder: Path, seed: int = 0, *, vision: dict = CLIP_VISION) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = CLIPVisionModel(CLIPVisionConfig(**vision)).eval()
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():  # explicit init: no version's defaults
                if p.dim() > 1 or name.endswith("class_embedding"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    size = vision["image_size"]
    CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                       crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
                       do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                       do_convert_rgb=True).save_pretrained(folder)
    return folder


def build_original(folder: Path, seed: int = 0, *, model_type: str = "llava_llama",
                   mm_hidden: int = CLIP_HIDDEN) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from devtools.tiny_vlm_families._common import random_init

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    config = original_config(model_type, len(tok), mm_hidden=mm_hidden)
    text_type = {"llava_llama": "llama", "llava_mistral": "mistral"}[model_type]
    text_fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in (
        "model_type", "architectures", "_name_or_path", "transformers_version", "torch_dtype") and v is not None}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text_type, **text_fields)).eval()
        random_init(lm, tok, seed=seed, eos_ids=(2,))
        generator = torch.Generator().manual_seed(seed + 2)
        projector = {"model.mm_projector.0.weight": (TEXT_HIDDEN, mm_hidden),
                     "model.mm_projector.0.bias": (TEXT_HIDDEN,),
                     "model.mm_projector.2.weight": (TEXT_HIDDEN, TEXT_HIDDEN),
                     "model.mm_projector.2.bias": (TEXT_HIDDEN,)}
        weights = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
        weights.update({k: torch.randn(shape, generator=generator) * 0.2 for k, shape in projector.items()})
    assert all(k.startswith("model.") or k == "lm_head.weight" for k in weights), sorted(weights)[:5]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 4096}, indent=2) + "\n")
    tok.save_pretrained(folder)
    return folder


def build(out: Path, seed: int = 0) -> Path:
    """Both folders under `out`: the original-layout checkpoint and the CLIP tower it names."""
    out = Path(out)
    build_original(out / ORIGINAL_NAME, seed)
    build_clip(out / CLIP_NAME, seed)
    return out


def main(argv: list[str] | None = None) -> None:
    def build_and_list(out: Path, seed: int = 0) -> Path:
        build(out, seed)
        for name in (ORIGINAL_NAME, CLIP_NAME):
            print(f"  {Path(out) / name}")
        return Path(out) / ORIGINAL_NAME  # the size printed is the checkpoint's
    run_builder(build_and_list, "tiny LLMGA (original LLaVA layout) + tiny CLIP tower", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
