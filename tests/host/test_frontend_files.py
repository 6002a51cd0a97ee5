"""What the host serves the frontends from the pack's WEB_DIRECTORY: the extension and every node's help page."""
import urllib.request

import pytest

from devtools.host import PACK_DIR_NAME
from devtools.paths import REPO_ROOT

pytestmark = pytest.mark.host


def fetch(host, path):
    with urllib.request.urlopen(host.url + path, timeout=30) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def test_the_extension_is_listed_and_served(host):
    listed = host.get("/extensions")
    assert f"/extensions/{PACK_DIR_NAME}/js/mmig.js" in listed
    assert not [p for p in listed if p.startswith(f"/extensions/{PACK_DIR_NAME}/") and not p.endswith("mmig.js")]
    status, kind, body = fetch(host, f"/extensions/{PACK_DIR_NAME}/js/mmig.js")
    assert status == 200 and body == (REPO_ROOT / "web" / "js" / "mmig.js").read_bytes()


def test_every_pack_node_has_help_where_the_newer_frontend_looks(host):
    info = host.object_info()
    ids = [k for k in info if k.startswith("MMIG_")]  # the test-only nodes are MMIGTest_*
    assert len(ids) >= 15
    for node_id in ids:
        module = info[node_id].get("python_module")  # newer hosts: the frontend builds the help URL from it
        if module is not None:
            assert module == f"custom_nodes.{PACK_DIR_NAME}", module
        status, kind, body = fetch(host, f"/extensions/{PACK_DIR_NAME}/docs/{node_id}.md")
        # The frontend rejects a text/html answer (its fallback page) as "help not found".
        assert status == 200 and "text/html" not in kind, (node_id, status, kind)
        assert body.decode().startswith(f"# {info[node_id]['display_name']}\n")
