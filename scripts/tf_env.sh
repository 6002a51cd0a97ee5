#!/usr/bin/env bash
# An extra transformers for the pack's tests, without a second torch: transformers VERSION and the exact
# tokenizers / huggingface_hub it needs, installed --no-deps into .cache/tf-envs/VERSION (everything else comes
# from .venv). Put the printed folder first on PYTHONPATH. Idempotent: a second run prints the folder at once.
#   bash scripts/tf_env.sh 4.57.6
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/tf_env.sh TRANSFORMERS_VERSION (e.g. 4.57.6)}
ENV_DIR=$PWD/.cache/tf-envs/$VERSION
PIP=".venv/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The companions each release's metadata asks for (Requires-Dist), pinned to the newest that fits.
case "$VERSION" in
  4.46.*)                                   TOKENIZERS=0.20.3; HUB=0.36.2 ;;
  4.47.* | 4.48.* | 4.49.* | 4.5[0-5].*)    TOKENIZERS=0.21.4; HUB=0.36.2 ;;
  4.56.* | 4.57.*)                          TOKENIZERS=0.22.1; HUB=0.36.2 ;;
  *) echo "tf_env: no companion versions known for transformers $VERSION (the pack supports 4.46 and newer;" \
          "5.x is .venv's own): add them to scripts/tf_env.sh" >&2; exit 2 ;;
esac
PACKAGES="transformers==$VERSION tokenizers==$TOKENIZERS huggingface_hub==$HUB"
STAMP=$ENV_DIR/.mmig-tf-env
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PACKAGES" ]; then echo "$ENV_DIR"; exit 0; fi
rm -rf "$ENV_DIR" "$ENV_DIR.partial"
echo "tf_env: installing $PACKAGES into $ENV_DIR" >&2
# --target with --no-deps: torch, numpy, safetensors ... stay .venv's; only these three are shadowed.
$PIP install -q --no-deps --target "$ENV_DIR.partial" $PACKAGES >&2
PYTHONPATH="$ENV_DIR.partial" .venv/bin/python -c "
import transformers, tokenizers, huggingface_hub
assert transformers.__version__ == '$VERSION', transformers.__file__" >&2
echo "$PACKAGES" > "$ENV_DIR.partial/.mmig-tf-env"
mv "$ENV_DIR.partial" "$ENV_DIR"
echo "$ENV_DIR"
