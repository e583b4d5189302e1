#!/usr/bin/env bash
# Every GPU check of the project in one prepared run, for a lent GPU machine (one H100; 15 minutes of device
# time in all, 10 a call). Prepare here with `bash tools/device_wheels.sh`, then run there, from the repo root,
# carrying .whl:   bash tools/device_check.sh        (about 6 minutes; results under $OUT, else ./device_out)
#
#   1. env.json         torch / CUDA / GPU / megatron-core / transformers / Transformer Engine versions
#   2. bench_bf16.jsonl tools/bench_train.py --preset gpu-1.7b: INPO step vs transformers (sdpa), same run;
#                       issue 3's target: engine_over_hf_tokens_per_s >= 1.0
#   3. bench_fp8.jsonl  the same with TE FP8 (hybrid, delayed scaling), only where TE imports; target >= 1.3
#   4. pytest_gpu.log   tests marked gpu: log-probs == transformers on the GPU (local and TE spec, fp32 and bf16),
#                       SFT loss == transformers, SIGKILL + resume == uninterrupted, bf16 / FP8 steps, rollout
#   (4a) pytest_bf16_load.log, run first and on its own so that its result shows whatever else fails: a bf16
#                       stage keeps the weights it loads through one step at lr 0, plain and distributed optimizer
#                       (the fp32 master weights are refreshed after the load)
# A step that fails is logged and the next one still runs; the exit status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
status=0
note() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
fail() { note "FAILED: $1"; [ "$status" -ne 0 ] || status=1; }

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 2; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false

note "environment"
"$PY" - > "$OUT/env.json" <<'PYEOF' || fail "environment"
import json, shutil, subprocess, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for mod in ("megatron.core", "transformers", "transformer_engine"):
    try:
        m = __import__(mod, fromlist=["__version__"])
        info[mod] = getattr(m, "__version__", "?")
    except Exception as e:  # TE is expected to be missing on the lent machine
        info[mod] = f"not importable: {type(e).__name__}: {e}"[:200]
if shutil.which("nvidia-smi"):
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
print(json.dumps(info, indent=1))
PYEOF
cat "$OUT/env.json"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { fail "no CUDA device"; exit 1; }

# The benchmark first, on an otherwise idle GPU.
note "bench bf16 (gpu-1.7b)"
timeout 240 "$PY" tools/bench_train.py --preset gpu-1.7b --steps 5 --warmup 2 2>&1 | tee "$OUT/bench_bf16.jsonl" \
    || fail "bench bf16"
if "$PY" -c "import transformer_engine.pytorch" 2>/dev/null; then
    note "bench fp8 hybrid (gpu-1.7b)"
    timeout 240 "$PY" tools/bench_train.py --preset gpu-1.7b --steps 5 --warmup 2 --fp8 hybrid 2>&1 \
        | tee "$OUT/bench_fp8.jsonl" || fail "bench fp8"
else
    note "Transformer Engine does not import: no FP8 bench (see env.json)"
fi

note "pytest bf16 load: master weights follow the loaded checkpoint"
timeout 180 "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider tests/engine/test_gpu.py \
    -k starts_from_the_init_checkpoint 2>&1 | tee "$OUT/pytest_bf16_load.log" || fail "pytest bf16 load"

note "pytest -m gpu"
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 4)
timeout 300 "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider "${xdist[@]}" tests/engine/test_gpu.py \
    tests/rollout/test_local.py -k "not starts_from_the_init_checkpoint" 2>&1 | tee "$OUT/pytest_gpu.log" \
    || fail "pytest -m gpu"
note "done, status $status"
exit $status
