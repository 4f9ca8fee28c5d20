#!/usr/bin/env bash
# The GPU check of issue 17, in one call (about 8 minutes on one H100/H200): every part writes under
# $OUT (at most 8 files), a part that fails or runs out of its time does not stop the others, and
# summary.json says which part passed.
#
#   1. tests:  tests/test_ndc_triton.py and tests/test_checkpointing.py on the GPU (compiled kernels)
#   2. train:  benchmarks/train.py, every 3D model at the BraTS'23 and ISLES'22 presets (paper roi and
#              batch), fp32 and bf16-mixed, Deconver also with checkpointing; Deconver profiled
#   3. ndc:    benchmarks/ndc.py, the NDC layer at stage 0 (128^3), inline and split backward, profiled
#   4. smoke:  the smoke study (.test/config/config.yaml) end to end with `accelerator: gpu`, report
#              rendered (report folder packed as smoke_report.tar.gz)
#
# Usage (from the repository root):  OUT=/some/folder bash benchmarks/gpu_check.sh
#   GPU_CHECK_PARTS="tests train ndc smoke"   the parts to run, in this order (default: all)
#   GPU_CHECK_BUDGET=470                      seconds for the whole script; each part gets its share
#   GPU_CHECK_TINY=1                          CPU rehearsal: tiny sizes, no GPU needed (docs/engine.md)
set -u
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; fi
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python}
PARTS=${GPU_CHECK_PARTS:-tests train ndc smoke}
BUDGET=${GPU_CHECK_BUDGET:-470}
TINY=${GPU_CHECK_TINY:-0}
START=$(date +%s)
LOG="$OUT/logs.txt"
: > "$LOG"
declare -A STATUS SECONDS_OF

if [ "$TINY" = 1 ]; then
  DEVICE=cpu
  export TRITON_INTERPRET=1  # the kernels run in Triton's interpreter
  TEST_ARGS=(tests/test_checkpointing.py "tests/test_ndc_triton.py::test_layer_on_fused_path_matches_reference")
  TRAIN_ARGS=(--models unet --presets hippocampus --steps 1 --threads 1
              --variant unet:checkpointing=true --precisions 32,bf16-mixed --profile)
  NDC_ARGS=(--quick --device cpu --only layer --stages 1 --threads 1)
  SMOKE_ACCELERATOR=cpu
  SMOKE_SHRINK='{"datasets": ["isles22"], "models": ["deconver"]}'
else
  DEVICE=cuda
  # (the sm_90 compile-only test is left out: here the kernels are compiled and run for real)
  TEST_ARGS=(tests/test_ndc_triton.py tests/test_checkpointing.py -k "not compiles_for_sm90")
  TRAIN_ARGS=(--presets brats23,isles22 --steps 3 --batch-size preset --in-process --precisions 32,bf16-mixed
              --variant deconver:checkpointing=true --variant swin_unetr:checkpointing=true --profile deconver)
  NDC_ARGS=(--device cuda --only layer --stages 1 --profile --lean-variant split:DECONVER_NDC_BACKWARD=split)
  SMOKE_ACCELERATOR=gpu
  SMOKE_SHRINK='{}'
fi

# share of the remaining budget each part may use (the rest is kept for the parts after it)
declare -A SHARE=([tests]=0.2 [train]=0.5 [ndc]=0.4 [smoke]=1.0)

run_part() {  # run_part NAME COMMAND...: log, time limit, status
  local name=$1; shift
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit
  limit=$("$PY" -c "print(max(10, int($left * ${SHARE[$name]})))")
  if [ "$left" -lt 15 ]; then STATUS[$name]="skipped: no time left"; return; fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" >> "$LOG"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  SECONDS_OF[$name]=$(($(date +%s) - t0))
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="timeout after ${limit}s" ;;
    *) STATUS[$name]="failed (rc $rc)" ;;
  esac
  echo "=== $name: ${STATUS[$name]} in ${SECONDS_OF[$name]}s" >> "$LOG"
}

{
  date -u; uname -a; nproc; free -g
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
        'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  git rev-parse HEAD
} > "$OUT/env.txt" 2>&1

smoke() {  # the smoke study in a fresh folder, accelerator and complexity device switched
  local work
  work=$(mktemp -d)
  "$PY" - "$work" "$SMOKE_ACCELERATOR" "$SMOKE_SHRINK" <<'EOF' || return 1
import json, sys
from pathlib import Path
import yaml
work, accelerator, shrink = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
cfg = yaml.safe_load(Path(".test/config/config.yaml").read_text())
cfg["trainer"]["accelerator"] = accelerator
cfg["complexity"]["device"] = "cuda" if accelerator == "gpu" else "cpu"
if "datasets" in shrink:
    cfg["datasets"] = {k: v for k, v in cfg["datasets"].items() if k in shrink["datasets"]}
if "models" in shrink:
    cfg["models"] = shrink["models"]
(work / "study.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
EOF
  "$PY" -m snakemake --snakefile "$PWD/Snakefile" --directory "$work" --configfile "$work/study.yaml" \
    --cores "$(nproc)" || return 1
  test -s "$work/reports/smoke/report.html" || { echo "no report.html"; return 1; }
  tar -czf "$OUT/smoke_report.tar.gz" -C "$work/reports" smoke || return 1
  "$PY" - "$work" <<'EOF'
import csv, sys
from pathlib import Path
work = Path(sys.argv[1])
for log in sorted(work.glob("results/smoke/runs/*/*/fold*/train_log.csv")):
    rows = list(csv.DictReader(log.open()))
    last = rows[-1] if rows else {}
    print(log.parent.relative_to(work), {k: last.get(k) for k in ("val_dice", "seconds_per_step", "peak_memory_mb")})
EOF
}

for part in $PARTS; do
  case $part in
    tests) run_part tests "$PY" -m pytest -q -x -p no:cacheprovider "${TEST_ARGS[@]}" ;;
    train) run_part train "$PY" benchmarks/train.py --device "$DEVICE" "${TRAIN_ARGS[@]}" \
             --out "$OUT/train_$DEVICE.json" ;;
    ndc) run_part ndc "$PY" benchmarks/ndc.py "${NDC_ARGS[@]}" --out "$OUT/ndc_$DEVICE.json" ;;
    smoke) run_part smoke smoke ;;
    *) STATUS[$part]="unknown part (expected tests, train, ndc, smoke)" ;;
  esac
done

"$PY" - "$OUT/summary.json" "$(($(date +%s) - START))" <<EOF
import json, sys
status = {$(for k in "${!STATUS[@]}"; do printf '"%s": "%s", ' "$k" "${STATUS[$k]}"; done)}
seconds = {$(for k in "${!SECONDS_OF[@]}"; do printf '"%s": %s, ' "$k" "${SECONDS_OF[$k]}"; done)}
json.dump({"parts": status, "seconds": seconds, "total_seconds": int(sys.argv[2]), "tiny": "$TINY" == "1",
           "all_ok": all(v == "ok" for v in status.values())}, open(sys.argv[1], "w"), indent=2)
print(json.dumps(status, indent=2))
EOF
ls -la "$OUT"
