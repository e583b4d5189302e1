#!/usr/bin/env bash
# One-command set-up for a fresh machine (CPU path): a virtual environment in .venv with torch==2.13.0 (the CPU
# wheel) and this package installed editable with its test extra. Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned: with it installed, the package's loose "torch>=2.6" installs nothing more.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import megatron_inpo, torch; print('megatron-inpo', megatron_inpo.__version__, 'torch', torch.__version__)"
