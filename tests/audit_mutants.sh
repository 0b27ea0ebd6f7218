#!/usr/bin/env bash
# The hand-written mutants of the mutation audit (issue 12) that mutmut's run does not reach
# (the trainer, the kernel launcher, the metric), each applied alone to the working tree and
# reverted: every one must make its test fail. Run from the repository root:
#   FREM_DATA=../shared/data/drosophila-vnc bash tests/audit_mutants.sh
set -uo pipefail
cd "$(dirname "$0")/.."
survived=0
check() {  # FILE FROM TO PYTEST-ARGS: apply one textual mutant, run the tests, revert
  local file=$1 from=$2 to=$3 tests=$4 saved
  saved=$(mktemp)
  cp "$file" "$saved"
  python3 - "$file" "$from" "$to" <<'PY'
import sys
from pathlib import Path
path, old, new = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
text = path.read_text()
assert old in text, f"{path}: the code to mutate is gone: {old!r}"
path.write_text(text.replace(old, new, 1))
PY
  # shellcheck disable=SC2086
  if OMP_NUM_THREADS=1 python3 -m pytest -x -q -p no:cacheprovider $tests >/dev/null 2>&1; then
    echo "SURVIVED  $file: $from  ->  $to"
    survived=$((survived + 1))
  else
    echo "killed    $file: $from  ->  $to"
  fi
  cp "$saved" "$file"
  rm -f "$saved"
}
check frem/seg/train.py 'if val["miou"] > state["best_val_miou"]:' \
  'if val["miou"] < state["best_val_miou"] or state["best_epoch"] is None:' "tests/test_train.py -k best_checkpoint"
check frem/seg/train.py '        _set_rng_state(saved["rng"], device)' '        pass' "tests/test_train.py -k random_state"
check frem/seg/train.py 'epoch_generator(config.seed, epoch, "order")' 'epoch_generator(config.seed, 0, "order")' \
  "tests/test_train.py -k shuffled"
check kernels/scale_channels.py 'return max(x.numel(), span) > _INT32_LIMIT' 'return x.numel() > _INT32_LIMIT' \
  "tests/test_kernels.py -k 64_bit"
check kernels/scale_channels.py '_INT32_LIMIT = 2**31 - 1' '_INT32_LIMIT = 2**32 - 1' "tests/test_kernels.py -k 64_bit"
check kernels/scale_channels.py '_INT32_LIMIT = 2**31 - 1' '_INT32_LIMIT = 2**30 - 1' "tests/test_kernels.py -k 64_bit"
check kernels/scale_channels.py '    y = x * _broadcast(scale, x)' '    y = x * _broadcast(scale.to(x.dtype), x)' \
  "tests/test_scale_channels.py -k bit_for_bit"
check frem/selection.py 'count = max(1, round(B * num_channels))' 'count = max(1, int(B * num_channels))' \
  "tests/test_module.py -k rounded"
check frem/selection.py '    return chosen.sort().values' '    return chosen' "tests/test_module.py -k sorted"
check frem/seg/metrics.py 'reduction="none", zero_division=math.nan)' \
  'reduction="none", zero_division=math.nan) * 0 + tp / (tp + fp)' "tests/test_metrics.py"
check frem/seg/metrics.py 'present = [v for v in iou.values() if not math.isnan(v)]' \
  'present = [0.0 if math.isnan(v) else v for v in iou.values()]' "tests/test_metrics.py"
check frem/hooks.py '            self.entry = deepest_entry(value)' '            self.entry = (list(value)[-1],) if isinstance(value, dict) else (-1,)' \
  "tests/test_networks.py -k several_maps"
# Code that runs once per process (the op's registration, loading Triton): mutmut ties it to the
# first test that happened to trigger it, so its mutants are checked here against the tests that use it.
check kernels/scale_channels.py '    scale_channels_op.register_autograd(_backward, setup_context=_setup_context)' '    pass' \
  "tests/test_op_autograd.py"
check kernels/scale_channels.py '        _op = _registered()' '        _op = None' "tests/test_op_autograd.py"
check kernels/scale_channels.py '    triton = triton_module
    return True' '    triton = triton_module
    return False' "tests/test_kernels.py"
check kernels/scale_channels.py '    _scale_tiles_kernel = triton_module.jit(_scale_tiles_kernel)' '    pass' "tests/test_kernels.py"
# The Triton kernels' bodies (mutmut's trampolines cannot wrap a kernel Triton compiles from source):
# their numerics are the interpreter's tests; their 64-bit offsets show in the compiled Hopper code.
check kernels/scale_channels.py '        pid_r = pid_r.to(tl.int64)
        pid_k = pid_k.to(tl.int64)' '        pass' "tests/test_kernels.py -k hopper"
check kernels/scale_channels.py 'start = pid.to(tl.int64) * BLOCK' 'start = pid * BLOCK' "tests/test_kernels.py -k hopper"
check kernels/scale_channels.py 's = tl.load(scale_ptr + rows % C, mask=row_ok, other=0.0)[:, None]' \
  's = tl.load(scale_ptr + rows % inner, mask=row_ok, other=0.0)[:, None]' "tests/test_kernels.py"
check kernels/scale_channels.py 'y = x.to(COMPUTE) * s.to(COMPUTE)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)' 'y = x * s.to(x.dtype)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)' "tests/test_kernels.py -k float64_reference"
# Durability: mutmut cannot see a missing fsync.
check frem/seg/checkpoint.py '            os.fsync(f.fileno())' '            pass' "tests/test_evaluation.py -k synced"
check frem/seg/checkpoint.py '        _sync_folder(path.parent)' '        pass' "tests/test_evaluation.py -k synced"
echo "$survived survived"
exit "$survived"
