"""GPU path of the engine (CUDA + NCCL, bf16, Transformer Engine spec and FP8): skipped on machines without CUDA.

The same single-process checks as the CPU suite, now on the GPU: converter output loaded into the local and the
TE layer spec gives transformers' log-probs; the SFT step-1 loss equals transformers' NLL; a SIGKILLed training
run resumes to the uninterrupted curve; a bf16 stage starts from the weights it loads (one step at lr 0 changes
none, plain and distributed optimizer); the INPO step runs in bf16 and FP8 and reports throughput. On one GPU only
one process can hold it under NCCL, so the TP/PP/DP parity checks stay in the CPU suite (test_engine_parallel).
Run them all with `bash tools/device_check.sh` on a lent GPU machine.
"""
import json
import os
import subprocess
import time

import pytest
import torch

from tests.helpers.engine import (PORTS, PY, REPO, convert_to_mcore, hf_pair_logps, kill_tree, lr0_stage_args,
                                  lr0_step_weight_changes, make_pairs, sft_step_nll, tiny_hf_model, write_pairs,
                                  write_sft_data)

pytestmark = [pytest.mark.gpu, pytest.mark.megatron,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def _bench(*extra):
    proc = subprocess.run([PY, "tools/bench_train.py", "--layers", "2", "--hidden", "256", "--heads", "8",
                           "--groups", "4", "--ffn", "512", "--vocab", "4096", "--seq", "256", "--micro-batch", "2",
                           "--steps", "2", "--warmup", "1", *extra], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MASTER_PORT": str(next(PORTS))})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]


def _cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    e = {**os.environ, "MASTER_PORT": str(next(PORTS)), "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([PY, "-m", "megatron_inpo", *args], cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny transformers Llama, converted at TP=1 (on the GPU), and preference files."""
    out = tmp_path_factory.mktemp("gpu_engine")
    tiny_hf_model(seed=0).save_pretrained(out / "hf")
    convert_to_mcore(out / "hf", out / "ckpt", tp=1)
    write_pairs(out / "pairs.jsonl", make_pairs(12, 100, seed=5, with_logps=False))
    write_pairs(out / "train_pairs.jsonl", make_pairs(16, 100, seed=6))
    return out


def test_bf16_step_on_nccl_runs_and_reports_throughput():
    rows = _bench()
    engine = next(r for r in rows if r.get("impl") == "engine")
    assert engine["tokens_per_s"] > 0 and engine["mfu"] is not None and engine["gpu_max_allocated_gib"] > 0
    assert engine["device"] != "cpu"


def test_fp8_step_with_transformer_engine():
    pytest.importorskip("transformer_engine")
    rows = _bench("--fp8", "hybrid")
    engine = next(r for r in rows if r.get("impl") == "engine")
    assert engine["fp8"] == "hybrid" and engine["tokens_per_s"] > 0


@pytest.mark.parametrize("spec", ["local", "te"])
@pytest.mark.parametrize("precision,abs_tol,rel_tol", [("fp32", 2e-3, 0.0), ("bf16", 0.15, 0.01)])
def test_logprobs_on_gpu_equal_transformers(tiny, tmp_path, spec, precision, abs_tol, rel_tol):
    """Stored log pi_ref of every y_w, y_l = a float64 transformers forward on CPU of the same weights.

    fp32 tolerance: accumulation order of GPU kernels. bf16: logits rounded to 8 bits of mantissa, about 1e-2 per
    token over up to 9 response tokens. A wrong weight mapping is off by whole units.
    """
    if spec == "te" and not _te_importable():
        pytest.skip("transformer_engine does not import")
    from transformers import LlamaForCausalLM

    from megatron_inpo.data.preferences import read_preferences

    out = tmp_path / "lp.jsonl"
    proc = _cli("logprobs", "--data", str(tiny / "pairs.jsonl"), "--output", str(out), "--ref-checkpoint",
                str(tiny / "ckpt"), "--logprobs.micro-batch-size", "3", "--logprobs.chunk-pairs", "6", "--megatron.model.precision", precision,
                "--megatron.model.layer-spec", spec, "--progress", "false")
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = read_preferences(out, require_logps=True)
    hf = LlamaForCausalLM.from_pretrained(tiny / "hf", attn_implementation="sdpa").eval()
    want = torch.tensor(hf_pair_logps(hf, got), dtype=torch.float64)
    ref = torch.tensor([[p.ref_chosen_logp, p.ref_rejected_logp] for p in got], dtype=torch.float64)
    err = (ref - want).abs()
    assert (err <= abs_tol + rel_tol * want.abs()).all(), f"max error {err.max():.3e}"
    # pi_t == pi_ref here (no last checkpoint): the pass copies the column rather than computing it twice
    assert [p.last_chosen_logp for p in got] == [p.ref_chosen_logp for p in got]


def test_sft_step_on_gpu_equals_transformers(tiny, tmp_path):
    from transformers import LlamaForCausalLM

    from megatron_inpo.data.preferences import read_preferences

    pairs = read_preferences(tiny / "train_pairs.jsonl")
    data = tmp_path / "sft.jsonl"
    write_sft_data(data, pairs)
    out = tmp_path / "sft"
    proc = _cli("train", "--loss", "sft", "--data", str(data), "--init-checkpoint", str(tiny / "ckpt"),
                "--output-dir", str(out), "--train.global-batch-size", "8", "--train.micro-batch-size", "4", "--train.train-iters",
                "2", "--train.lr", "1e-3", "--train.warmup-ratio", "0", "--seed", "11", "--megatron.model.precision", "fp32",
                "--megatron.model.layer-spec", "local", "--progress", "false")
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = [json.loads(x) for x in (out / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    hf = LlamaForCausalLM.from_pretrained(tiny / "hf", attn_implementation="sdpa").eval()
    nll, n = sft_step_nll(hf, pairs, 8, seed=11)
    assert got[0]["loss"] == pytest.approx(nll, abs=2e-4) and got[0]["tokens"] == n
    assert got[1]["loss"] != got[0]["loss"]


@pytest.mark.parametrize("distributed", [False, True], ids=["plain_optimizer", "distributed_optimizer"])
def test_bf16_stage_on_gpu_starts_from_the_init_checkpoint(tiny, tmp_path, distributed):
    """One bf16 step at lr 0 on CUDA saves exactly the weights loaded from --init-checkpoint: the optimizer's fp32
    master weights were refreshed after the load (else the step writes back the random init). On one GPU the
    distributed optimizer runs at DP=1: one rank holds all masters, through the same copy paths."""
    out = tmp_path / "stage"
    args = lr0_stage_args(tiny / "train_pairs.jsonl", tiny / "ckpt", out, "--megatron.model.layer-spec", "local")
    proc = _cli(*args, *(["--megatron.parallel.use-distributed-optimizer", "true"] if distributed else []))
    assert proc.returncode == 0, proc.stderr[-5000:]
    moved = lr0_step_weight_changes(tiny / "ckpt", out)
    assert all(v == 0.0 for v in moved.values()), f"weights changed by a step of lr 0 (max |diff| per tensor): {moved}"


def _train(tiny, out, precision):
    return ["train", "--data", str(tiny / "train_pairs.jsonl"), "--init-checkpoint", str(tiny / "ckpt"),
            "--output-dir", str(out), "--train.global-batch-size", "4", "--train.micro-batch-size", "2", "--train.train-iters", "6",
            "--train.save-interval", "1", "--train.lr", "1e-3", "--train.warmup-ratio", "0", "--megatron.model.precision", precision,
            "--megatron.model.layer-spec", "local", "--progress", "false"]


def _curve(out):
    lines = [json.loads(x) for x in (out / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"], x["lr"]) for x in lines]


def test_fp8_delayed_recipe_checkpoint_resumes(tiny, tmp_path):
    """A TE-spec bf16 run with FP8 (hybrid, delayed scaling) saves its FP8 scaling state (amax history, scales) as
    TE's pickled `_extra_state`, which TE >= 2.18 unpickles only with NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 set
    while `load_state_dict` runs (engine/checkpoint.py `_te_extra_state_pickle`): stopped after step 2 and resumed,
    the run reaches step 4 (before the fix the resume failed with "Refusing to load pickled Transformer Engine extra
    state"). The loss is compared loosely: FP8 GEMMs and the GPU's attention backward are not bitwise repeatable."""
    if not _te_importable():
        pytest.skip("Transformer Engine does not import")
    def args(out):  # the flags given last win: the TE spec instead of the local one, 4 steps instead of 6
        return [*_train(tiny, out, "bf16"), "--megatron.model.layer-spec", "te", "--megatron.model.fp8", "hybrid",
                "--megatron.model.fp8-recipe", "delayed", "--train.train-iters", "4"]

    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = _cli(*args(full))
    assert proc.returncode == 0, proc.stderr[-5000:]
    proc = _cli(*args(cut), "--train.stop-after-steps", "2")
    assert proc.returncode == 0, proc.stderr[-5000:]
    proc = _cli(*args(cut))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "resuming from" in proc.stdout and "Refusing to load pickled" not in proc.stderr
    want, got = _curve(full), _curve(cut)
    assert [s for s, *_ in got] == [1, 2, 3, 4]
    for (s, l1, _), (_, l2, _) in zip(want, got):
        assert l2 == pytest.approx(l1, rel=5e-2), f"step {s}"


@pytest.mark.parametrize("precision,rel_tol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_sigkill_and_resume_on_gpu_matches_uninterrupted(tiny, tmp_path, precision, rel_tol):
    """CUDA RNG, optimizer (fp32 main params in bf16) and scheduler state survive a SIGKILL.

    The tolerance covers the GPU's non-deterministic attention backward, not a lost state: a step of lr 1e-3
    moves this loss by about 1e-2.
    """
    from tests.helpers.faults import env_for

    full = tmp_path / "full"
    proc = _cli(*_train(tiny, full, precision))
    assert proc.returncode == 0, proc.stderr[-5000:]
    want = _curve(full)
    assert [s for s, *_ in want] == list(range(1, 7))
    assert abs(want[-1][1] - want[0][1]) > 10 * rel_tol * abs(want[0][1]), "training did not move the loss"

    cut = tmp_path / "cut"
    # the listener of tests/helpers/faults.py holds the stage at its first step checkpoint (event '@checkpoint': a
    # stage started outside a run has no scope) until it is killed
    env = {**os.environ, "MASTER_PORT": str(next(PORTS)), **env_for("@checkpoint:hold", tmp_path)}
    p = subprocess.Popen([PY, "-m", "megatron_inpo", *_train(tiny, cut, precision)], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while not (cut / "checkpoints" / "step_00000001").exists():  # then it holds there until killed
            assert p.poll() is None and time.time() < deadline, "training ended before it could be killed"
            time.sleep(0.05)
    finally:
        kill_tree(p.pid)
        p.wait()
    assert not (cut / "train_result.json").exists()
    proc = _cli(*_train(tiny, cut, precision))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "resuming from" in proc.stdout
    got = _curve(cut)
    assert [s for s, *_ in got] == list(range(1, 7))
    for (s, l1, lr1), (_, l2, lr2) in zip(want, got):
        assert l2 == pytest.approx(l1, rel=rel_tol), f"step {s}"
        assert lr2 == pytest.approx(lr1), f"step {s}"
