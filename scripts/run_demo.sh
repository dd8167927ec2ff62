#!/usr/bin/env bash
# The whole VQRAE pipeline on the built-in shapes data, on a CPU, with the default demo configs:
# data -> stand-in vision encoder -> tokenizer (stage 1, stage 2) -> unified MLLM -> a generated image and an
# answered question -> a score table. Outputs go to outputs/demo/ and outputs/generated/.
#
#   bash scripts/run_demo.sh               # the demo as documented (about 8 minutes on 2 CPU cores)
#   VQRAE_DEMO_QUICK=1 bash scripts/run_demo.sh   # every step, far fewer training steps (the CI test's run)
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS
step() { printf '\n==> [%ss] %s\n' "$((SECONDS - start))" "$*"; "$@"; }

data=() vfm=() tok1=() tok2=() mllm=() score=()
if [ "${VQRAE_DEMO_QUICK:-0}" = 1 ]; then
  data=(--train 2000 --test 100)
  vfm=(--steps 100)
  tok1=(run.steps=200 run.save_every=200 run.image_every=0 run.log_every=100)
  tok2=(run.steps=20 run.save_every=20 run.image_every=0 run.log_every=10)
  mllm=(run.steps=600 run.save_every=600 optim.warmup_steps=25 run.log_every=50)
  score=(--prompts 32 --question-images 20)
fi

step python scripts/make_demo_data.py "${data[@]}"
python scripts/make_demo_llm.py & llm=$!  # a few seconds of mostly imports, beside the encoder's training
step python scripts/train_standin_vfm.py "${vfm[@]}"
wait "$llm"
step deepspeed --num_gpus 1 --master_port "${VQRAE_DEMO_PORT:-29500}" scripts/train_tokenizer.py --config configs/tokenizer/demo_stage1.yaml "${tok1[@]}"
step deepspeed --num_gpus 1 --master_port "${VQRAE_DEMO_PORT:-29500}" scripts/train_tokenizer.py --config configs/tokenizer/demo_stage2.yaml "${tok2[@]}"
step deepspeed --num_gpus 1 --master_port "${VQRAE_DEMO_PORT:-29500}" scripts/train_mllm.py --config configs/mllm/demo.yaml "${mllm[@]}"
step python scripts/generate.py --prompt "a large red circle in the center on a black background" --num-images 1
step python scripts/generate.py --image data/shapes/test/000000.png --prompt "What colour is the shape?"
step python scripts/score_demo.py "${score[@]}"
printf '\n==> demo finished in %ss\n' "$((SECONDS - start))"
