#!/usr/bin/env bash
# The GPU figures the README lists as pending, in one run on a lent H100/H200 machine (no registry there).
#
#   here, once (needs the package registry):  bash .ci/device_bench.sh fetch
#       -> .ci/wheels/ (git-excluded, ~52 MB): the project's packages that machine's image lacks, for its
#          Python 3.12 (it has torch, timm, typer, tqdm, h5py, scipy, matplotlib, tensorboard, pillow)
#   there (the device tool's `run`, carry [".ci/wheels"], timeout ~540 s):  bash .ci/device_bench.sh run
#       -> $OUT/gpu_bench.json (written after every section), gpu_bench.log, gpu_tests.log, nvidia-smi.txt,
#          preflight.log, build.log
#
# BUDGET (seconds, default 300) bounds the optional measurements (compiled steps, largest batch, extraction
# end to end); the core figures come first and are kept even if the run is cut short.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.ci/wheels
PACKAGES=(decord "zarr>=3.1,<3.2" numcodecs donfig dask distributed google-crc32c fastcrc av
          tblib zict tornado partd locket)

case "${1:-}" in
fetch)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
        -d "$WHEELS" "${PACKAGES[@]}"
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
    du -sh "$WHEELS"
    ;;
run)
    out=${OUT:-/tmp/device-out}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
    # preflight, in the log: the project imports, and Triton can compile (it needs a C compiler and Python.h)
    python3 -c "import pipeline.cli, torch; print('torch', torch.__version__, torch.cuda.get_device_name(0)); \
print('compile ok', torch.compile(lambda x: x + 1)(torch.ones(1, device='cuda')).item())" 2>&1 \
        | tee "$out/preflight.log" || true
    python3 -m pipeline.cli bench --gpu --episodes 2 --budget "${BUDGET:-300}" --out "$out/gpu_bench.json" \
        2>&1 | tee "$out/gpu_bench.log" || true
    python3 -m pytest -q -p no:cacheprovider tests/stages/models/test_predictor.py tests/stages/test_planning.py \
        -k "cuda or flex or host" 2>&1 | tee "$out/gpu_tests.log"
    ;;
*)
    echo "usage: bash .ci/device_bench.sh fetch|run" >&2
    exit 2
    ;;
esac
