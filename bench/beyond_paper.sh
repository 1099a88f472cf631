#!/usr/bin/env bash
# Issue 33's dev sweep: the designs beside the paper-protocol comparison's own arms, in the same folder, so
# that they share its teacher traces, initial student samples, base evaluations and its sft-diverse and
# orpo-mixed runs of seed 0 (configs/compare-paper-synthetic.yaml: lambda 1, five epochs, K = 8, the dev
# split of 200 questions; bench/paper_protocol.sh runs those arms).
#
#   bash bench/beyond_paper.sh              # RUNS, EVERY, PYTHON as for bench/full_comparison.sh
#
# The choice among designs is made on the dev columns of comparison.md alone (the best dev accuracy of
# each arm against sft-diverse's best): the test columns these runs also get are not read for it. The one
# or two designs chosen are then confirmed on the test split with seeds 1 and 2 and on the numeric task.
# sft-diverse gets more tuning than any design: two more learning rates (the designs run at 5e-5 only).
#
#   +sft=3                 SFT on every positive for three epochs, then two with the term on the SFT'd
#                          student's negatives (train.sft_epochs)
#   +span=first_error      the rejected side from the negative's first wrong step on (pairs.rejected_span)
#   +protect=5             DPO-Positive's chosen-side protection, mu 5 (train.protect_chosen)
# Greedy negatives (student.sampling.greedy_first) change the shared samples: a comparison of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
designs=orpo-mixed+sft=3,orpo-mixed+sft=3+span=first_error,orpo-mixed+sft=3+protect=5
designs+=,orpo-mixed+span=first_error,orpo-mixed+protect=5
STEPS="--seeds 1 --variants sft-diverse,orpo-mixed,$designs;--seeds 1 --variants sft-diverse+lr=1e-4,sft-diverse+lr=2e-5" \
  bash bench/full_comparison.sh paper-synthetic
