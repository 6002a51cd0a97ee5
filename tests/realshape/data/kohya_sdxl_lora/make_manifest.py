"""Writes manifest.json: the key and shape set of a kohya sd-scripts SDXL LoRA (networks.lora, no conv_dim), rank 32,
the layout of the LoRAs published for SDXL base 1.0 (e.g. on Civitai / the Hub). Written from kohya's rules, not from
the host or the pack, so the test that reads it checks both against an outside account:

- sd-scripts networks/lora.py: LoRA wraps every Linear and 1x1 Conv2d inside the UNet's `Transformer2DModel`s
  (UNET_TARGET_REPLACE_MODULE) and inside the text encoders' `CLIPAttention` / `CLIPMLP`
  (TEXT_ENCODER_TARGET_REPLACE_MODULE); module names are `lora_unet_` / `lora_te1_` / `lora_te2_` + the module path
  with dots as underscores; each has `.lora_down.weight` [rank, in], `.lora_up.weight` [out, rank] and `.alpha` [].
- sdxl_original_unet.py (the UNet sd-scripts trains for SDXL) keeps SAI's block names (input_blocks.N.1,
  middle_block.1, output_blocks.N.1) with diffusers' inner names (proj_in/out, attn1/attn2.to_q/k/v/to_out.0,
  ff.net.0.proj (GEGLU, 2 x 4 x width), ff.net.2); SDXL base 1.0: linear proj_in/out, 2048-d context, transformer
  depth 2 at 640 channels (input 4, 5; output 3, 4, 5) and 10 at 1280 (input 7, 8; middle; output 0, 1, 2).
- text encoders as sd-scripts loads them: te1 = CLIP ViT-L/14 (12 layers, 768, MLP 3072), te2 = OpenCLIP ViT-bigG/14
  in the transformers CLIPTextModelWithProjection layout (32 layers, 1280, MLP 5120).

    python tests/realshape/data/kohya_sdxl_lora/make_manifest.py
"""
import json
from pathlib import Path

RANK, ALPHA = 32, 16.0
UNET_ATTENTIONS = ([(f"input_blocks.{i}.1", 640, 2) for i in (4, 5)] + [(f"input_blocks.{i}.1", 1280, 10) for i in (7, 8)]
                   + [("middle_block.1", 1280, 10)] + [(f"output_blocks.{i}.1", 1280, 10) for i in (0, 1, 2)]
                   + [(f"output_blocks.{i}.1", 640, 2) for i in (3, 4, 5)])
CONTEXT = 2048


def unet_modules():
    for block, width, depth in UNET_ATTENTIONS:
        yield f"{block}.proj_in", width, width
        for t in range(depth):
            base = f"{block}.transformer_blocks.{t}"
            for attn in ("attn1", "attn2"):
                context = width if attn == "attn1" else CONTEXT
                yield f"{base}.{attn}.to_q", width, width
                yield f"{base}.{attn}.to_k", context, width
                yield f"{base}.{attn}.to_v", context, width
                yield f"{base}.{attn}.to_out.0", width, width
            yield f"{base}.ff.net.0.proj", width, 8 * width
            yield f"{base}.ff.net.2", 4 * width, width
        yield f"{block}.proj_out", width, width


def text_modules(layers, width, mlp):
    for i in range(layers):
        base = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f"{base}.self_attn.{proj}", width, width
        yield f"{base}.mlp.fc1", width, mlp
        yield f"{base}.mlp.fc2", mlp, width


def manifest():
    keys = {}
    for prefix, modules in (("lora_unet", unet_modules()), ("lora_te1", text_modules(12, 768, 3072)),
                            ("lora_te2", text_modules(32, 1280, 5120))):
        for path, fan_in, fan_out in modules:
            name = f"{prefix}_{path.replace('.', '_')}"
            keys[f"{name}.lora_down.weight"] = [RANK, fan_in]
            keys[f"{name}.lora_up.weight"] = [fan_out, RANK]
            keys[f"{name}.alpha"] = []
    return {"format": "kohya sd-scripts networks.lora, SDXL base 1.0", "rank": RANK, "alpha": ALPHA,
            "keys": dict(sorted(keys.items()))}


if __name__ == "__main__":
    out = Path(__file__).with_name("manifest.json")
    data = manifest()
    head = {k: v for k, v in data.items() if k != "keys"}
    lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data["keys"].items()]  # one key a line
    out.write_text(json.dumps(head)[:-1] + ', "keys": {\n' + ",\n".join(lines) + "\n}}\n")
    print(f"{out}: {len(manifest()['keys'])} keys")
