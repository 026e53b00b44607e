#!/usr/bin/env bash
# The one prepared GPU check, sized for one H200 in under 8 minutes (each stage has its own timeout):
#   env        torch/triton versions and the device
#   kernels    the kernel test tier on the GPU (compiled Triton, the CPU interpreter's small odd shapes)
#   kbench     Triton vs reference at the paper's size, fp32 and bf16, and the timing table (bench/kernels.py)
#   tiny       configs/tiny.yaml in fp32 on CUDA: the first 5 losses vs the stored CPU run (1e-3 relative;
#              bench/assets/tiny_cpu_losses.json, written by `python bench/gpu_train.py tiny --device cpu --write ...`)
#   paper      12 x 768, 4K tokens, FwPKM@2,10 + PKM@6, bf16 through megatron (Float16Module + DDP): tokens/s, MFU,
#              peak memory over 20 steps
#   paper_nomem  the same model without memory layers; the summary gives the throughput ratio
#   gdn        one Gated DeltaNet layer at the paper's size: megatron's GatedDeltaNet on fla's kernels vs the
#              export's torch form, fp32 and bf16 differences and fwd+bwd times (bench/gdn.py); runs only
#              where fla-core is installed (pip install '.[gpu]'), else its status records why not
# Every stage runs even when an earlier one failed, and its result is recorded as soon as it ends:
# $OUT/gpu_check/<stage>.log and <stage>.json, merged into $OUT/gpu_check.json after each stage
# ($OUT unset: build/gpu_check). Exit status != 0 if any stage failed.
# Usage: bash bench/gpu_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-.venv/bin/python}}
export TRITON_CACHE_DIR="$PWD/build/triton-cache"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ROOT=${OUT:-$PWD/build}
DIR="$ROOT/gpu_check"
mkdir -p "$TRITON_CACHE_DIR" "$DIR"

merge() {  # all stage results so far -> $ROOT/gpu_check.json (written whole, then renamed)
  "$PY" - "$DIR" "$ROOT/gpu_check.json" <<'EOF' || true
import json, pathlib, sys, os
d, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
res = {}
for f in sorted(d.glob("*.status.json")):
    name = f.name[:-len(".status.json")]
    res[name] = json.loads(f.read_text())
    data = d / f"{name}.json"
    if data.is_file():
        try:
            res[name]["result"] = json.loads(data.read_text())
        except ValueError:
            pass
p, n = res.get("paper", {}).get("result"), res.get("paper_nomem", {}).get("result")
if p and n:
    res["summary"] = {"tokens_per_s_with_memory": p["tokens_per_s"], "tokens_per_s_without": n["tokens_per_s"],
                      "throughput_ratio": p["tokens_per_s"] / n["tokens_per_s"], "mfu_with_memory": p.get("mfu"),
                      "peak_memory_gib_with_memory": p.get("peak_memory_gib")}
tmp = out.with_suffix(".tmp")
tmp.write_text(json.dumps(res, indent=1) + "\n")
os.replace(tmp, out)
EOF
}

status=0
stage() {  # stage NAME SECONDS CMD...: run with a timeout, record rc and wall time, never abort the script
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local start rc
  start=$(date +%s)
  set +e
  timeout --kill-after=10 "$limit" "$@" > "$DIR/$name.log" 2>&1
  rc=$?
  set -e
  tail -n 15 "$DIR/$name.log"
  [ "$rc" -eq 0 ] || status=1
  printf '{"rc": %d, "seconds": %d, "timed_out": %s}\n' "$rc" "$(( $(date +%s) - start ))" \
    "$([ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo true || echo false)" > "$DIR/$name.status.json"
  merge
}

stage env 30 "$PY" -c 'import json, torch, triton; assert torch.cuda.is_available(), "no CUDA device"
print(json.dumps({"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name(),
                  "bf16": torch.cuda.is_bf16_supported()}))'
stage kernels 100 "$PY" -m pytest tests/kernels -q -x -p no:cacheprovider
stage kbench 110 "$PY" bench/kernels.py --preset paper --check --reps 10
stage tiny 60 "$PY" bench/gpu_train.py tiny --json "$DIR/tiny.json"
stage paper 120 "$PY" bench/gpu_train.py paper --steps 20 --json "$DIR/paper.json"
stage paper_nomem 60 "$PY" bench/gpu_train.py paper --no-memory --steps 20 --json "$DIR/paper_nomem.json"
if "$PY" -c 'import fla' > /dev/null 2>&1; then
  stage gdn 120 "$PY" bench/gdn.py --json "$DIR/gdn.json"
else
  echo "== gdn not run: fla-core is not installed (pip install '.[gpu]')"
  printf '{"rc": null, "not_run": "fla-core is not installed"}\n' > "$DIR/gdn.status.json"
  merge
fi
echo "results: $ROOT/gpu_check.json"
exit $status
