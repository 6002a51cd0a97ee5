"""Shared fixtures: the tiny models and a real ComfyUI server with the pack installed."""
import os

# Before any Hugging Face import: a hub lookup here hangs for minutes instead of failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from devtools.host import HostServer  # noqa: E402
from devtools.tiny_models import TINY_SDXL, ensure_tiny_models  # noqa: E402

TEST_NODES = Path(__file__).parent / "host" / "mmig_test_nodes"


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    return ensure_tiny_models()


@pytest.fixture(scope="session")
def host(tiny_models, tmp_path_factory):
    """A real ComfyUI server on a free loopback port, with the pack, tiny models and test-only nodes."""
    models = tmp_path_factory.mktemp("extra-models")  # tests add broken model folders here
    server = HostServer([tiny_models, models], with_tiny_support=True, extra_custom_nodes=[TEST_NODES])
    server.scratch_models = models
    with server:
        failure = server.pack_import_failure()
        if failure:
            pytest.fail(f"the host failed to import the pack:\n{failure}")
        yield server


@pytest.fixture(scope="session")
def load_tiny_sdxl_in_host(tiny_models):
    """The tiny SDXL through the host's own checkpoint loader, in this process (skips when no host is installed):
    `load_tiny_sdxl_in_host(output_vae=False, output_clip=False, inference_mode=True)` -> (model, clip, vae, _)."""
    import torch

    from devtools import tiny_sdxl
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import comfy.sd
    import devtools.tiny_host_support  # noqa: F401  (teaches the host the tiny SDXL)

    def load(output_vae=False, output_clip=False, inference_mode=True):
        with torch.inference_mode(inference_mode):
            return comfy.sd.load_checkpoint_guess_config(str(tiny_models / TINY_SDXL), output_vae=output_vae,
                                                         output_clip=output_clip, embedding_directory=None)
    return load
