#!/usr/bin/env bash
# make test-transformers: the VLM and BLIP-2 tests under each transformers release the pack claims, each in an
# extra environment (scripts/tf_env.sh: transformers and its tokenizers / huggingface_hub first on PYTHONPATH,
# .venv's torch) with tiny models that release built itself (.cache/tiny-models-tf/VERSION).
#   TF_VERSIONS="4.46.1 4.57.6"   the releases (default: the floor, mmig_core/hf_compat.py MIN_TRANSFORMERS,
#                                 and 4.57.6, the last 4.x); the newest 5.x is .venv's own, which `make test` runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
FLOOR=$(.venv/bin/python -c "from mmig_core.hf_compat import MIN_TRANSFORMERS; print(MIN_TRANSFORMERS)")
VERSIONS=${TF_VERSIONS:-"$FLOOR 4.57.6"}
# The modules that load Idefics2 or BLIP-2, and the VLM families: their unit cases (test_vlm_core.py, the builders
# read back by plain transformers) and a reduced host set, in ONE server: load + describe (with history, an IMAGE
# batch) and encode (two images + a text-only prompt) per family; the resolution/odd-size/error host cases run at
# 5.x only (make test). A family whose model_type is newer than the release is skipped, and its clear "needs
# transformers >= X" error is tested instead (FAMILY_MIN_TRANSFORMERS). MMIG_FAMILY_TABLE=path writes the table.
HOST_FAMILIES=tests/host/test_vlm_families.py
TESTS=(tests/unit/test_hf_compat.py tests/unit/test_vlm_core.py tests/unit/test_blip2_core.py
       tests/unit/test_tiny_vlm_families.py
       tests/host/test_encoder_nodes.py tests/host/test_blip2_nodes.py
       "$HOST_FAMILIES::test_family_loads_describes_with_history_and_batches"
       "$HOST_FAMILIES::test_family_encodes_an_interleaved_prompt_batched_with_a_text_only_one"
       "$HOST_FAMILIES::test_zz_measured_family_table")
newest=$(.venv/bin/python -c "from importlib.metadata import version; print(version('transformers'))")
echo "test-transformers: .venv has transformers $newest (run by make test); here: $VERSIONS"
failed=()
for version in $VERSIONS; do
  start=$(date +%s)
  env_dir=$(bash scripts/tf_env.sh "$version")
  echo "test-transformers: transformers $version"
  table=${MMIG_FAMILY_TABLE:+${MMIG_FAMILY_TABLE%.md}-$version.md}  # one family table per release
  if PYTHONPATH="$env_dir${PYTHONPATH:+:$PYTHONPATH}" MMIG_TINY_MODELS_DIR="$PWD/.cache/tiny-models-tf/$version" \
      MMIG_FAMILY_TABLE="$table" \
      .venv/bin/python -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} "${TESTS[@]}"; then
    echo "test-transformers: transformers $version passed in $(( $(date +%s) - start )) s"
  else
    echo "test-transformers: transformers $version FAILED (after $(( $(date +%s) - start )) s)"
    failed+=("$version")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then echo "test-transformers: failed under transformers ${failed[*]}"; exit 1; fi
