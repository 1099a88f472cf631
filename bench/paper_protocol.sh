#!/usr/bin/env bash
# The paper's own protocol on both built-in tasks (issue 32; configs/compare-paper-*.yaml), in the order
# the reading needs it: every arm with one seed on the synthetic task, then on the numeric task, then
# seeds 1 and 2 of sft-diverse and the three student-negative ORPO arms on the synthetic task, then the
# lambda-0 control of orpo-mixed (seed 0). Many hours on two CPU cores: each step resumes from the archive
# in docs/results/archive/compare-paper-NAME (commit it to carry a comparison to the next machine).
#
#   bash bench/paper_protocol.sh                 # RUNS, EVERY, PYTHON as for bench/full_comparison.sh
set -euo pipefail
cd "$(dirname "$0")/.."
arms=sft-diverse,orpo-off,orpo-on,orpo-mixed
STEPS="--seeds 1" bash bench/full_comparison.sh paper-synthetic
STEPS="--seeds 1" bash bench/full_comparison.sh paper-numeric
STEPS="--seeds 3 --variants $arms;--seeds 1 --variants orpo-mixed+lambda=0" bash bench/full_comparison.sh paper-synthetic
