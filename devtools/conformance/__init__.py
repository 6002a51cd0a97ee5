"""Regenerates the conformance fixtures in `tests/conformance/<name>/` from a local copy of a reference.

    python -m devtools.conformance <name> --reference PATH [--out DIR]

PATH is a checkout of the reference repository (a work tree, or a bare git directory such as the
search tool's mirror, which is unpacked to a temporary folder first). Each `<name>` is a module of
this package with `REFERENCE` (the repository it reads, e.g. "Zj-BinXia/DiffRIR") and
`regenerate(reference: Path, out: Path) -> None`, which runs the reference's own code there and
writes facts only (key/shape manifests, reference outputs on fixed inputs) as data files: the
reference's code is never copied into the pack.
"""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

FIXTURES_DIR = Path(__file__).resolve().parents[2] / "tests" / "conformance"


@contextlib.contextmanager
def reference_tree(path: Path):
    """The reference's files as a directory: a work tree as it is, a bare git directory unpacked (HEAD)."""
    path = Path(path).resolve()
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        with tempfile.TemporaryDirectory(prefix="mmig-reference-") as tmp:
            archive = subprocess.run(["git", "--git-dir", str(path), "archive", "HEAD", *_present_paths(path)],
                                     check=True, capture_output=True).stdout
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(tmp, filter="data")
            yield Path(tmp)
    elif path.is_dir():
        yield path
    else:
        raise FileNotFoundError(f"{path} is neither a checkout nor a bare git directory of the reference")


def _present_paths(git_dir: Path) -> list[str]:
    """HEAD's files whose contents the git directory holds (a mirror may leave its largest blobs out)."""
    listing = subprocess.run(["git", "--git-dir", str(git_dir), "ls-tree", "-r", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    entries = [line.split("\t", 1) for line in listing]
    blobs = [meta.split()[2] for meta, _ in entries]
    check = subprocess.run(["git", "--git-dir", str(git_dir), "cat-file", "--batch-check"], input="\n".join(blobs),
                           capture_output=True, text=True).stdout.splitlines()
    return [name for (_, name), status in zip(entries, check) if not status.endswith("missing")]


@contextlib.contextmanager
def importable(root: Path):
    """Puts `root` first on sys.path for the reference's own imports, and takes it off again."""
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))


def reference_commit(path: Path) -> str:
    """The commit a fixture was made from, recorded beside it ('unknown' for a plain folder)."""
    path = Path(path).resolve()
    git_dir = ["--git-dir", str(path)] if (path / "HEAD").is_file() else ["-C", str(path)]
    result = subprocess.run(["git", *git_dir, "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"
