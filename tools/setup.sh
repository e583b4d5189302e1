#!/usr/bin/env bash
# One-command set-up for a fresh machine (CPU path): a virtual environment in .venv with torch==2.13.0 (the CPU
# wheel) and this package installed editable with its test extra, plus the sglang wheel unpacked WITHOUT its
# dependencies into .test-deps/sglang, where the tests read SGLang's own HTTP request / response types (the fake
# server is validated against them). Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned: with it installed, the package's loose "torch>=2.6" installs nothing more.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
# Tests only, never imported as `sglang` (that would pull torch 2.14 and CUDA packages): the tests load
# sglang/api/v1/api_types.py by file path and read io_struct.py's field declarations. ~40 MB download, ~220 MB
# unpacked, ~15 s. The pin is the server version the project follows (notes/03-sglang-api.md).
SGLANG_VERSION=0.5.23
if [ ! -d ".test-deps/sglang/sglang-${SGLANG_VERSION}.dist-info" ]; then
  rm -rf .test-deps/sglang
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .test-deps/sglang \
    "sglang==${SGLANG_VERSION}"
fi
.venv/bin/python -c "import megatron_inpo, torch; print('megatron-inpo', megatron_inpo.__version__, 'torch', torch.__version__)"
