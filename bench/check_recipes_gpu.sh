#!/usr/bin/env bash
# The shipped paper recipes (tokenizer stages 1 and 2 for SigLIP2-so400m and DINOv2-B, Qwen3-0.6B generation)
# at full model shape on one CUDA GPU, random init, nothing downloaded; one markdown table at the end.
#
#   bash bench/check_recipes_gpu.sh                      # uses .venv/bin/python when present, else python
#   OUT=/tmp/out PYTHON=python3 bash bench/check_recipes_gpu.sh    # also writes $OUT/recipes_gpu.md and logs
#   bash bench/check_recipes_gpu.sh --tiny               # the same pipeline shrunk to a CPU, in a few minutes
#
# Exits 1 when a recipe failed (the table says which), 2 on bad arguments. Flags: bench/check_recipes_gpu.py --help.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
# DeepSpeed JIT-builds its ops once into this cache; the hub is off so that nothing can be fetched
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PY" bench/check_recipes_gpu.py "$@"
