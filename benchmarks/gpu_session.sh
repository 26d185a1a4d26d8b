#!/usr/bin/env bash
# The GPU session in one command: install what the device lacks from carried wheels,
# run the GPU tests, split BN before/after, generate benchmark data on every core,
# moco-bench all, then the Fashion-MNIST quality run with the time left. Everything
# that comes back is written under $OUT (summary.json says what ran, what was
# skipped and why); stages and their budgets: benchmarks/gpu_session.py, or --help.
#
#   on the device:  bash benchmarks/gpu_session.sh                 (after the wheels are carried)
#   here, first:    bash benchmarks/gpu_session.sh --dry-run       (every stage, tiny, on the CPU)
#
# Carried (ignored by git, named in the device call's carry list):
#   .gpu/dali/     the parts and assemble.sh from ../shared/scripts/wheel-parts --dali
#   .gpu/wheels/   any further wheels (simplejpeg), installed with --no-deps
#   .gpu/fmnist/   the four Fashion-MNIST .gz files
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
dry=0; for a in "$@"; do [ "$a" = --dry-run ] && dry=1; done
# The device's python3 holds torch; a dry run here uses the project's environment.
py=${PYTHON:-python3}
if [ "$dry" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
# moco_dali without installing: the folders under one import name, as setup.py maps them.
pkg=$(mktemp -d /tmp/moco-dali-pkg.XXXXXX)
mkdir -p "$pkg/moco_dali"
for folder in common pipeline model train tools; do ln -s "$repo/$folder" "$pkg/moco_dali/$folder"; done
export PYTHONPATH="$pkg:$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m benchmarks.gpu_session --python "$py" "$@"
