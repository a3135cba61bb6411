#!/usr/bin/env bash
# The one script of a GPU session (the device tool's command limit is 10 minutes): build with CUDA,
# GPU tests, the full op tests on CUDA tensors, every benchmark, then the GPU's own count of host
# syncs and compute-sanitizer's memcheck and racecheck (tests/cuda_sanitize.py). Each step has its
# own timeout, capped by what is left of GPU_SH_SECONDS (default 540 s), so a hang or failure in
# one step costs the later steps at most that step's budget. The budgets add up to more than the
# deadline: steps run in order of importance, and if the early ones take their whole budgets the
# last ones are skipped (the summary says which).
#
#   device run (carry [".whl"]):  FASTVQ_GIT_REV=<`git rev-parse HEAD` here> bash bench/gpu.sh
#   then the steps the deadline skipped (the summary names them), on the warm machine if it still
#   is (a fresh one gets the wheels and the build steps added):
#     GPU_SH_ONLY="tests-topk tests-syncs memcheck racecheck" FASTVQ_GIT_REV=... bash bench/gpu.sh
# The exit status is 0 only when every step that ran passed.
# (where the tree arrives without its .git, the records take their commit from FASTVQ_GIT_REV)
#
# .whl/ holds the peers the GPU image lacks, fetched here once (pure-Python wheels, and ninja's):
#   pip download --no-deps -d .whl flash-kmeans==0.3.1 vector-quantize-pytorch==1.32.0 einx==0.4.3 \
#     loguru torch-einops-utils frozendict einops tqdm wheel ninja "nvidia-cuda-sanitizer-api==13.0.*"
# (tqdm: without it flash-kmeans' __init__ quietly swaps its Triton k-means for a torch fallback;
# wheel: pip's editable build needs bdist_wheel, which setuptools < 70.1 lacks without it; ninja:
# without it torch's BuildExtension compiles one file at a time; the sanitizer wheel (14 MB) holds
# compute-sanitizer for CUDA 13.0, for an image whose toolkit lacks it.)
# What comes back in $OUT (the tool returns at most 8 files): log.txt (every step's output, then a
# summary table and the issues' targets, met or not), <op>-<device>.json per benchmark module,
# logs.tar.gz (one log per step).
# Run by hand without $OUT, everything goes to bench/results.
set -uo pipefail
OUT=${OUT:-bench/results}
LOGS=$(mktemp -d)
DEADLINE=${GPU_SH_SECONDS:-540}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # build for the H100 / H200 only
mkdir -p "$OUT"
SUMMARY=()
FAILED=()

# step NAME BUDGET_S COMMAND...: runs COMMAND with a timeout of min(BUDGET_S, time left), output to
# the console and to $LOGS/NAME.log; with under 10 s left the step is not started. With
# GPU_SH_ONLY="NAME ..." (a second call on the still-warm machine, whose install and /tmp/site are
# kept), only the named steps run.
wanted() { [[ -z ${GPU_SH_ONLY:-} || " $GPU_SH_ONLY " == *" $1 "* ]]; }

step() {
  local name=$1 budget=$2 start=$SECONDS rc
  shift 2
  wanted "$name" || return 0
  local left=$((DEADLINE - SECONDS))
  if ((left < 10)); then
    SUMMARY+=("$(printf '%-16s skipped: out of time' "$name")")
    return 1
  fi
  ((budget > left)) && budget=$left
  echo "== $name (timeout ${budget} s)"
  timeout --kill-after=5 "$budget" "$@" 2>&1 | tee "$LOGS/$name.log"
  rc=${PIPESTATUS[0]}
  local verdict="ok"
  ((rc == 124 || rc == 137)) && verdict="TIMEOUT" || { ((rc != 0)) && verdict="FAILED rc=$rc"; }
  ((rc != 0)) && FAILED+=("$name")
  SUMMARY+=("$(printf '%-16s %-14s %4d s' "$name" "$verdict" $((SECONDS - start)))")
  return "$rc"
}

main() {
  [[ -n ${FASTVQ_GIT_REV:-} || -d .git ]] ||
    echo "warning: no .git and no FASTVQ_GIT_REV: the records' commit will read 'unknown'"
  # A second call (GPU_SH_ONLY) that finds a fresh machine (a warm one is given back after a
  # short idle time) installs again first.
  if [[ -n ${GPU_SH_ONLY:-} ]] && ! python3 -c "import fastvq.kernels" 2>/dev/null; then
    echo "fastvq is not installed here: adding the wheels and build steps"
    GPU_SH_ONLY+=" wheels build"
  fi
  step gpu 15 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv
  if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
  fi
  # torch takes CUDA_HOME from the nvcc on PATH: a wrapper script there (as /usr/local/bin/nvcc on
  # the CPU machine) makes it a folder without cuda_runtime.h, and the build fails.
  if [[ -z ${CUDA_HOME:-} && -f /usr/local/cuda/include/cuda_runtime.h ]]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  if ! step build 200 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .; then
    # Without an install fastvq.kernels and fastvq.configs do not import (setup.py maps them from
    # kernels/ and configs/): link them into the package and run from the tree, so that a failed
    # build (of the CUDA sources, or pip's own) does not cost the Triton rows too.
    echo "build failed: running from the tree without the C++ extension"
    ln -sfn ../kernels fastvq/kernels && ln -sfn ../configs fastvq/configs
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  step backends 30 python3 -c "import fastvq; print(fastvq.backends())"
  # Top-k's GPU tests compile many Triton specializations: last, so they never starve the rest.
  step tests-gpu 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests \
    -k "not topk and not sync_only_where_counted"
  # The Triton launcher tests (screening, split-K), which take CUDA tensors wherever CUDA is but
  # carry no gpu marker; not gpu: the cuda-* backend cases are all tests-gpu's (348 of them,
  # which this step ran a second time before).
  step tests-cuda 45 python3 -m pytest -q -p no:cacheprovider tests/ops tests/lattice \
    -m "not gpu" -k "(cuda or triton or screen) and not topk"
  # Benchmarks, most important first; each writes $OUT/<op>-<device>.json as soon as it finishes.
  # nearest: ~105 rows at ~0.2-0.5 s of fixed cost each (the float64 check of 512 sampled rows
  # runs on the GPU: on a host CPU it takes 1-5 s per row at K = 65,536-196,560, which would
  # overrun the step; do_bench's 0.125 s; gc; every row is saved when done)
  # plus four torch.compile builds and the Triton JIT of each shape's specializations (BLOCK_D,
  # EVEN_K, SPLIT, ...): ~90 s, an estimate (no GPU run yet); at 75 s the last shape, the split-K
  # one, would be lost. The build's 200 s are a cap: the whole CUDA build (torch 2.11 + CUDA 13,
  # ninja) took 78 s with 2 jobs on the 2-core CPU machine; here it has 16.
  step bench-nearest 100 python3 -m bench.run --only nearest_code --out "$OUT"
  step bench-codebook 75 python3 -m bench.run --only codebook --out "$OUT"
  step bench-nn 75 python3 -m bench.run --only nn --out "$OUT"
  step bench-lattice 40 python3 -m bench.run --only lattice --out "$OUT"
  step bench-scalar 40 python3 -m bench.run --only scalar --out "$OUT"
  # The recheck share, and the screening bound against the tensor cores' own accumulation.
  step screening 40 python3 -m bench.screening_share --rows 512 --out "$OUT"
  # cuda-* cases and the top-k split-K launcher test (CUDA tensors, no "cuda" in its name)
  step tests-topk 60 python3 -m pytest -q -p no:cacheprovider tests/ops/test_nearest_code_topk.py \
    -k "cuda or triton"
  # The GPU's own count of host syncs per op call and per layer step (set_sync_debug_mode)
  step tests-syncs 45 python3 -m pytest -q -p no:cacheprovider -m gpu tests/nn/test_host_syncs.py \
    -k sync_only_where_counted
  # compute-sanitizer over one small launch of every kernel: out-of-bounds and misaligned
  # accesses (all kernels), shared-memory races (the CUDA C++ ones, which manage their own).
  local sanitizer
  sanitizer=$(command -v compute-sanitizer)
  for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin" /tmp/site/nvidia/cu13/bin; do
    [[ -z $sanitizer && -x $candidate/compute-sanitizer ]] && sanitizer=$candidate/compute-sanitizer
  done
  if [[ -n $sanitizer ]]; then
    step memcheck 60 "$sanitizer" --tool memcheck --error-exitcode 1 \
      python3 tests/cuda_sanitize.py
    step racecheck 60 "$sanitizer" --tool racecheck --error-exitcode 1 \
      python3 tests/cuda_sanitize.py cuda
  elif wanted memcheck || wanted racecheck; then
    SUMMARY+=("memcheck, racecheck skipped: no compute-sanitizer (see the header)")
  fi
  rm -f "$OUT"/*.tmp  # a record a timeout cut mid-write: the tool returns 8 files at most
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  echo "== summary (${SECONDS} s)"
  printf '%s\n' "${SUMMARY[@]}"
  python3 -m bench.run --summary "$OUT"
  python3 -m bench.run --targets "$OUT"
  # The exit status says whether every step passed (the device tool's rc); the summary says which.
  ((${#FAILED[@]} == 0)) || { echo "failed or timed out: ${FAILED[*]}"; return 1; }
}

# A pipeline, not exec > >(tee): the shell waits for tee, so the end of log.txt is never lost.
main 2>&1 | tee "$OUT/log.txt"
