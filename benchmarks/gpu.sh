#!/usr/bin/env bash
# The GPU benchmark (issue 25): a plain PyTorch loop against fedsim's inline and batched
# engines on task=sentiment (64 clients per round) and task=math (SmolLM2-135M, 16 clients
# per round); prints a markdown table and writes gpu.md / gpu.json to $OUT if set, else to
# benchmarks/results/. Under 8 minutes on one H100/H200 (a guard stops it at --minutes, 7).
#
#   bash benchmarks/gpu.sh                         # CUDA, full sizes
#   bash benchmarks/gpu.sh --device cpu --tiny     # a CPU check of the whole path
#   bash benchmarks/gpu.sh --minutes 5 task.precision=bfloat16
#
# Python: $PYTHON, else the repository's .venv, else python3 (the device image's).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}" TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
extra=()
bundle=benchmarks/results/bundle   # benchmarks/gpu_bundle.py: for a machine without fedsim's packages
if [[ -d $bundle ]] && ! "$PYTHON" -c "import flwr, hydra" 2>/dev/null; then
  site="${TMPDIR:-/tmp}/fedsim-gpu-site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" \
    "$bundle"/wheels/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
  export FEDSIM_CACHE="${FEDSIM_CACHE:-$site/cache}"
  mkdir -p "$FEDSIM_CACHE" && cp -r "$bundle/cache/." "$FEDSIM_CACHE/"
  extra=(--random-weights "$bundle/models")
  echo "benchmarks/gpu.sh: fedsim's packages from $bundle (models with random weights)"
fi
start=$(date +%s)
"$PYTHON" benchmarks/gpu.py "${extra[@]}" "$@"
echo "benchmarks/gpu.sh: $(( $(date +%s) - start )) s; the table is in the files 'wrote' names above"
