"""GPU path of the engine (NCCL, bf16, Transformer Engine FP8): skipped on machines without CUDA."""
import json
import subprocess

import pytest
import torch

from engine_helpers import PY, REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _bench(*extra):
    proc = subprocess.run([PY, "tools/bench_train.py", "--layers", "2", "--hidden", "256", "--heads", "8",
                           "--groups", "4", "--ffn", "512", "--vocab", "4096", "--seq", "256", "--micro-batch", "2",
                           "--steps", "2", "--warmup", "1", *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


def test_bf16_step_on_nccl_runs_and_reports_throughput():
    rows = _bench()
    engine = next(r for r in rows if r.get("impl") == "engine")
    assert engine["tokens_per_s"] > 0 and engine["mfu"] is not None and engine["gpu_max_allocated_gib"] > 0


def test_fp8_step_with_transformer_engine():
    pytest.importorskip("transformer_engine")
    rows = _bench("--fp8", "hybrid")
    engine = next(r for r in rows if r.get("impl") == "engine")
    assert engine["fp8"] == "hybrid" and engine["tokens_per_s"] > 0
