#!/usr/bin/env bash
# The networked GPU check (bench/gpu_check.sh is the offline one, for a bare machine): on a machine with
# an NVIDIA GPU and the network, install the package with vLLM and run, end to end,
#   1. a short teacher + student + training pass (configs/gpu-check.yaml: scripted teacher on the
#      synthetic task, Qwen/Qwen2.5-0.5B-Instruct as the student, mixed-policy refresh, evaluation
#      before and after) with the hf student, then again with the vllm student (initial samples and
#      the refresh from an in-process vLLM engine that receives the trained weights in place);
#   2. generation tokens/s of the hf generator (bf16) against the vllm generator on the same prompts
#      (bench/generate.py --backend vllm);
#   3. with 2 GPUs or more: the same run under `accelerate launch` with configs/accelerate/ddp.yaml on 2.
# Exits non-zero at the first failure. Everything lands in runs/gpu-check/ (logs in runs/gpu-check/logs/).
#
#   bash bench/gpu_vllm_check.sh
#
# Environment: VENV (default .venv; created if missing), PYTHON (the interpreter that creates it,
# default python3), SKIP_INSTALL=1 (use the environment as it is), MODEL (the benchmark's model,
# default Qwen/Qwen2.5-0.5B-Instruct), BENCH_ARGS (extra bench/generate.py options).
# Needs the network for the first install and the Hub model, and a GPU with about 24 GB or more
# (an estimate: the run trains the 0.5B student in full beside a vLLM engine holding 25% of the GPU).
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
BENCH_ARGS=${BENCH_ARGS:-}
CONFIG=configs/gpu-check.yaml
OUT=runs/gpu-check
LOGS=$OUT/logs
PY=$VENV/bin/python

STEP=0
CURRENT="start"
step() {
    STEP=$((STEP + 1))
    CURRENT="$*"
    echo
    echo "==> [$STEP] $*"
}
trap 'rc=$?; echo; echo "GPU CHECK FAILED at step [$STEP] $CURRENT (exit $rc); logs in $LOGS/" >&2; exit $rc' ERR

# Checks one finished run directory: the exported model, the evaluations, the training steps, the
# refresh and which generator made the refreshed samples; prints the figures worth reading.
verify_run() {
    "$PY" - "$1" "$2" <<'PY'
import json, math, sys
from pathlib import Path

run, generator = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
by = lambda event: [r for r in rows if r["event"] == event]
assert (run / "model" / "config.json").is_file(), f"{run}/model/ was not exported"
summary = json.loads((run / "eval" / "summary.json").read_text())
for key in ("eval_epoch_0", "eval_epoch_2"):
    assert key in summary, f"{run}: no {key} in eval/summary.json"
train = by("train")
assert train and all(math.isfinite(r["loss"]) for r in train), f"{run}: no finite training steps"
refresh = by("refresh")
assert refresh and refresh[0]["selected"] > 0, f"{run}: the refresh before epoch 2 selected no question"
refreshed = [json.loads(l) for l in (run / "student" / "epoch_2.jsonl").read_text().splitlines() if l.strip()]
assert refreshed, f"{run}: student/epoch_2.jsonl is empty"
names = {r["generator"] for r in refreshed}
assert all(n.startswith(generator) for n in names), f"{run}: refreshed by {names}, expected {generator}*"
print(f"run: {run}")
for r in by("sampling"):
    print(f"  sampling {r['stage']:<16} {r['new_samples']:>4} samples, {r['tokens_per_second']:.0f} tokens/s, "
          f"{r['failed_requests']} failed requests")
print(f"  refresh: {refresh[0]['selected']} questions selected, {refresh[0]['refreshed']} refreshed, by {sorted(names)}")
rates = sorted(r["tokens_per_s"] for r in train)
print(f"  train: {len(train)} steps, median {rates[len(rates) // 2]:.0f} packed tokens/s, last loss {train[-1]['loss']:.4f}")
for key in ("eval_epoch_0", "eval_epoch_1", "eval_epoch_2"):
    if key in summary:
        s = summary[key]
        print(f"  {key}: accuracy {s['accuracy']:.3f} ({s['correct']}/{s['n']}), parse failures {s['parse_failures']}, "
              f"{s['tokens_per_s']:.0f} tokens/s")
PY
}

step "GPU present"
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this check needs an NVIDIA GPU" >&2; false; }
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader

step "virtual environment $VENV"
if [ ! -x "$PY" ]; then
    "$PYTHON" -m venv "$VENV"
    echo "created $VENV"
else
    echo "using $VENV"
fi

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
    step "install the package with vLLM (vLLM brings a CUDA build of torch)"
    "$PY" -m pip install --upgrade pip
    "$PY" -m pip install -e '.[vllm]'
else
    step "install skipped (SKIP_INSTALL=1)"
fi

step "torch sees the GPU; versions"
"$PY" - <<'PY'
import accelerate, torch, transformers, vllm
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}, vllm {vllm.__version__}")
if not torch.cuda.is_available():
    raise SystemExit("torch has no CUDA here (a CPU build?): reinstall torch with CUDA, or use a fresh VENV=")
print("device 0:", torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported())
PY
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "$GPUS GPU(s) visible to torch"

rm -rf "$OUT"
mkdir -p "$LOGS"

step "run with the hf student: teacher, student, eval, 2 epochs with a refresh, eval ($OUT/hf)"
"$VENV/bin/orpo-distill" run "$CONFIG" --no-progress --set "run_dir=$OUT/hf" 2>&1 | tee "$LOGS/run-hf.log"
verify_run "$OUT/hf" "hf:student@epoch_1" | tee "$LOGS/verify-hf.log"

step "run with the vllm student: samples and refresh from an in-process engine ($OUT/vllm)"
"$VENV/bin/orpo-distill" run "$CONFIG" --no-progress --set "run_dir=$OUT/vllm" --set student.kind=vllm \
    --set student.gpu_memory_utilization=0.25 --set student.max_model_len=1024 2>&1 | tee "$LOGS/run-vllm.log"
verify_run "$OUT/vllm" "vllm:student@epoch_1" | tee "$LOGS/verify-vllm.log"

step "generation tokens/s: hf bf16 against vllm bf16 on the same prompts ($MODEL)"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
"$PY" bench/generate.py --backend vllm --model "$MODEL" --batch-sizes 1,16,64 --max-new-tokens 128 \
    --repeats 3 --markdown $BENCH_ARGS | tee "$LOGS/bench-generate.md"

if [ "$GPUS" -ge 2 ]; then
    step "DDP on 2 GPUs: accelerate launch --config_file configs/accelerate/ddp.yaml ($OUT/ddp)"
    "$VENV/bin/accelerate" launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
        -m orpo_distill.cli run "$CONFIG" --no-progress --set "run_dir=$OUT/ddp" 2>&1 | tee "$LOGS/run-ddp.log"
    verify_run "$OUT/ddp" "hf:student@epoch_1" | tee "$LOGS/verify-ddp.log"
else
    step "DDP skipped: one GPU here"
fi

echo
echo "GPU CHECK PASSED: runs in $OUT/, logs and the benchmark table in $LOGS/"
