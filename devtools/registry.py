"""What the Comfy Registry gets: comfy-cli's own validate and pack, and a scan of what ships.

comfy-cli lives in `.cache/comfy-cli` (`make setup` installs it there with `pip --target`, so its
dependencies stay out of .venv). `comfy node validate` checks pyproject.toml and runs ruff's
exec/eval rules offline; `comfy node pack` writes the tarball `comfy node publish` would upload
(git-tracked files minus .comfyignore, plus [tool.comfy] includes), without any network.

The registry's 2026 scan flags process spawning, environment access and network calls in what
ships; `scan_python`/`scan_js` find those (and model loading that could reach the hub, and
`torch.load` without weights_only) so a test can hold the shipped set to it.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from devtools.paths import CACHE_DIR, REPO_ROOT

COMFY_CLI_DIR = CACHE_DIR / "comfy-cli"
NETWORK_MODULES = {"subprocess", "socket", "urllib", "http", "requests", "httpx", "aiohttp", "ftplib", "smtplib",
                   "telnetlib", "webbrowser", "pty", "huggingface_hub"}
OS_CALLS = {"environ", "getenv", "putenv", "unsetenv", "system", "popen", "fork", "execv", "execve", "execvp",
            "execl", "spawnv", "spawnl", "startfile"}
BUILTIN_CALLS = {"eval", "exec", "compile", "__import__"}
JS_PATTERNS = {r"\bfetch\(": "fetch()", r"XMLHttpRequest": "XMLHttpRequest", r"new WebSocket\(": "WebSocket",
               r"https?://": "a URL", r"\beval\(": "eval()", r"new Function\(": "new Function()"}


class ComfyCliMissing(RuntimeError):
    pass


def comfy(*args: str, cwd: Path = REPO_ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs comfy-cli (`python -m comfy_cli --skip-prompt ...`), never prompting, tracking off."""
    if not (COMFY_CLI_DIR / "comfy_cli").is_dir():
        raise ComfyCliMissing(f"comfy-cli is not in {COMFY_CLI_DIR}: run `make setup` (it installs comfy-cli "
                              f"there with pip --target; needs the network once)")
    env = {**os.environ, "PYTHONPATH": str(COMFY_CLI_DIR), "PYTHONNOUSERSITE": "1"}
    return subprocess.run([sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def packed_files() -> dict[str, bytes]:
    """The tarball's files, as `comfy node pack` makes it (name -> content)."""
    target = REPO_ROOT / "node.zip"
    target.unlink(missing_ok=True)
    try:
        result = comfy("node", "pack")
        if result.returncode or not target.is_file():
            raise RuntimeError(f"comfy node pack failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        with zipfile.ZipFile(target) as archive:
            return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}
    finally:
        target.unlink(missing_ok=True)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def scan_python(source: str) -> list[tuple[int, str]]:
    """(line, what) for each process, environment or network use, eval/exec, hub-reaching load."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in NETWORK_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in NETWORK_MODULES:
                found.append((node.lineno, f"from {node.module} import"))
            if node.module == "os":
                found += [(node.lineno, f"from os import {a.name}") for a in node.names if a.name in OS_CALLS]
        elif isinstance(node, ast.Attribute) and _dotted(node.value) == "os" and node.attr in OS_CALLS:
            found.append((node.lineno, f"os.{node.attr}"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in BUILTIN_CALLS:
                found.append((node.lineno, f"{name}()"))
            elif name.endswith(".from_pretrained") and not (
                    isinstance(keywords.get("local_files_only"), ast.Constant) and keywords["local_files_only"].value):
                found.append((node.lineno, f"{name}() without local_files_only=True"))
            elif name == "torch.load" and not (
                    isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value):
                found.append((node.lineno, "torch.load() without weights_only=True"))
    return sorted(set(found))


def scan_js(source: str) -> list[tuple[int, str]]:
    found = []
    for lineno, line in enumerate(source.splitlines(), 1):
        if line.lstrip().startswith(("//", "*", "/*")):
            continue  # a comment line
        found += [(lineno, what) for pattern, what in JS_PATTERNS.items() if re.search(pattern, line)]
    return found


# Findings in what ships that are there on purpose. Only the training CLI (run by hand, never imported
# when ComfyUI loads the pack) may have any; the runtime code (__init__.py, nodes/, mmig_core/, web/) none.
JUSTIFIED = {
    ("training/__main__.py", "os.environ"):
        "reads RANK, which torchrun/accelerate set for each training process, to log from rank 0 only",
    ("training/distributed.py", "os.environ"):
        "torchrun/accelerate pass WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT only through the environment",
    ("training/convert_llmga.py", "os.environ"):
        "sets HF_HUB_OFFLINE=1 so the converter can never reach the hub",
    ("training/data/__main__.py", "os.environ"):
        "sets HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 so data bootstrapping can never reach the hub",
}
RUNTIME_PREFIXES = ("__init__.py", "nodes/", "mmig_core/", "web/")


def scan_shipped(files: dict[str, bytes]) -> list[str]:
    """Every unjustified finding in the shipped files, as 'path:line: what'."""
    problems = []
    for path, content in sorted(files.items()):
        if path.endswith(".py"):
            findings = scan_python(content.decode("utf-8"))
        elif path.endswith((".js", ".mjs")):
            findings = scan_js(content.decode("utf-8"))
        else:
            continue
        for line, what in findings:
            if (path, what) not in JUSTIFIED:
                problems.append(f"{path}:{line}: {what}")
    return problems
