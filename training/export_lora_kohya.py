"""Convert an SDXL UNet LoRA (diffusers, peft, or a MUMU bundle's) to the kohya layout.

The output has kohya names (lora_unet_…, ldm layer names, with alpha), so the host's plain Load LoRA
node and other tools read it.

    python -m training.export_lora_kohya IN.safetensors|BUNDLE_FOLDER OUT.safetensors [--alpha A]
"""
from __future__ import annotations

import argparse

from mmig_core.lora import export_kohya


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the LoRA to convert (.safetensors; kohya, diffusers or peft layout), "
                                       "or a MUMU bundle folder")
    parser.add_argument("target", help="where to write the kohya-layout .safetensors")
    parser.add_argument("--alpha", type=float, default=None,
                        help="alpha for modules that have none (peft keeps lora_alpha in adapter_config.json); "
                             "default: the rank, i.e. scale 1")
    args = parser.parse_args(argv)
    count = export_kohya(args.source, args.target, alpha=args.alpha)
    print(f"wrote {count} LoRA modules in the kohya layout to {args.target}")


if __name__ == "__main__":
    main()
