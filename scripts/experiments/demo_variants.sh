#!/usr/bin/env bash
# Variants of the built-in demo, each a whole pipeline (stand-in encoder -> tokenizer stages 1 and 2 -> MLLM ->
# scores) in its own folder, all at once: the table of docs/demo_study.md. Meant for a machine with spare cores
# and a GPU (on one H100 with 16 cores, eight at once: the short variants finished in about 5 minutes, the long
# tokenizer ones need more than 8); on a laptop run one variant at a time.
#
#   bash scripts/experiments/demo_variants.sh [OUT_DIR] [VARIANT ...]    # default: every variant, outputs/variants
#
# Each variant is: name | data flags | encoder flags | tokenizer overrides (both stages) | stage-2 overrides |
# MLLM overrides. A variant with data flags draws its own data set and demo LLM (scripts/make_demo_data.py,
# scripts/make_demo_llm.py) in its folder; the others share the demo's, drawn once up front.
# Scores land in OUT_DIR/NAME/score.json and one table per variant in OUT_DIR/summary.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-outputs/variants}; shift || true
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
PY=${PYTHON:-python}

VARIANTS=(
  "defaults|||||"
  "held_out_pairs|--held-out pairs||||"
  "code_rows_mean|||||model.code_init=mean"
  "guidance_2|||||model.sampling.cfg_scale=2.0"
  "mllm_2400|||||run.steps=2400 run.save_every=2400"
  "long_mllm|||||run.steps=4800 run.save_every=4800"
  "codebook_512|||model.quantizer.codebook_size=512||"
  "short_encoder_tokenizer||--steps 700|run.steps=800 run.save_every=800|run.steps=100 run.save_every=100|"
)

one() {  # NAME DATA_FLAGS ENCODER_FLAGS TOKENIZER_OVERRIDES STAGE2_OVERRIDES MLLM_OVERRIDES
  local name=$1 w=$out/$1 data=data/shapes llm=outputs/demo/llm
  mkdir -p "$w"
  if [ -n "$2" ]; then data=$w/data llm=$w/llm; fi
  # shellcheck disable=SC2086  # the flag strings are word lists
  {
    if [ -n "$2" ]; then
      $PY scripts/make_demo_data.py --out "$data" $2 && $PY scripts/make_demo_llm.py --data "$data" --out "$llm"
    fi &&
    $PY scripts/train_standin_vfm.py --out "$w/vfm" $3 &&
    $PY scripts/train_tokenizer.py --config configs/tokenizer/demo_stage1.yaml model.encoder.weights="$w/vfm/model.safetensors" \
      data.source="$data" run.output_dir="$w/tokenizer_stage1" run.image_every=0 $4 &&
    $PY scripts/train_tokenizer.py --config configs/tokenizer/demo_stage2.yaml init_from="$w/tokenizer_stage1/model" \
      data.source="$data" model.encoder.weights="$w/vfm/model.safetensors" run.output_dir="$w/tokenizer" run.image_every=0 $4 $5 &&
    $PY scripts/train_mllm.py --config configs/mllm/demo.yaml model.vqrae="$w/tokenizer/model" model.llm="$llm" \
      data.generation.source="$data" data.understanding.source="$data" run.output_dir="$w/mllm" $6 &&
    $PY scripts/score_demo.py --model "$w/mllm/model" --data "$data" --out "$w/score.json" --grid-dir "$w"
  } > "$w/log" 2>&1 || { echo "$name failed: see $w/log"; return 1; }
  { echo "### $name"; echo; grep "^|" "$w/log" || true; echo; } > "$w/summary.md"
  echo "$name done"
}

$PY scripts/make_demo_data.py
$PY scripts/make_demo_llm.py
mkdir -p "$out"
pids=()
for spec in "${VARIANTS[@]}"; do
  IFS='|' read -r name data enc tok tok2 mllm <<< "$spec"
  if [ $# -gt 0 ] && [[ ! " $* " == *" $name "* ]]; then continue; fi
  one "$name" "$data" "$enc" "$tok" "$tok2" "$mllm" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
cat "$out"/*/summary.md > "$out/summary.md" 2>/dev/null || true
echo "tables in $out/summary.md"
exit $status
