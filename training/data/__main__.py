"""`python -m training.data bootstrap ...` (MUMU §4 dataset bootstrapping) and `... inspect OUT_DIR`."""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    from training.data.shards import BootstrapConfig

    defaults = BootstrapConfig()
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    boot = commands.add_parser("bootstrap", help="image-caption pairs -> interleaved-prompt WebDataset shards")
    boot.add_argument("--pairs", required=True,
                      help="a folder of images with same-stem .txt captions, or a .jsonl of {image, caption}")
    boot.add_argument("--detector", required=True, help="GroundingDINO folder (saved with save_pretrained)")
    boot.add_argument("--out", required=True, help="output folder: shards + manifest.json")
    boot.add_argument("--shard-size", type=int, default=defaults.shard_size, help="input pairs per shard")
    boot.add_argument("--seed", type=int, default=defaults.seed)
    boot.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    boot.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    boot.add_argument("--box-threshold", type=float, default=defaults.box_threshold)
    boot.add_argument("--min-crops", type=int, default=defaults.min_crops,
                      help="pairs with fewer crops write no record (0 keeps text-only records)")
    boot.add_argument("--nouns", default=None, help="noun list file (one per line); default: the built-in list")
    show = commands.add_parser("inspect", help="print a bootstrap folder's manifest summary and first records")
    show.add_argument("out")
    show.add_argument("--records", type=int, default=3)
    args = parser.parse_args(argv)

    from mmig_core.model_files import ModelFilesError

    try:
        if args.command == "bootstrap":
            from training.data.shards import bootstrap
            config = BootstrapConfig(shard_size=args.shard_size, seed=args.seed, box_threshold=args.box_threshold,
                                     min_crops=args.min_crops, nouns_file=args.nouns)
            manifest = bootstrap(args.pairs, args.out, detector=args.detector, device=args.device, config=config,
                                 resume=args.resume)
            print(json.dumps({"out": args.out, "shards": len(manifest["shards"]), "complete": manifest["complete"],
                              "stats": manifest["stats"]}, indent=1))
        else:
            from training.data.reader import BootstrapDataset
            dataset = BootstrapDataset(args.out)
            print(json.dumps({"records": len(dataset), "skipped_shards": dataset.skipped_shards,
                              "stats": dataset.manifest["stats"]}, indent=1))
            for i in range(min(args.records, len(dataset))):
                item = dataset[i]
                print(f"{item['key']}: {item['prompt']!r} ({len(item['crops'])} crops)")
    except (FileNotFoundError, FileExistsError, ValueError, ModelFilesError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
