#!/usr/bin/env bash
# Everything a GPU session does, in one call (the device tool's command limit is 10 minutes):
# build with CUDA, run the whole test suite on the GPU, run the benchmarks. Logs and JSON go to
# $OUT (the device tool brings that folder back), or to bench/results when run by hand.
#   device run:  bash bench/gpu.sh
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
# Wheels that the GPU image lacks travel in .whl/ (see /work/.library/device/README.md).
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
start=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
python3 -c "import fastvq; print(fastvq.backends())" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/tests.log"
timeout 240 python3 -m bench.run --out "$OUT" 2>&1 | tee "$OUT/bench.log"
timeout 60 python3 -m pytest -q -p no:cacheprovider bench/test_microbench.py \
  --benchmark-json "$OUT/micro.json" 2>&1 | tail -15
