"""Registry-ready: comfy-cli's own checks pass, pyproject.toml has what the registry shows, and the
tarball `comfy node publish` would upload holds the pack, its training CLI and its example workflows,
and no tests, benchmarks or developer tooling, and no dev-only calls (the registry scan flags them)."""
import re
import tomllib

import pytest

from devtools.paths import REPO_ROOT
from devtools.registry import JUSTIFIED, RUNTIME_PREFIXES, comfy, packed_files, scan_js, scan_python, scan_shipped
from devtools.workflows import EXAMPLES_DIR, example_names

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")


@pytest.fixture(scope="module")
def shipped():
    return packed_files()


def test_comfy_node_validate_passes():
    result = comfy("node", "validate")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # validate only warns about most things (a bad requires-comfyui, a license it cannot read, ruff's
    # exec/eval findings), so a warning counts as a failure here.
    assert "All validation checks passed" in output and "Warning" not in output, output


def test_pyproject_has_what_the_registry_shows():
    project, comfy_table = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert SEMVER.match(project["version"]), project["version"]
    assert comfy_table["PublisherId"] and comfy_table["DisplayName"] == "ComfyUI-MMIG"
    assert comfy_table["Icon"].startswith("https://") and comfy_table["Icon"].endswith("docs/icon.png")
    assert (REPO_ROOT / "docs" / "icon.png").is_file()
    urls = project["urls"]
    for key in ("Repository", "Documentation", "Issues", "Bug Tracker"):
        assert urls[key].startswith("https://"), key
    raw = urls["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/")
    assert comfy_table["Icon"] == f"{raw}/main/docs/icon.png"
    reqs = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    assert sorted(filter(None, reqs)) == sorted(project["dependencies"])


def test_the_tarball_holds_the_pack_and_no_developer_tooling(shipped):
    names = set(shipped)
    for required in ("__init__.py", "pyproject.toml", "README.md", "LICENSE", "requirements.txt",
                     "requirements-training.txt", "training/__main__.py", "nodes/__init__.py", "mmig_core/__init__.py",
                     "web/js/mmig.js", "web/docs/MMIG_BLIP2Caption.md"):  # the frontend extension and node help
        assert required in names, f"{required} missing from the tarball"
    for name in example_names():
        assert {f"example_workflows/{name}.json", f"example_workflows/{name}.jpg"} <= names, name
    assert len(example_names()) == len(list(EXAMPLES_DIR.glob("*.jpg")))
    dev_only = ("tests/", "bench/", "devtools/", "scripts/", ".ci/", "docs/", "Makefile", "requirements-dev.txt")
    leaked = sorted(n for n in names if n.startswith(dev_only))
    assert leaked == [], f"developer files in the tarball: {leaked[:10]}"


def test_what_ships_has_no_process_environment_or_network_use(shipped):
    assert scan_shipped(shipped) == []
    # Only the hand-run training CLI may read the environment; what ComfyUI imports may not.
    assert not [path for path, _ in JUSTIFIED if path.startswith(RUNTIME_PREFIXES)]
    assert all(path in shipped for path, _ in JUSTIFIED), "a justification for a file that no longer ships"


def test_the_scan_finds_what_the_registry_flags():
    source = ("import subprocess\nimport os\nkey = os.environ['K']\nfrom urllib.request import urlopen\n"
              "eval('1')\nimport torch\ntorch.load('x')\ntorch.load('x', weights_only=True)\n"
              "M.from_pretrained('x')\nM.from_pretrained('x', local_files_only=True)\nfrom os import getenv\n")
    assert [what for _, what in scan_python(source)] == [
        "import subprocess", "os.environ", "from urllib.request import", "eval()",
        "torch.load() without weights_only=True", "M.from_pretrained() without local_files_only=True",
        "from os import getenv"]
    js = "// fetch('/x') in a comment\nconst r = await fetch('/x');\napi.fetchApi('/y');\nconst u = 'https://x';\n"
    assert scan_js(js) == [(2, "fetch()"), (4, "a URL")]
    assert scan_shipped({"nodes/x.py": b"import socket\n", "training/__main__.py": b"import os\nos.environ\n"}) \
        == ["nodes/x.py:1: import socket"]
