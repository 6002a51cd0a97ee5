"""The pack's architecture rules, checked on the source tree."""
import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from devtools.registry import scan_python

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_core_and_training_never_import_the_host():
    offenders = []
    for package in ("mmig_core", "training"):
        for path in (ROOT / package).rglob("*.py"):
            for name in imported_modules(path):
                if name.split(".")[0] in ("comfy", "comfy_extras", "folder_paths", "nodes", "execution", "server"):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_what_the_host_imports_reaches_the_pack_relatively():
    """The host imports the pack as a package (custom_nodes/<folder>), so `mmig_core` and `nodes` are not top-level
    modules there: inside them, the pack's own modules are imported relatively."""
    offenders = []
    for package in ("mmig_core", "nodes"):
        for path in (ROOT / package).rglob("*.py"):
            for name in imported_modules(path):
                if name.split(".")[0] in ("mmig_core", "training", "devtools"):  # `nodes` is the host's own
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_requirements_are_loose_and_leave_torch_to_the_host():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        assert "==" not in line, f"pinned requirement: {line}"
        assert not re.match(r"torch(vision|audio)?\b", line), f"torch is the host's: {line}"


def test_pyproject_has_comfy_registry_fields():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"]
    assert meta["project"]["name"] and meta["project"]["version"]


def test_core_imports_stay_light():
    # Heavy libraries load when a node first runs, never when ComfyUI imports the pack.
    code = ("import sys, pkgutil, importlib, mmig_core\n"
            "for m in pkgutil.walk_packages(mmig_core.__path__, 'mmig_core.'): importlib.import_module(m.name)\n"
            "heavy = [m for m in ('transformers', 'diffusers', 'peft', 'accelerate') if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_unsafe_loading_in_shipped_code():
    for package in ("mmig_core", "nodes", "training"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            # Parsed, not matched: a regex stops at the first ")" of `torch.load(str(path), ...)`.
            unsafe = [line for line, what in scan_python(text) if what.startswith("torch.load()")]
            assert unsafe == [], f"{path}: torch.load without weights_only=True on lines {unsafe}"
            assert "trust_remote_code=True" not in text, path
            assert not re.search(r"(?<![.\w])(eval|exec)\(|pickle\.loads?\(", text), path


def test_pyproject_dependencies_match_requirements():
    # The registry reads pyproject.toml, ComfyUI users `pip install -r requirements.txt`: keep them one list.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(filter(None, listed)) == sorted(meta["project"]["dependencies"])


def test_training_extra_matches_requirements_training():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = (ROOT / "requirements-training.txt").read_text().splitlines()
    listed = [line.split("#")[0].strip() for line in lines]
    assert sorted(filter(None, listed)) == sorted(meta["project"]["optional-dependencies"]["training"])
