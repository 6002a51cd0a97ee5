"""The fixture regenerator reads a reference from a work tree or from a bare git directory (the mirrors' layout)."""
import subprocess

import pytest

from devtools.conformance import reference_commit, reference_tree


@pytest.fixture
def reference(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "arch.py").write_text("WIDTH = 64\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    subprocess.run([*git, "add", "arch.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    bare = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    return work, bare, head


def test_a_bare_git_directory_is_unpacked_and_its_commit_recorded(reference):
    work, bare, head = reference
    with reference_tree(bare) as tree:
        assert (tree / "arch.py").read_text() == "WIDTH = 64\n"
        assert tree != bare
    assert not tree.exists()  # the unpacked copy is temporary
    assert reference_commit(bare) == head == reference_commit(work)


def test_a_work_tree_is_used_as_it_is_and_a_missing_path_is_named(reference, tmp_path):
    work, _, _ = reference
    with reference_tree(work) as tree:
        assert tree == work.resolve()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        with reference_tree(tmp_path / "nowhere"):
            pass
    assert reference_commit(tmp_path) == "unknown"
