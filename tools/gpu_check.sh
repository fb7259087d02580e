#!/usr/bin/env bash
# The GPU check, in one command, for a machine with a CUDA GPU and a CUDA build of torch:
#
#   tools/gpu_check.sh OUTDIR            # build, CUDA tests, benchmarks; logs and JSON lines in OUTDIR
#   tools/gpu_check.sh --dry-run OUTDIR  # print the steps only (CI runs this)
#
# 1. builds kdcore's CUDA kernels for this GPU (TORCH_CUDA_ARCH_LIST from the device, MAX_JOBS from
#    the core count) and installs a Liger-Kernel wheel found in .whl/ as a benchmark peer;
# 2. runs the CUDA test subset with KDCORE_TEST_DEVICE=cuda (every backend against the float64
#    oracle, the edge cases, in-place gradients, sparse teachers, host synchronizations and CUDA-graph
#    capture, N = 16 384 x V = 262 144 for 64-bit indexing);
# 3. runs benchmarks.kd_loss (every divergence), benchmarks.fused_linear_kd and
#    benchmarks.kd_loss_sparse.
# Each step has its own time limit, under 10 minutes in all (about 7 expected on one H100 / H200).
# A failed step is recorded in OUTDIR/summary.txt and the next one still runs. The exit status is 0
# when every step passed.
set -uo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: tools/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
out="$1"
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
failed=0

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in OUTDIR/NAME.log
step() {
  local name="$1" seconds="$2"
  shift 2
  echo "== $name (limit ${seconds}s): $*"
  if [[ $dry_run -eq 1 ]]; then
    echo "$name: dry run" >>"$summary"
    return 0
  fi
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status in $((SECONDS - start)) s" | tee -a "$summary"
  [[ $status -eq 0 ]] || failed=1
}

if [[ $dry_run -eq 0 ]]; then
  arch="$("$python" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" || {
    echo "gpu_check: no CUDA device visible to $python" >&2
    exit 2
  }
  "$python" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' \
    >"$out/device.txt"
  nvidia-smi >>"$out/device.txt" 2>&1 || true
else
  arch="9.0"
fi
export TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" KDCORE_WITH_CUDA=1

step build 150 "$python" -m pip install --no-build-isolation --no-deps -e .
for wheel in .whl/liger_kernel*.whl; do
  [[ -e "$wheel" ]] && step liger 60 "$python" -m pip install --no-deps "$wheel"
done
step tests 240 env KDCORE_TEST_DEVICE=cuda "$python" -m pytest -q -x -p no:cacheprovider \
  tests/test_kd_loss_values.py tests/test_kd_loss_edges.py tests/test_inplace_grad.py \
  tests/test_sparse_teacher.py tests/test_device_sync.py tests/test_gpu_large.py tests/test_ops.py
step bench_kd_loss 100 "$python" -m benchmarks.kd_loss --divergences all --budget 1
step bench_fused_linear 60 "$python" -m benchmarks.fused_linear_kd --budget 2
step bench_sparse 40 "$python" -m benchmarks.kd_loss_sparse --budget 1

if [[ $dry_run -eq 0 ]]; then
  # the benchmarks' JSON lines, together, for the note and for kdcore/ops/gpu_choice.py
  grep -h '^{' "$out"/bench_*.log >"$out/benchmarks.jsonl" 2>/dev/null || true
fi
echo "gpu_check: $( [[ $failed -eq 0 ]] && echo passed || echo FAILED ) (see $summary)"
exit $failed
