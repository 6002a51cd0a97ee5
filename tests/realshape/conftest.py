"""Real-shape fixtures (see realshape_helpers.py): the host's own SD1.5 / SDXL UNets on the meta device."""
from __future__ import annotations

import pytest
from realshape_helpers import RealUNet


@pytest.fixture(scope="session")
def host_modules():
    from devtools import tiny_sdxl
    try:
        tiny_sdxl.import_host()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import comfy.model_detection  # noqa: F401
    import comfy.model_patcher  # noqa: F401


@pytest.fixture(scope="session")
def real_unet(host_modules):
    """real_unet("SD15" | "SDXL") -> RealUNet, built once per session."""
    built = {}

    def get(name: str) -> RealUNet:
        if name not in built:
            built[name] = RealUNet(name)
        return built[name]
    return get
