#!/usr/bin/env bash
# The GPU runs of `licforge bench kd` (bench/results/lic_kd_*.json), as they were made on one
# lent NVIDIA H200 (16 CPU cores) inside a 10-minute command limit.
#
#   bench/kd_gpu.sh OUT_DIR TAG [TRAIN_BUDGET_S] [bench kd arguments ...]
#
# The machine has PyTorch but neither compressai nor this project's pins (training and float
# eval need no Brevitas): their Python 3.12 wheels travel in .whl/ (compressai has no 3.12 wheel
# on PyPI: built here from its sdist with `python3.12 -m pip wheel --no-deps compressai==1.2.8`).
# Unless STEPS="BASE FT" is set, the step count is sized to TRAIN_BUDGET_S from a calibration:
# WORKERS concurrent training processes of the kind the study runs (teacher and N=64 distilled
# student) time CAL steps; the study's critical path and its load are about 8 fine-tune lengths
# (base = 2 x fine-tune), so FT = budget / (8 s/step).
#   run 1: bench/kd_gpu.sh OUT long 280                      (calibrated to base 800, fine-tune 400)
#   run 2: STEPS="800 400" bench/kd_gpu.sh OUT seeds 0 --widths 16 --seeds 0 1 2 \
#            --lambdas 0.0009 0.0018 0.0035 0.0067
set -uo pipefail
OUT=${1:?usage: bench/kd_gpu.sh OUT_DIR TAG [TRAIN_BUDGET_S] [bench kd arguments ...]}
TAG=${2:?usage: bench/kd_gpu.sh OUT_DIR TAG [TRAIN_BUDGET_S] [bench kd arguments ...]}
BUDGET=${3:-250}
shift $(( $# < 3 ? $# : 3 ))
WORKERS=14 BATCH=16 CROP=128 CAL=150
mkdir -p "$OUT"
t0=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 -c "import torch, compressai, skimage; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'compressai', compressai.__version__, 'skimage', skimage.__version__)" || exit 1
mkdir -p /tmp/cal build/lic/kd/logs
if [ -n "${STEPS:-}" ]; then
  read -r BASE FT <<< "$STEPS"
else
  echo "[$(( $(date +%s) - t0 )) s] calibrating: $WORKERS processes x $CAL steps, batch $BATCH x ${CROP}^2"
  for i in $(seq 1 $WORKERS); do
    if [ "$i" -le 4 ]; then
      cmd=(train --N 128 --M 192 --gdn gdn)
    else
      cmd=(distill --N 64 --gdn gdn1 --kd-recon 1 --teacher models/checkpoints/teacher_n128_photos16k_l0.0130.pt)
    fi
    python3 -m licforge.flows.cli "${cmd[@]}" --steps $CAL --batch $BATCH --crop $CROP --device cuda --out /tmp/cal/m$i.pt >/tmp/cal/m$i.log 2>&1 &
  done
  wait
  read -r FT BASE < <(python3 - "$WORKERS" "$CAL" "$BUDGET" <<'PY'
import sys
from licforge.models.lic import load_weights
w, cal, budget = map(float, sys.argv[1:])
t = max(load_weights(f"/tmp/cal/m{i}.pt")[2]["wall_s"] / cal for i in range(1, int(w) + 1))
ft = max(100, min(20000, int(budget / (8 * t) / 50) * 50))
print(f"calibration: {t * 1000:.1f} ms/step at {int(w)} processes -> fine-tune {ft}, base {2 * ft} steps", file=sys.stderr)
print(ft, 2 * ft)
PY
  )
  cp /tmp/cal/*.log build/lic/kd/logs/
fi
[ -n "${FT:-}" ] || { tail -5 /tmp/cal/m*.log; exit 1; }
echo "[$(( $(date +%s) - t0 )) s] bench kd: base $BASE, fine-tune $FT steps"
python3 -m licforge.flows.cli bench kd --device cuda --workers $WORKERS --base-steps "$BASE" --ft-steps "$FT" \
  --batch $BATCH --crop $CROP --tag "$TAG" --work build/lic/kd --out "$OUT" "$@"
rc=$?
echo "[$(( $(date +%s) - t0 )) s] bench kd exit $rc"
tar czf "$OUT/kd_work.tgz" build/lic/kd/eval build/lic/kd/logs $(ls build/lic/kd/s16_*.pt 2>/dev/null | grep -v state)
exit $rc
