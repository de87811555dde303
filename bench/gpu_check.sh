#!/usr/bin/env bash
# One run of every GPU check (bench/gpu_check.py): one PASS/FAIL/SKIP line per check, then a summary; exit 1 if a
# check failed. Without CUDA it stops at once; --dry-run exercises it on the CPU. It uses the working tree as it is
# (no install, no network): the project's virtual environment when there is one, else $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$PYTHON" bench/gpu_check.py "$@"
