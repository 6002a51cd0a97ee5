"""Developer tooling shared by tests, `make demo`, `make run` and `make bench`.

Not part of the pack that ComfyUI loads: the pack's `__init__.py` never imports it.
"""
