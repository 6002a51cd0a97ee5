# ComfyUI-MMIG developer commands. Each target runs its own idempotent set-up first.
#   make test                       the whole suite (unit tests and tests against a real ComfyUI server; the
#                                   browser tests skip unless `make browser-setup` has run)
#   make test-browser               the real-browser tests alone (installs Chromium and Playwright first)
#   make screenshots                the browser tests, then their screenshots copied to docs/screenshots/
#   make demo                       the flagship workflow, headless; prints where its outputs went
#   make run WORKFLOW=workflows/<name>.json OUT=<dir> [TINY=1]   (the API twin workflows/api/<name>.api.json)
#   make bench                      every benchmark; results in .cache/bench/<name>.json
#   make bench-real                 the real SD1.5 and SDXL shapes (random weights) at 512 px on the CPU, minutes and
#                                   ~20 GB RAM for SDXL; .cache/bench/real.json (bench/gpu.sh: 1024 px on CUDA, never CI)
#   make test-transformers          the VLM and BLIP-2 tests under the oldest transformers the pack supports and
#                                   4.57 (extra environments in .cache/tf-envs; TF_VERSIONS="..." picks others)
# COMFYUI_PATH=/path/to/ComfyUI makes all of them use that ComfyUI instead of the pinned one.
SHELL := /bin/bash
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup browser-setup test test-browser test-transformers screenshots demo run bench bench-real clean

setup:
	@bash scripts/setup.sh

browser-setup: setup
	@bash scripts/browser_setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-transformers: setup
	@PYTEST_ARGS="$(PYTEST_ARGS)" TF_VERSIONS="$(TF_VERSIONS)" bash scripts/test_transformers.sh

test-browser: browser-setup
	MMIG_REQUIRE_BROWSER=1 $(PY) -m pytest tests/browser $(PYTEST_ARGS)

# The README shows docs/screenshots/: the frontend the host serves (COMFYUI_PATH=<newest ComfyUI> for the new one).
screenshots: browser-setup
	rm -rf .cache/screenshots
	MMIG_REQUIRE_BROWSER=1 $(PY) -m pytest -q tests/browser $(PYTEST_ARGS)
	rm -rf docs/screenshots && mkdir -p docs/screenshots
	cp .cache/screenshots/*/*.png docs/screenshots/
	@ls .cache/screenshots > docs/screenshots/FRONTEND.txt; echo "screenshots: $$(cat docs/screenshots/FRONTEND.txt)"

demo: setup
	$(PY) -m devtools.demo

run: setup
	@test -n "$(WORKFLOW)" -a -n "$(OUT)" || { echo "usage: make run WORKFLOW=workflows/<name>.json OUT=<dir> [TINY=1]"; exit 2; }
	$(PY) -m devtools.run --workflow "$(WORKFLOW)" --out "$(OUT)" $(if $(filter 1 yes true,$(TINY)),--tiny)

bench: setup
	$(PY) -m bench

# Not part of `bench`: writes multi-GB checkpoints under .cache/bench-real/. FAMILIES=sd15 REPEATS=1 to shorten.
bench-real: setup
	MALLOC_MMAP_THRESHOLD_=131072 $(PY) -m bench._real --families $(or $(FAMILIES),sd15,sdxl) --size 512 --repeats $(or $(REPEATS),3) --out .cache/bench/real.json

clean:
	rm -rf .cache/tiny-models .cache/tiny-models-tf .cache/tf-envs .cache/bench out
