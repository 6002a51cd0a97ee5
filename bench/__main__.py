"""Run every benchmark module in this folder (`make bench`); each prints one summary line."""
import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    failed = 0
    for module in sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_")):
        try:
            importlib.import_module(f"bench.{module}").main()
        except Exception as e:  # one broken benchmark must not hide the others' numbers
            print(f"bench/{module}: FAILED: {e}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
