"""Tiny random LoRAs for the tiny SDXL UNet (tests only): plain LoRAs in the kohya, diffusers and peft layouts,
and one file per format the host's Load LoRA reads (LoCon, Tucker LoCon, LoHa, LoKr, DoRA, diffs), with the
real SDXL kohya module names (`lora_unet_input_blocks_4_1_proj_in`): the tiny SDXL keeps SDXL's block layout."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from mmig_core.lora import ldm_to_diffusers_module, save_lora_file

CHECKPOINT_UNET_PREFIX = "model.diffusion_model."
# Linear layers (attention, feed-forward, projections, time embedding) and conv layers (3x3 and 1x1), across
# down, middle and up blocks, the upsampler included (its ldm index is the easiest to get wrong).
LORA_TARGETS = (
    "input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0", "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj",
    "input_blocks.4.1.proj_in", "middle_block.1.transformer_blocks.0.attn2.to_v", "input_blocks.4.0.emb_layers.1",
    "output_blocks.3.1.transformer_blocks.0.attn1.to_v",
    "input_blocks.4.0.in_layers.2", "input_blocks.4.0.skip_connection", "middle_block.2.out_layers.3",
    "output_blocks.2.2.conv", "output_blocks.1.0.skip_connection",
)


def unet_tensors(checkpoint) -> dict:
    """{ldm parameter path: tensor} (weights and biases) of a checkpoint's UNet."""
    with safe_open(str(checkpoint), "pt") as f:
        return {k[len(CHECKPOINT_UNET_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(CHECKPOINT_UNET_PREFIX)}


def unet_weights(checkpoint) -> dict:
    """{ldm module path: weight} of a checkpoint's UNet, read with safetensors."""
    with safe_open(str(checkpoint), "pt") as f:
        return {k[len(CHECKPOINT_UNET_PREFIX):-len(".weight")]: f.get_tensor(k) for k in f.keys()
                if k.startswith(CHECKPOINT_UNET_PREFIX) and k.endswith(".weight")}


def random_lora(weights: dict, targets=LORA_TARGETS, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """{ldm module path: (down A, up B, alpha)}: conv targets get a conv LoRA (kernel in A, 1x1 B)."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for module in targets:
        shape = weights[module].shape
        down_shape = (rank, *shape[1:]) if len(shape) == 4 else (rank, shape[1])
        up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        lora[module] = (torch.randn(down_shape, generator=generator) * 0.1,
                        torch.randn(up_shape, generator=generator) * 0.1, alpha)
    return lora


def lora_state_dict(lora: dict, layout: str) -> dict:
    """The LoRA in one layout: kohya (ldm names), diffusers (`unet.…`, `.lora.down`/`.lora.up`, alpha) or peft
    (`base_model.model.…`, `lora_A`/`lora_B`; peft keeps alpha outside the file, so it is folded into B)."""
    state = {}
    for module, (down, up, alpha) in lora.items():
        rank = down.shape[0]
        if layout == "kohya":
            name = "lora_unet_" + module.replace(".", "_")
            state.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                          f"{name}.alpha": torch.tensor(alpha)})
        elif layout == "diffusers":
            name = "unet." + ldm_to_diffusers_module(module)
            state.update({f"{name}.lora.down.weight": down, f"{name}.lora.up.weight": up,
                          f"{name}.alpha": torch.tensor(alpha)})
        elif layout == "peft":
            name = "base_model.model." + ldm_to_diffusers_module(module)
            state.update({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up * (alpha / rank)})
        else:
            raise ValueError(layout)
    return state


def write_lora(lora: dict, layout: str, path: Path) -> Path:
    save_lora_file(lora_state_dict(lora, layout), path)
    return path


def expected_merge(weights: dict, lora: dict, strength: float) -> dict:
    """W + s·(α/r)·B·A per module, computed in float64 without the pack's code."""
    merged = {}
    for module, (down, up, alpha) in lora.items():
        weight = weights[module].double()
        product = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
        merged[module] = weight + strength * (alpha / down.shape[0]) * product.reshape(weight.shape)
    return merged


# One file per format the host's Load LoRA reads. Each maps {ldm module: weight} (+ biases) to a state dict.
FORMATS = ("locon", "tucker_locon", "loha", "loha_tucker", "lokr", "lokr_tucker", "dora", "diff")


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _factor(n: int) -> tuple[int, int]:
    """n = a·b with a the largest divisor <= sqrt(n) (how LyCORIS splits a LoKr dimension)."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def format_state_dict(tensors: dict, fmt: str, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict:
    """A LoRA file's tensors in format `fmt` on the tiny SDXL; `tensors` from unet_tensors.

    locon / tucker_locon: every linear and conv weight of the UNet (Tucker: 3x3 convs as down 1x1 · mid 3x3 ·
    up 1x1, the rest plain); loha / lokr: LORA_TARGETS (with `_tucker`: the 3x3 convs Tucker-decomposed);
    dora: LoRA + dora_scale on output and on input axes; diff: `.diff` weights and `.diff_b` biases."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(shape, generator=gen) * 0.1  # noqa: E731
    weights = {k[:-len(".weight")]: v for k, v in tensors.items() if k.endswith(".weight") and v.ndim >= 2}
    every = sorted(weights)
    state = {}
    for module in (every if fmt in ("locon", "tucker_locon") else LORA_TARGETS):
        shape, name = tuple(weights[module].shape), kohya_name(module)
        out, inner = shape[0], shape[1]
        kernel = shape[2:]
        conv3 = len(shape) == 4 and kernel != (1, 1)
        tucker = fmt.endswith("tucker") and conv3
        put = lambda suffix, t: state.__setitem__(name + suffix, t.contiguous())  # noqa: E731
        if fmt in ("locon", "tucker_locon", "dora"):
            if fmt == "tucker_locon" and conv3:
                put(".lora_down.weight", rand(rank, inner, 1, 1))
                put(".lora_mid.weight", rand(rank, rank, *kernel))
            else:
                put(".lora_down.weight", rand(rank, *shape[1:]))
            put(".lora_up.weight", rand(out, rank, *([1, 1] if len(shape) == 4 else [])))
            if fmt == "dora":
                weight = weights[module].float()
                on_output = LORA_TARGETS.index(module) % 2 == 0
                norm = (weight.flatten(1).norm(dim=1).reshape(out, *[1] * (len(shape) - 1)) if on_output else
                        weight.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, inner, *[1] * len(kernel)))
                put(".dora_scale", norm * (1 + rand(*norm.shape)))
        elif fmt.startswith("loha"):
            for i in ("1", "2"):
                if tucker:
                    put(f".hada_w{i}_a", rand(rank, out))
                    put(f".hada_w{i}_b", rand(rank, inner))
                    put(f".hada_t{i}", rand(rank, rank, *kernel))
                else:
                    put(f".hada_w{i}_a", rand(out, rank))
                    put(f".hada_w{i}_b", rand(rank, inner * (kernel[0] * kernel[1] if kernel else 1)))
        elif fmt.startswith("lokr"):
            (a, b), (c, d) = _factor(out), _factor(inner)
            if LORA_TARGETS.index(module) % 3 == 0:
                put(".lokr_w1_a", rand(a, 2))
                put(".lokr_w1_b", rand(2, c))
            else:
                put(".lokr_w1", rand(a, c))
            if tucker:
                put(".lokr_w2_a", rand(rank, b))
                put(".lokr_w2_b", rand(rank, d))
                put(".lokr_t2", rand(rank, rank, *kernel))
            elif len(shape) == 4:
                put(".lokr_w2", rand(b, d, *kernel))
            else:
                put(".lokr_w2_a", rand(b, rank))
                put(".lokr_w2_b", rand(rank, d))
        elif fmt == "diff":
            put(".diff", rand(*shape))
            if module + ".bias" in tensors:
                put(".diff_b", rand(*tensors[module + ".bias"].shape))
            continue
        else:
            raise ValueError(f"unknown format {fmt!r}; one of {FORMATS}")
        put(".alpha", torch.tensor(alpha))
    return state


def main(argv=None) -> None:
    """Builds the tiny kohya-layout LoRA for the tiny SDXL, which must already sit in the same models folder."""
    import argparse

    from devtools.tiny_models import TINY_SDXL

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", type=Path, help="where to write it, e.g. MODELS/loras/mmig-tiny-lora.safetensors")
    out = parser.parse_args(argv).out
    checkpoint = out.resolve().parent.parent / TINY_SDXL
    write_lora(random_lora(unet_weights(checkpoint), seed=1), "kohya", out)


if __name__ == "__main__":
    main()
