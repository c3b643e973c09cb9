#!/usr/bin/env bash
# The CUDA checks in one run, for a machine with one NVIDIA GPU (6-9 minutes on an H200, most of it
# torch.compile of the low-level branch; SKIP below shortens a rerun):
#   env.txt      the GPU, driver, torch and CUDA versions
#   pytest.txt   the tests that need CUDA or torch.compile (they skip without a GPU), then the whole suite
#   bench.txt    scripts/bench.py: our ViT-S/8 beside timm's, the low-level branch (eager and torch.compile), one
#                training step split into its parts, the dense CRF, k-means; then a profile of one step
#   parity.txt   scripts/timm_parity.py: every backbone against timm with the same random weights, float32
#   train.txt    the default `python il2vseg.py --train` (synthetic, random weights) with its img/s, and the
#                GPU utilisation sampled every 200 ms while it ran
# Everything goes to $OUT (default ./gpu_check). Each step has its own time limit; a failing step does not
# stop the others. timm is needed by parity.txt and the timm row of bench.txt only.
#
#     bash scripts/gpu_check.sh
#     SKIP="parity suite" bash scripts/gpu_check.sh   # a rerun without the parity table and the whole suite
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import timm; print('timm', timm.__version__)"; } > "$OUT/env.txt" 2>&1

{ timeout 200 $PY -m pytest -q -p no:cacheprovider -rs -k "cuda or compile" tests; echo "exit $?"; } > "$OUT/pytest.txt" 2>&1

CAMVID=${CAMVID:-gpu_data}  # a folder with a 480x360 CamVid frame for the CRF rows, if there is one
{ timeout 200 $PY scripts/bench.py --profile $([ -d "$CAMVID" ] && echo --camvid "$CAMVID"); echo "exit $?"; } > "$OUT/bench.txt" 2>&1

skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
skip parity || { timeout 90 $PY scripts/timm_parity.py; echo "exit $?"; } > "$OUT/parity.txt" 2>&1

nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/util.csv" 2>&1 &
SAMPLER=$!
RUN=$(mktemp -d)
START=$SECONDS
{ timeout 150 $PY il2vseg.py --train --weights random --out "$RUN"; echo "exit $? after $((SECONDS - START)) s"; } > "$OUT/train.txt" 2>&1
kill "$SAMPLER" 2>/dev/null
$PY - "$OUT/util.csv" >> "$OUT/train.txt" 2>&1 <<'PYEOF'
import sys
rows = [line.split(",") for line in open(sys.argv[1]) if line.strip() and line.split(",")[0].strip().isdigit()]
util = [int(r[0]) for r in rows]
busy = [u for u in util if u > 0]
if util:
    print(f"GPU utilisation over the whole run ({len(util)} samples, 200 ms apart): mean {sum(util) / len(util):.0f}%; "
          f"while busy (> 0%): mean {sum(busy) / max(len(busy), 1):.0f}% over {len(busy)} samples; "
          f"memory used at most {max(int(r[1]) for r in rows)} MiB")
PYEOF

skip suite || { timeout 120 $PY -m pytest -q -p no:cacheprovider; echo "exit $?"; } >> "$OUT/pytest.txt" 2>&1
echo "done $(date -u)" >> "$OUT/env.txt"
