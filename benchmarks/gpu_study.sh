#!/usr/bin/env bash
# The study trained on a lent GPU (docs/gpu.md "Training the study on a lent GPU"), in stages:
#
#   benchmarks/gpu_study.sh pack [DATA_ZIP]            here: the wheels of benchmarks/gpu_wheels.txt
#                                                      into .gpu/wheels, the data (default
#                                                      data/fer2013.zip) as xz parts into .gpu/data
#   benchmarks/gpu_study.sh setup                      device call 1: install the carried wheels
#                                                      that are missing, check the imports, list
#                                                      the data parts present so far
#   benchmarks/gpu_study.sh train PROFILE BUDGET_S [gpu-train options: --model M, --set K=V,
#                                 --run-dir D]         device call 2: rebuild and verify the data,
#                                                      train within BUDGET_S seconds (counted from
#                                                      this script's start), pack the results
#                                                      into $OUT
#
# Here afterwards: python -m ferlib gpu-merge --profile PROFILE --from FOLDER, then
# make report PROFILE=PROFILE. GPU_DIR (default .gpu) holds everything the stages share;
# PYTHON (default python3) is the interpreter. A CPU dry run of the same stages is
# tests/test_gpu_study.py.
set -euo pipefail
stage=${1:?usage: benchmarks/gpu_study.sh pack|setup|train ...}
shift
gpu=${GPU_DIR:-.gpu}
python=${PYTHON:-python3}
export KERAS_BACKEND=${KERAS_BACKEND:-jax} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 MPLBACKEND=Agg
site="$gpu/site"
export PYTHONPATH="$PWD:$PWD/$site${PYTHONPATH:+:$PYTHONPATH}"
ferlib() { $python -m ferlib "$@"; }

case $stage in
pack)
  mkdir -p "$gpu/wheels"
  pure=$(grep -v -e '^#' -e '# compiled' benchmarks/gpu_wheels.txt)
  compiled=$(grep '^[^#].*# compiled' benchmarks/gpu_wheels.txt | cut -d' ' -f1)
  # shellcheck disable=SC2086
  $python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform any -d "$gpu/wheels" $pure
  for version in 3.11 3.12; do  # either Python there
    # shellcheck disable=SC2086
    $python -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 \
      -d "$gpu/wheels" $compiled
  done
  du -sh "$gpu/wheels"
  ferlib gpu-pack-data "${1:-data/fer2013.zip}" --to "$gpu/data"
  ;;
setup)
  if [ -d "$gpu/wheels" ]; then
    missing=$($python - <<'PY'
from importlib import metadata
for line in open("benchmarks/gpu_wheels.txt"):
    requirement = line.split("#")[0].strip()
    if requirement:
        try:
            metadata.version(requirement.split("==")[0])
        except metadata.PackageNotFoundError:
            print(requirement)
PY
)
    if [ -n "$missing" ]; then
      echo "installing into $site:" $missing
      # shellcheck disable=SC2086
      $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --find-links "$gpu/wheels" --target "$site" $missing
    fi
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  ferlib gpu-check
  ferlib gpu-unpack-data "$gpu/data" --present
  ;;
train)
  profile=${1:?usage: benchmarks/gpu_study.sh train PROFILE BUDGET_SECONDS [options]}
  budget=${2:?usage: benchmarks/gpu_study.sh train PROFILE BUDGET_SECONDS [options]}
  shift 2
  out=${OUT:?OUT: the folder whose files come back}
  mkdir -p "$out"
  data=$(ferlib gpu-unpack-data "$gpu/data" --to "$gpu/dataset" | tail -n 1)
  export FER2013_PATH="$data" FERLIB_CACHE="$gpu/cache"
  left=$((budget - SECONDS))
  status=0
  # timeout: a last resort only (gpu-train stops after the epoch that leaves no room for
  # another); an epoch cut short by it is lost, the epochs before it are committed.
  timeout --signal=INT "$left" $python -m ferlib gpu-train --profile "$profile" \
    --budget-seconds "$left" --session "$gpu/session.json" "$@" 2>&1 \
    | tee "$gpu/train.log" || status=$?
  ferlib gpu-pack-results --session "$gpu/session.json" --log "$gpu/train.log" --out "$out"
  exit "$status"
  ;;
*)
  echo "error: unknown stage $stage; expected pack, setup or train" >&2
  exit 2
  ;;
esac
