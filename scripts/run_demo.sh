#!/usr/bin/env bash
# The whole VQRAE pipeline on the built-in shapes data, on a CPU, with the default demo configs:
# data -> stand-in vision encoder -> tokenizer (stage 1, stage 2) -> unified MLLM -> a generated image and an
# answered question -> a score table. Outputs go to outputs/demo/ and outputs/generated/.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS
step() { printf '\n==> [%ss] %s\n' "$((SECONDS - start))" "$*"; "$@"; }

step python scripts/make_demo_data.py
step python scripts/train_standin_vfm.py
step python scripts/make_demo_llm.py
step deepspeed --num_gpus 1 scripts/train_tokenizer.py --config configs/tokenizer/demo_stage1.yaml
step deepspeed --num_gpus 1 scripts/train_tokenizer.py --config configs/tokenizer/demo_stage2.yaml
step deepspeed --num_gpus 1 scripts/train_mllm.py --config configs/mllm/demo.yaml
step python scripts/generate.py --prompt "a large red circle in the center on a black background" --num-images 4
step python scripts/generate.py --image data/shapes/test/000000.png --prompt "What colour is the shape?"
step python scripts/score_demo.py
printf '\n==> demo finished in %ss\n' "$((SECONDS - start))"
