#!/usr/bin/env bash
# Set up everything the project needs on a fresh machine: a virtual environment in .venv with the
# pinned torch wheels (constraints.txt), the package in editable mode with its dev tools, and the
# Fashion-MNIST IDX files from Debian's dataset-fashion-mnist package (used by the demo and benchmarks).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip (not uv/poetry): only pip sees the local torch wheel store on the project machines.
if ! .venv/bin/python -c "import surgery, torch, timm, pulp, pytest, xdist" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet -c constraints.txt -e '.[dev,highs]'
fi
if [ ! -d /usr/share/dataset-fashion-mnist ] && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "note: could not install dataset-fashion-mnist; the demo needs it (tests do not)" >&2
  else
    echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the demo (tests do not need it)" >&2
  fi
fi
