#!/usr/bin/env bash
# Every benchmark on one CUDA GPU, under 8 minutes in all, then one summary table.
#
#   bash bench/run_all_gpu.sh                 # uses .venv/bin/python when present, else python
#   PYTHON=python3 bash bench/run_all_gpu.sh
#
# Each benchmark gets at most its share of the 8 minutes (less if earlier ones ran long); one that fails or
# runs out of time is reported in the table and the others still run. Full logs stay in $LOGS;
# SUMMARY_ONLY=1 LOGS=<dir> prints the table of an earlier run again without running anything.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
LOGS=${LOGS:-$(mktemp -d -t vqrae-bench.XXXXXX)}
BUDGET=450  # seconds for all benchmarks: 8 minutes less a margin for kills, start-up and the summary
START=$SECONDS

run() {  # run NAME CAP_SECONDS ARGS...: the benchmark's output goes to the console and $LOGS/NAME.log
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    echo "skipped: no time left" >"$LOGS/$name.log"
    return
  fi
  echo "== $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=10 "$limit" "$PY" "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || echo "exit status $rc (124: time limit)" >>"$LOGS/$name.log"
}

if [ -z "${SUMMARY_ONLY:-}" ]; then
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
run quantizer_random 60 bench/bench_quantizer.py --device cuda --tokens 16384 --queries random --json "$LOGS/quantizer_random.json"
run quantizer_near 60 bench/bench_quantizer.py --device cuda --tokens 16384 --queries near-codes --json "$LOGS/quantizer_near.json"
run train_step 180 bench/bench_train_step.py --preset vit-l --device cuda --peak-tflops 989 --fused-adam --channels-last --profile \
  --compile --json "$LOGS/train_step.json"
for b in 64 128; do  # the recipe's micro-batch is 32: does a larger one fill the GPU?
  run "train_step_b$b" 40 bench/bench_train_step.py --preset vit-l --device cuda --peak-tflops 989 --batch "$b" \
    --configs full --steps 6 --warmup 2
done
run mllm_step 60 bench/bench_mllm_step.py --device cuda --preset qwen3-0.6b --peak-tflops 989
run tokenize 40 bench/bench_tokenize.py --preset so400m --device cuda --dtype bfloat16 --batch 64
run generate 120 bench/bench_generate.py --preset gpu-1.4b --device cuda --compile --repeats 2
echo
echo "total $((SECONDS - START)) s; logs in $LOGS"
fi
"$PY" - "$LOGS" <<'EOF'
import json, os, sys

logs = sys.argv[1]
rows = []  # (benchmark, case, baseline, ours, speed-up, note)


def load(name):
    path = os.path.join(logs, name + ".json")
    return json.load(open(path)) if os.path.isfile(path) else None


def failed(name):
    lines = open(os.path.join(logs, name + ".log")).read().strip().splitlines()
    return lines[-1] if lines else "no output"


for name in ("quantizer_random", "quantizer_near"):
    res = load(name)
    if res is None:
        rows.append(("nearest code", name, "-", "-", "-", failed(name)))
        continue
    base = res["rows"][0]
    for r in res["rows"][1:]:
        note = f"!= fp32 exact: {r['vs_fp32']}/{res['tokens']}; peak {r['mib']:.0f} vs {base['mib']:.0f} MiB"
        if r["certified"] is not None:
            note += f"; certified {100 * r['certified']:.1f}%"
        case = f"{res['queries']} M={res['tokens']} K={res['codes']} e={res['dim']}: {r['method']}"
        rows.append(("nearest code", case, f"cdist {base['ms']:.2f} ms", f"{r['ms']:.2f} ms", f"{base['ms'] / r['ms']:.2f}x", note))

res = load("train_step")
if res is None:
    rows.append(("train step", "vit-l", "-", "-", "-", failed("train_step")))
else:
    for r in res["rows"]:
        if r["variant"].startswith("plain"):
            base = r
            continue
        mfu = f"MFU {100 * r['mfu']:.1f}% (plain {100 * base['mfu']:.1f}%)" if r["mfu"] is not None else ""
        rows.append(("train step", f"{res['preset']} b={res['batch']} {r['config']}: {r['variant']}",
                     f"{base['img_s']:.1f} img/s", f"{r['img_s']:.1f} img/s", f"{r['img_s'] / base['img_s']:.2f}x", mfu))

table = [l for l in open(os.path.join(logs, "generate.log")).read().splitlines() if l.startswith("|")]
try:
    head = [c.strip() for c in table[0].strip("|").split("|")]
    col = {k: head.index(k) for k in ("workload", "rows", "mode", "HF generate (s)", "ours (s)", "speed-up")}
    for line in table[2:]:
        c = [x.strip() for x in line.strip("|").split("|")]
        rows.append(("generate 256 codes", f"gpu-1.4b {c[col['workload']]} ({c[col['rows']]} rows) {c[col['mode']]}",
                     f"HF {c[col['HF generate (s)']]} s", f"{c[col['ours (s)']]} s", c[col["speed-up"]], ""))
except (IndexError, ValueError):
    rows.append(("generate 256 codes", "gpu-1.4b", "-", "-", "-", failed("generate")))

print("| benchmark | case | baseline | ours | speed-up | note |")
print("|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")

for name in ("train_step_b64", "train_step_b128", "mllm_step", "tokenize"):  # their own tables, as printed
    path = os.path.join(logs, name + ".log")
    lines = open(path).read().splitlines() if os.path.isfile(path) else ["not run"]
    table = [l for l in lines if l.startswith("|")]
    print(f"\n{name}:")
    print("\n".join(table) if table else (lines[-1] if lines else "no output"))
EOF
