#!/usr/bin/env bash
# The P-Tuning v2 lineage side by side (docs/benchmarks.md, "The lineage"): prompt tuning, P-Tuning v1, prefix
# tuning and P-Tuning v2, each task trained alone, every method for the same training time.
#   bench/lineage.sh "2 6" "sst2 conll2003 squad"      (the defaults: budgets in minutes, then tasks)
# Writes runs/lineage/<task>_<minutes>min/comparison.{md,json,png}. Run it with no other torch process on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
budgets=${1:-"2 6"}
tasks=${2:-"sst2 conll2003 squad"}
methods=${METHODS:-prompt_tuning,p_tuning_v1,prefix_tuning,prefix_per_task}
for minutes in $budgets; do
  for task in $tasks; do
    HF_HUB_OFFLINE=1 .venv/bin/multitask compare "bench/configs/compare_${task}.yaml" --budget-minutes "$minutes" \
      --methods "$methods" --output-dir "runs/lineage/${task}_${minutes}min"
  done
done
