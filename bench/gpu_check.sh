#!/usr/bin/env bash
# GPU path check on one GPU box, under 8 minutes (a hard timeout):
#
#   bench/gpu_check.sh                      # cuda: preflight, raw floor, geometry, `serve run serve_config.gpu.yaml`
#   bench/gpu_check.sh --device cuda:1      # another GPU (raw floor and geometry; Ray picks the served one)
#   bench/gpu_check.sh --quick              # fewer images, toy detector only
#   PYTHON=/opt/conda/bin/python bench/gpu_check.sh
#
# Needs what a user's GPU box has: a CUDA torch, the full mmcv built for that
# torch and CUDA (its CUDA ops), mmdet, Ray Serve, and this project's
# requirements, in the environment of $PYTHON (default: .venv/bin/python if
# there, else python3). Writes bench/results/gpu-check-<stamp>-<device>.json
# after every stage, so a run cut short still leaves its results.
# Exit status: 0 every check passed, 1 a check failed, 2 preflight failed
# (no CUDA, no mmcv CUDA ops, no Ray), 124 the hard timeout.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py="$(command -v python3 || command -v python)"
fi
limit_s="${GPU_CHECK_TIMEOUT_S:-450}"
# The script stops starting new work 50 s before the limit, so it ends (and
# stops `serve run`) on its own; SIGINT at the limit, SIGKILL 30 s later:
# 8 minutes at most.
budget_s=$((limit_s - 50))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "gpu_check: $py, hard limit ${limit_s} s"
status=0
timeout --signal=INT --kill-after=30 "$limit_s" \
    "$py" -m bench.gpu_check --budget-s "$budget_s" "$@" || status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
    echo "gpu_check: stopped at the ${limit_s} s limit; the result file holds the stages that finished" >&2
fi
exit "$status"
