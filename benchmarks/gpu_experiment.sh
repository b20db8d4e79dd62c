#!/usr/bin/env bash
# The GPU experiment without installing the package: the repository on PYTHONPATH, torch from the
# machine's python3 (override with PYTHON=...). All arguments go to benchmarks/gpu_experiment.py.
#   benchmarks/gpu_experiment.sh --shards gpu-shards/ --out gpu-out/ [--tiny] [--budget-seconds N]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$repo/benchmarks/gpu_experiment.py" "$@"
