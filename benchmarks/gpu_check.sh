#!/usr/bin/env bash
# A lent GPU's checks in one go, under Keras' JAX backend (the GPU machines have JAX but no
# TensorFlow): the CLI on synthetic faces (train the smoke profile, start it again to see it
# resume with nothing left to do, evaluate two models as an ensemble), then
# benchmarks/bench_gpu.py (per-epoch cost of the full and paper profiles).
#
# Usage: benchmarks/gpu_check.sh OUTDIR [BUDGET_SECONDS]
#   OUTDIR          where the logs and gpu.json go
#   BUDGET_SECONDS  bench_gpu.py starts no case after this many seconds (default 300)
# Wheels in .whl/ (keras, keras-hub and what they need; see README "GPU, JAX and data
# parallelism") are installed into /tmp/site first when keras-hub is missing.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR [BUDGET_SECONDS]}
budget=${2:-300}
mkdir -p "$out"
python=${PYTHON:-python3}
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! $python -c "import keras_hub" 2>/dev/null; then
  $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$python -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)"

work=$(mktemp -d)
$python - "$work/fer2013" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import make_fer_folder
make_fer_folder(Path(sys.argv[1]))
PY
export FER2013_PATH="$work/fer2013" FERLIB_CACHE="$work/cache"
run="$work/run"
{
  start=$SECONDS
  $python -m ferlib train --profile smoke --run-dir "$run"
  echo "smoke training: $((SECONDS - start)) s"
  $python -m ferlib train --profile smoke --run-dir "$run"
  $python -m ferlib evaluate --model "$run/models/alexnet/best.keras" \
    --model "$run/models/vit/best.keras" --data "$FER2013_PATH" --out "$work/ensemble" \
    --bootstrap 200
  $python - "$run" "$work/ensemble" <<'PY'
import json, sys
from pathlib import Path
from ferlib.artifacts import METRICS, Run
for name in ("alexnet", "resnet50v2", "vit"):
    metrics = json.loads(Run(sys.argv[1]).model(name).metrics.read_text())
    print(name, metrics["machine"], "test accuracy", metrics["test"]["accuracy"])
ensemble = json.loads((Path(sys.argv[2]) / METRICS).read_text())
print("ensemble accuracy", ensemble["confidence_intervals"]["accuracy"])
PY
} 2>&1 | tee "$out/cli.log"
$python benchmarks/bench_gpu.py --output "$out/gpu.json" --budget-seconds "$budget" \
  2>&1 | tee "$out/bench_gpu.log"
