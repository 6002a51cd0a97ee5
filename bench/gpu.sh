#!/usr/bin/env bash
# The real-shape run on a CUDA GPU (issue 18 item 6): SD1.5 and SDXL architectures with seeded random weights, loaded
# through the host's own checkpoint loader, at 1024x1024, in fp16 (the host's choice on CUDA), one sampler step each of
# plain / A-STAR (lean graph and full) / attend_and_excite / Layered Embeddings / MMSM / LoRA merge, with real timings
# (torch.cuda.synchronize) and peak memory (torch.cuda.max_memory_allocated); diffusers' Attend-and-Excite alongside on
# SD1.5. Results: .cache/bench/real-gpu.json. For when a GPU is at hand; never needed by CI (`make bench-real` is the
# CPU run at 512 px).
#   bash bench/gpu.sh                 # both families at 1024 px, 3 repeats
#   SIZE=512 FAMILIES=sd15 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" - <<'PYCHECK'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False); `make bench-real` is the CPU run.")
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PYCHECK
exec "$PY" -m bench._real --families "${FAMILIES:-sd15,sdxl}" --size "${SIZE:-1024}" --repeats "${REPEATS:-3}" \
  --out "${OUT:-.cache/bench/real-gpu.json}"
