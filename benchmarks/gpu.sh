#!/usr/bin/env bash
# The GPU run: what a short GPU lease must yield, in slices that each end well
# inside the device tool's 10 minutes a command. Runs on CPU too (small sizes,
# FREM_GPU_SMALL=1), which is how CI proves it works.
#
#   benchmarks/gpu.sh SLICE...      SLICE: tests ops overhead epoch reproduce (or all)
#
# Environment:
#   OUT        where results go (default runs/gpu); the device tool brings $OUT back
#   FREM_DATA  the Drosophila data (on the GPU machine: a copy carried with the call)
#   WHEELS     wheels of what the GPU image lacks (default .whl; see benchmarks/gpu_wheels.sh)
#   FREM_GPU_SMALL=1   CI-sized: a subset of every slice
#   REPRO_ARGS extra `frem reproduce` options (default: 1 seed, 200 epochs, no search)
#   REPRO_S    seconds the reproduction slice may run before it stops, resumable (default 480)
#   REPRO_OUT  where the reproduction's runs live (default reproduction/gpu; CPU-sized:
#              reproduction/gpu-small, so the two protocols never share a folder)
#
# On the GPU (device tool), with the wheels and the data carried:
#   OUT=$OUT FREM_DATA=.data/drosophila-vnc bash benchmarks/gpu.sh tests ops
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
SMALL=${FREM_GPU_SMALL:-0}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

setup() {
  # The GPU image has torch, triton, timm, lightning, hypothesis and pytest-benchmark,
  # but not smp, optuna (with sqlalchemy, alembic, ...), monai or nnU-Net's networks.
  if ! python3 -c "import segmentation_models_pytorch, optuna, monai" 2>/dev/null \
      && compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/frem-site "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/frem-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! python3 -c "import frem.kernels" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/frem-site .
    export PYTHONPATH=/tmp/frem-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 - <<'EOF' | tee "$OUT/device.txt"
import torch, triton, frem
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(f"device {name}; torch {torch.__version__}; triton {triton.__version__}; frem {frem.__version__}")
EOF
}

bench() {  # bench NAME FILE [pytest args...]
  local name=$1 file=$2; shift 2
  python3 -m pytest "benchmarks/$file" --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log"
  python3 benchmarks/report.py "$OUT/$name.json" > "$OUT/$name.md"
}

slice_tests() {
  # CPU-sized: the suite runs these already; one opcheck case shows the slice works.
  if [ "$SMALL" = 1 ]; then set -- -k "cuda or (opcheck and float32-4d-channels_last)"; fi
  python3 -m pytest -q -p no:cacheprovider -x "$@" 2>&1 | tee "$OUT/tests.log"
}

slice_ops() {
  if [ "$SMALL" = 1 ]; then set -- -k "copy_bandwidth or (16x512x8x8 and fp32 and nchw and forward-)"; fi
  bench ops test_scale_channels.py "$@"
}

slice_overhead() {
  bench overhead test_overhead.py
}

slice_epoch() {
  bench epoch test_throughput.py
}

slice_reproduce() {
  local args=${REPRO_ARGS:---seeds 1 --epochs 200 --tune-trials 0}
  local runs=${REPRO_OUT:-reproduction/gpu}
  if [ "$SMALL" = 1 ]; then
    args="--quick --seeds 1 --epochs 1 --tiles-per-section 2 --batch-size 2 --tune-trials 0"
    runs=${REPRO_OUT:-reproduction/gpu-small}
  fi
  # Finished runs come back as metrics.json (checkpoints are too large to bring back);
  # results/gpu/runs keeps them, so the next lease skips what is done.
  mkdir -p "$runs/runs"
  if [ "$SMALL" != 1 ] && [ -d results/gpu/runs ]; then cp -rn results/gpu/runs/. "$runs/runs/"; fi
  local status=0
  # shellcheck disable=SC2086
  timeout "${REPRO_S:-480}" python3 -m frem reproduce $args --no-progress --out "$runs" \
    --results "$OUT/reproduction" 2>&1 | tee "$OUT/reproduce.log" || status=$?
  tar czf "$OUT/reproduction-runs.tar.gz" --exclude='*.pt' -C "$runs" runs
  if [ "$status" = 124 ]; then echo "reproduce: stopped at ${REPRO_S:-480} s; run the slice again to go on"; fi
}

setup
slices=("$@")
if [ "${#slices[@]}" = 0 ] || [ "${slices[0]}" = all ]; then slices=(tests ops overhead epoch reproduce); fi
for s in "${slices[@]}"; do
  echo "== $s"
  "slice_$s"
done
