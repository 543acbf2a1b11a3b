#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a .venv beside this repo with torch (from the local wheel cache),
# avalanche-lib and the package itself (editable, with the test extras). Nothing is downloaded at run time later.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import avalanche_drcpsd, avalanche, diffusers, open_clip, pytest, xdist, hypothesis, ray, ruff" 2>/dev/null; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,ray]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import avalanche_drcpsd" # fail loudly if the install did not work
fi
