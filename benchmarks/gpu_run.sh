#!/usr/bin/env bash
# Run benchmarks/gpu_sd15.py on a lent GPU machine that has no network (the device tool's nvidia-h100-x1 or
# nvidia-h200: Python 3.12, torch, transformers, peft and accelerate installed; diffusers not).
#
# 1. Here, in the repository root, with PyPI reachable: fetch the wheels the GPU machine lacks into .whl/
#    (ignored through .git/info/exclude, so only `carry` sends it).
#        bash benchmarks/gpu_run.sh prepare
#    Optional xformers: it is built against one torch release, so choose the xformers version made for the
#    machine's torch (`python3 -c 'import torch; print(torch.__version__)'` there; 2.11 in 2026-11) and fetch it
#    with XFORMERS=VERSION; its wheel must fit the 64 MiB the working tree may carry. Without it the xformers
#    rows read "not installed".
# 2. Through the device tool: run(command="bash benchmarks/gpu_run.sh run", carry=[".whl"], timeout_s=600).
#    Extra arguments go to gpu_sd15.py (e.g. `run --no_compile`). The JSON and the log come back from $OUT.
set -euo pipefail

WHEELS=.whl
command=${1:-}
shift || true

case "$command" in
prepare)
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx "/$WHEELS/" "$exclude" 2>/dev/null || echo "/$WHEELS/" >>"$exclude"
    diffusers=$(python3 -c 'import diffusers; print(diffusers.__version__)')  # the version the tests pass with
    packages=("diffusers==$diffusers")
    if [[ -n "${XFORMERS:-}" ]]; then
        packages+=("xformers==$XFORMERS")
    fi
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${packages[@]}"
    du -sh "$WHEELS"
    ;;
run)
    [[ -d "$WHEELS" ]] || { echo "no $WHEELS/ here: run 'prepare' first and name $WHEELS in carry" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    # medaug is imported from the checkout (its tokenizer builder); the wheels come before the machine's packages.
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    out=${OUT:-.}
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/nvidia_smi.csv"
    python3 -c 'import torch, diffusers, transformers, peft; print(torch.__version__, diffusers.__version__,
transformers.__version__, peft.__version__)'
    python3 benchmarks/gpu_sd15.py --output "$out/gpu_sd15.json" "$@" 2>&1 | tee "$out/gpu_sd15.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_run.sh prepare | run [gpu_sd15.py arguments]" >&2
    exit 2
    ;;
esac
