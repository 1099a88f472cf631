#!/usr/bin/env bash
# The full comparisons of docs/results.md (issue 12), resumable on machines that do not keep their disk.
#
#   bash bench/full_comparison.sh numeric      # or: synthetic
#
# Each comparison takes many hours on two CPU cores, more than one session has. This script:
#   1. restores docs/results/archive/compare-NAME (plan, shared runs, finished runs without weights)
#      into $RUNS/compare-NAME when that folder has no plan.json yet;
#   2. runs the comparison's commands in order (each skips the runs already finished);
#   3. archives the folder back into docs/results/archive/compare-NAME every $EVERY seconds and when
#      the commands end, so that a finished run survives the machine (commit the archive to keep it).
# Precision is the tool's default (auto: bf16 autocast on a CPU with bf16 units, fp32 elsewhere), as users
# run it: pinning fp32 made every run 2.6x dearer in matrix products on a CPU with AVX512-BF16 (160 against
# 419 GFLOP/s, 2-core AMD EPYC, 2026-12-07, `python bench/bf16_weights_probe.py --matmul`). Each run's metrics.jsonl records, per epoch, the precision it
# trained in and the CPU (`epoch` events), so a comparison carried between machines says what computed each arm.
# Environment: RUNS (default runs), EVERY (default 600), PYTHON (default .venv/bin/python), STEPS (the
# compare arguments to run instead of the name's own, one step per ';': bench/paper_protocol.sh orders
# two comparisons' steps this way).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: bash bench/full_comparison.sh numeric|synthetic}
RUNS=${RUNS:-runs}
EVERY=${EVERY:-600}
PYTHON=${PYTHON:-.venv/bin/python}
config=configs/compare-$name.yaml
[ -f "$config" ] || { echo "no $config (numeric or synthetic)" >&2; exit 2; }
out=$RUNS/compare-$name
archive=docs/results/archive/compare-$name
log=$RUNS/compare-$name.log
case $name in
  # lr 5e-5: the best rate of the seed-0 sweep for both sft-diverse and orpo-mixed (docs/results.md)
  # The six variants over three seeds first (the paper's claims are read from them), then the seed-0
  # ablations (lambda 0 and 1, phi 0.25 and 0.75, the batching control orpo-mixed+lambda=0+rows=1).
  numeric) common=("$config" --set train.lr=5e-5 --out "$out" --no-progress)
           steps=("--seeds 1"
                  "--seeds 3"
                  "--seeds 1 --variants sft-diverse,orpo-mixed,orpo-mixed+lambda=0,orpo-mixed+lambda=0+rows=1,orpo-mixed@0.25,orpo-mixed@0.75,orpo-mixed+lambda=1.0") ;;
  # the same rate, chosen on the numeric task's sweep and not tuned here: every arm gets the one rate
  # (at 1e-4, the config's, ORPO lost 14 points on the numeric task and SFT 6; docs/results.md)
  *)       common=("$config" --set train.lr=5e-5 --out "$out" --no-progress)
           steps=("--seeds 3") ;;
esac
if [ -n "${STEPS:-}" ]; then IFS=';' read -r -a steps <<<"$STEPS"; fi
mkdir -p "$RUNS"
if [ ! -f "$out/plan.json" ] && [ -f "$archive/plan.json" ]; then
  echo "restoring $archive into $out"
  mkdir -p "$out" && cp -r "$archive/." "$out/"
fi
save() { "$PYTHON" -m orpo_distill.cli compare "${common[@]}" --archive "$archive" >>"$log" 2>&1 || true; }
( while sleep "$EVERY"; do [ -f "$out/plan.json" ] && save; done ) &
saver=$!
trap 'kill $saver 2>/dev/null || true; [ -f "$out/plan.json" ] && save' EXIT
for step in "${steps[@]}"; do
  # shellcheck disable=SC2086  # a step is several arguments
  "$PYTHON" -m orpo_distill.cli compare "${common[@]}" $step >>"$log" 2>&1
done
"$PYTHON" -m orpo_distill.cli compare "${common[@]}" --table-only >>"$log" 2>&1
echo "finished: $out/comparison.md; archive in $archive"
