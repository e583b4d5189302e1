#!/usr/bin/env bash
# Here, before a device session: the wheels that the GPU machine lacks, for its Python 3.12, into .whl/ (ignored by
# git, carried with `carry: [".whl"]`). Its image already has torch, transformers, safetensors, tokenizers,
# sentencepiece, tensorboard, tqdm, pyyaml, psutil, numpy and pytest-xdist; megatron-core is the one missing. Python
# 3.12 takes the 0.19 line (engine/compat.py), the release CI's Python 3.12 leg tests.
#
# Transformer Engine cannot travel: transformer_engine_cu13 2.20.2 is a 276 MB wheel (a call carries 64 MiB) and
# transformer_engine_torch exists only as a source distribution, compiled against the machine's torch with nvcc.
# Where a machine has TE already (a cluster's NGC container), tools/device_check.sh runs the TE and FP8 checks too.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl "megatron-core==0.19.2"
ls -la .whl
