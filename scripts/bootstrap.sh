#!/usr/bin/env bash
# Creates .venv and installs Quiver with everything the tests and the demo need.
# Idempotent and quick on a second run (skipped while pyproject.toml is unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.quiver-installed
want=$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first, pinned: on a CPU machine pip takes the local CPU wheel and every later
  # torch requirement is then already satisfied (a plain `torch` would pull CUDA packages).
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  # lorax-client declares huggingface-hub<1.0 but never imports it: install it alone.
  .venv/bin/python -m pip install -q --no-deps "lorax-client==0.6.3"
  echo "$want" > "$stamp"
fi
