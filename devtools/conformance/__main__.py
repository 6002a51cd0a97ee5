"""`python -m devtools.conformance <name> --reference PATH [--out DIR]` (see the package docstring)."""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
from pathlib import Path

from . import FIXTURES_DIR, reference_commit, reference_tree


def main(argv=None) -> int:
    package = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(package)]) if not m.name.startswith("_"))
    parser = argparse.ArgumentParser(prog="python -m devtools.conformance", description=__doc__)
    parser.add_argument("name", choices=names, help="which reference's fixtures to regenerate")
    parser.add_argument("--reference", type=Path, required=True,
                        help="a checkout (or bare git directory) of the reference repository")
    parser.add_argument("--out", type=Path, default=None, help="default: tests/conformance/<name>/")
    args = parser.parse_args(argv)
    module = importlib.import_module(f"{__package__}.{args.name}")
    out = args.out or FIXTURES_DIR / args.name
    out.mkdir(parents=True, exist_ok=True)
    with reference_tree(args.reference) as tree:
        module.regenerate(tree, out)
    source = {"repository": module.REFERENCE, "commit": reference_commit(args.reference),
              "command": f"python -m devtools.conformance {args.name} --reference <checkout of {module.REFERENCE}>"}
    (out / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    print(f"conformance: {args.name} fixtures from {module.REFERENCE} written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
