#!/usr/bin/env bash
# The GPU check on a bare accelerator machine: no network, a Python with torch, transformers, accelerate,
# peft, numpy, pyyaml, rich and tqdm but not pydantic, at most 64 MiB carried. It runs bench/gpu_check.py
# (a student of Qwen2.5-0.5B's shape with random weights and the bundled tokenizer; the pipeline on the
# GPU in bf16; the packed train step's pairs/s and MFU against the measured bf16 matmul rate; CPU-vs-GPU
# loss parity) and prints one table. Sized for a few minutes on one GPU (an estimate until it has run).
#
#   bash bench/gpu_check.sh --prepare   # here, once (needs PyPI): .gpukit/ = the wheels the GPU machine lacks
#                                       # (pydantic and its three dependencies, cp312 manylinux) and the tokenizer
#   bash bench/gpu_check.sh             # on the GPU machine, with .gpukit carried: wheels installed into
#                                       # /tmp/gpu-check-site (nothing else touched), then the check
#   bash bench/gpu_check.sh --cpu       # here: the same script on the CPU with a tiny student (seconds; the
#                                       # path check that tests/test_bench_smoke.py runs)
#
# Environment: PYTHON (default python3; --prepare prefers .venv/bin/python, whose pip downloads), KIT
# (default .gpukit). Other options go to bench/gpu_check.py (--steps, --out, --shape). Exit 1: a check failed.
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
KIT=${KIT:-.gpukit}
PY=${PYTHON:-python3}
NEEDED="pydantic pydantic-core annotated-types typing-inspection"  # what the GPU machine's Python lacks

case "${1:-}" in
--prepare)
    [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
    # the versions this checkout is tested with
    pins=$("$PY" -c "import sys; from importlib.metadata import version; print(' '.join(f'{n}=={version(n)}' for n in sys.argv[1:]))" $NEEDED)
    rm -rf "$KIT/wheels" "$KIT/tokenizer"
    mkdir -p "$KIT/wheels"
    # shellcheck disable=SC2086  # pins is a list
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$KIT/wheels" $pins
    PYTHONPATH=src "$PY" -c "import sys; from orpo_distill.models import load_tokenizer; load_tokenizer('builtin:smollm2-135m-instruct').save_pretrained(sys.argv[1])" "$KIT/tokenizer"
    ls "$KIT/wheels"
    du -sh "$KIT"
    exit 0
    ;;
--cpu)
    exec "$PY" bench/gpu_check.py "$@"
    ;;
esac

if [ -d "$KIT/wheels" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site "$KIT"/wheels/*.whl
    export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
tokenizer=()
[ -d "$KIT/tokenizer" ] && tokenizer=(--tokenizer "$KIT/tokenizer")
exec "$PY" bench/gpu_check.py "${tokenizer[@]}" "$@"
