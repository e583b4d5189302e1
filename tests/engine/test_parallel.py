"""Megatron engine on CPU / gloo: parallel == single process, log-probs == transformers, checkpoints reshard,
SIGKILL + resume == uninterrupted, in fp32 and in bf16 (Megatron's bf16 optimizers with fp32 master weights run on
CPU). Few torchrun launches, several checks each (tests/helpers/engine_worker.py computes both precisions in one launch;
the tolerances per precision, with their reasons and measured errors, are tests.helpers.engine.PARITY_TOL)."""
import json
import os
import subprocess

import pytest
import torch

from tests.helpers.engine import (PARITY_TOL, PORTS, PY, REPO, convert_to_mcore, hf_pair_logps, kill_training_at,
                                  lr0_stage_args, lr0_step_weight_changes, sft_step_nll, tiny_hf_model, torchrun,
                                  write_sft_data)

pytestmark = [pytest.mark.slow, pytest.mark.megatron]
# Step-1 SFT loss (mean NLL 4.64 nats per token over 39 tokens) of the bf16 engine vs transformers in fp32 / float64:
# bf16 weights and activations (2^-9 relative rounding) move each token's log-prob by up to ~1e-3, and the mean
# over the tokens averages much of it out (measured 1.2e-4); a wrong mask or token shift is off by whole nats.
BF16_SFT_TOL = 1e-3
PRECISIONS = pytest.mark.parametrize("precision", list(PARITY_TOL))


def _of(results, precision):
    """The checks of one precision, names without the precision prefix (those without a prefix are shared)."""
    return [{**c, "name": c["name"][len(precision) + 1:]} for c in results if c["name"].startswith(precision + " ")]


def _assert_checks(results, expected_names):
    bad = [c for c in results if not c["ok"]]
    assert not bad, "\n".join(f"{c['name']} (rank {c['rank']}): err {c['err']:.3e} > tol {c['tol']}" for c in bad)
    names = {c["name"].split(" grad ")[0] if " grad " in c["name"] else c["name"] for c in results}
    missing = [n for n in expected_names if n not in names]
    assert not missing, f"checks that did not run: {missing}"


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """A tiny transformers Llama, converted by megatron_inpo.convert at TP=2, then the parity worker."""
    out = tmp_path_factory.mktemp("engine_parity")
    tiny_hf_model(seed=0).save_pretrained(out / "hf")
    convert_to_mcore(out / "hf", out / "init_ckpt", tp=2)
    proc = torchrun(2, ["-m", "tests.helpers.engine_worker", "parity", str(out)], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, json.loads((out / "results_parity.json").read_text())


@PRECISIONS
def test_dp_tp_pp_match_single_process(parity, precision):
    """Loss, metrics and every gradient of one INPO step at DP=2, TP=2, PP=2 vs plain autograd on one process."""
    results = _of(parity[1], precision)
    expected = [f"{l} {what}" for l in ("DP=2", "TP=2", "PP=2") for what in ("loss", "metric h_mean", "metric h_std")]
    expected += ["DP=2", "TP=2", "PP=2"]  # gradient checks (grouped by label)
    _assert_checks(results, expected)
    grads = [c for c in results if " grad " in c["name"]]
    # every parameter of the tiny model: 4 layers x 6 + embedding + final norm + output = 27, at each layout
    for label in ("DP=2", "TP=2", "PP=2"):
        assert len({c["name"] for c in grads if c["name"].startswith(label + " grad")}) == 27, label
    assert all(c["scale"] > 0 for c in grads), "a reference gradient is identically zero: the check is vacuous"


@PRECISIONS
def test_sft_loss_and_gradients_match_single_process(parity, precision):
    results = _of(parity[1], precision)
    _assert_checks(results, ["SFT DP=2 loss", "SFT TP=2 loss", "SFT DP=2", "SFT TP=2"])


@PRECISIONS
def test_logprobs_match_transformers_in_every_layout(parity, precision):
    results = _of(parity[1], precision)
    _assert_checks(results, [f"{l} log-probs vs transformers" for l in ("DP=2", "TP=2", "PP=2")])


@PRECISIONS
def test_distributed_optimizer_and_checkpoint_resharding(parity, precision):
    """One AdamW step with the distributed optimizer == without it; a TP=2 checkpoint (model + optimizer) loads at
    TP=1 and PP=2 with the same logits; latest_checkpoint finds it."""
    results = _of(parity[1], precision)
    _assert_checks(results, ["optimizer step moved the weights (> 1e-4)", "TP=2 checkpoint -> TP=1 logits",
                             "TP=2 checkpoint -> PP=2 logits", "latest_checkpoint finds it"])
    assert sum(c["name"].startswith("distributed optimizer param") for c in results) == 2 * 27


def test_checkpoint_load_tolerates_absent_te_extra_state_only(parity):
    _assert_checks([c for c in parity[1] if not c["name"].startswith(tuple(PARITY_TOL))],
                   ["TE _extra_state absent from the checkpoint: loads, same logits",
                    "a weight absent from the checkpoint: CheckpointError naming it"])


@PRECISIONS
def test_optimizer_state_load_restores_master_weights(parity, precision):
    """Saved optimizer state, loaded into a freshly built optimizer (whose masters are the init weights), gives
    back this rank's fp32 master weights bit for bit, for the plain and the distributed optimizer (DP=2,
    dp_reshardable with engine/checkpoint.py's repairs): a resume continues from the trained masters. In bf16 the
    masters are finer than the bf16 weights, so a refresh from the model weights would not pass this check."""
    results = _of(parity[1], precision)
    names = [f"{k} optimizer resume: master weights restored exactly" for k in ("plain", "distributed")]
    if precision == "bf16":
        names += [f"{k} optimizer: fp32 masters finer than the bf16 weights" for k in ("plain", "distributed")]
    _assert_checks(results, names)
    assert all(c["tol"] == 0 for c in results if "master weights restored" in c["name"])


@pytest.fixture(scope="module")
def tp2pp2(parity):
    """One 4-process launch computes TP=2 x PP=2 in both precisions."""
    src, _ = parity
    proc = torchrun(4, ["-m", "tests.helpers.engine_worker", "tp2pp2", str(src)], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((src / "results_tp2pp2.json").read_text())


@PRECISIONS
def test_tp2_x_pp2_four_processes(tp2pp2, precision):
    results = _of(tp2pp2, precision)
    _assert_checks(results, ["TP=2xPP=2 loss", "TP=2xPP=2"])
    assert len({c["name"] for c in results if " grad " in c["name"]}) == 27


def test_logprobs_cli_writes_transformers_values_and_resumes(parity, tmp_path):
    from transformers import LlamaForCausalLM

    from megatron_inpo.data.preferences import read_preferences

    src, _ = parity
    out = tmp_path / "lp.jsonl"
    args = ["-m", "megatron_inpo", "logprobs", "--data", str(src / "pairs.jsonl"), "--output", str(out),
            "--ref-checkpoint", str(src / "init_ckpt"), "--last-checkpoint", str(src / "ckpts" / "step_00000001"),
            "--megatron.parallel.tensor-model-parallel-size", "2", "--logprobs.micro-batch-size", "2", "--logprobs.chunk-pairs", "5",
            "--progress", "false"]
    proc = torchrun(2, args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "'computed_chunks': {'ref': 3, 'last': 3}" in proc.stdout
    got = read_preferences(out, require_logps=True)
    hf = LlamaForCausalLM.from_pretrained(src / "hf", attn_implementation="sdpa").eval()
    want = hf_pair_logps(hf, got)
    ref = torch.tensor([[p.ref_chosen_logp, p.ref_rejected_logp] for p in got], dtype=torch.float64)
    assert (ref - torch.tensor(want, dtype=torch.float64)).abs().max() < 2e-4
    last = torch.tensor([[p.last_chosen_logp, p.last_rejected_logp] for p in got], dtype=torch.float64)
    assert (last.double() - ref).abs().max() > 1e-3  # pi_t (one step later) differs from pi_ref
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "progress directory left behind"

    # Resume: cut the output, keep a progress store with 2 of 3 ref chunks and 3 of 3 last chunks.
    from megatron_inpo.engine import logprobs as lp

    out2 = tmp_path / "lp2.jsonl"
    pairs = read_preferences(src / "pairs.jsonl")
    pdir = lp.progress_dir(out2)
    for role, ck, vals, n in (("ref", src / "init_ckpt", ref, 2), ("last", src / "ckpts" / "step_00000001", last, 3)):
        store = lp.ProgressStore(pdir / role, lp.store_key(src / "pairs.jsonl", role, str(ck), 2, 5))
        for c in range(n):
            store.append(role, c, vals[c * 5:(c + 1) * 5].tolist())
    with open(pdir / "ref" / "ref.jsonl", "a") as f:
        f.write('{"chunk": 2, "values": [[1.0')  # a line cut by a crash
    # resumed at TP=1 (so DP=2 shares each chunk's micro-batches): only the missing chunk is computed
    args2 = [a if a != str(out) else str(out2) for a in args]
    args2[args2.index("--megatron.parallel.tensor-model-parallel-size") + 1] = "1"
    proc = torchrun(2, args2, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "'computed_chunks': {'ref': 1, 'last': 0}" in proc.stdout
    got2 = read_preferences(out2, require_logps=True)
    assert [p.prompt_id for p in got2] == [p.prompt_id for p in pairs]
    ref2 = torch.tensor([[p.ref_chosen_logp, p.ref_rejected_logp] for p in got2], dtype=torch.float64)
    assert torch.equal(ref2[:10], ref[:10])                       # reused chunks, bit for bit
    assert (ref2[10:] - ref[10:]).abs().max() < 1e-4               # recomputed at another layout
    assert [p.last_chosen_logp for p in got2] == [p.last_chosen_logp for p in got]


def _train_args(src, out, precision, extra=()):
    return ["-m", "megatron_inpo", "train", "--data", str(src / "train_pairs.jsonl"), "--init-checkpoint",
            str(src / "init_ckpt"), "--output-dir", str(out), "--megatron.parallel.pipeline-model-parallel-size", "2",
            "--train.global-batch-size", "4", "--train.micro-batch-size", "1", "--train.train-iters", "8", "--train.save-interval", "1",
            "--train.lr", "1e-4", "--train.warmup-ratio", "0.25", "--train.keep-checkpoints", "3", "--megatron.model.precision", precision,
            "--progress", "false", *extra]


def _losses(out):
    lines = [json.loads(x) for x in (out / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    return [(x["step"], x["loss"], x["grad_norm"], x["lr"]) for x in lines]


@PRECISIONS
def test_sigkill_and_resume_matches_uninterrupted(parity, tmp_path, precision):
    """Same tolerances in bf16 as in fp32: the resumed run is the same layout on the same CPU kernels, so with
    every state restored (bf16 weights, fp32 master weights, Adam moments, schedule, RNG, data position) it
    repeats the same arithmetic (measured: loss and grad norm identical at every step, in both precisions). A
    resume that rebuilt the fp32 masters from the bf16 weights instead (tried on purpose) differs from step 5 on,
    by up to 1.4e-4 relative in the loss and 4.7e-4 in the grad norm: far outside these tolerances."""
    src, _ = parity
    full = tmp_path / "full"
    proc = torchrun(2, _train_args(src, full, precision), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    want = _losses(full)
    assert [s for s, *_ in want] == list(range(1, 9))
    # warm-up of round(0.25 * 8) = 2 steps from 0, then cosine from 1e-4 down to 0
    assert [round(x[3], 10) for x in want[:3]] == [0.0, 5e-05, 1e-04] and want[-1][3] < 1e-5

    cut = tmp_path / "cut"
    kill_training_at(_train_args(src, cut, precision), cut, step=3)
    from megatron_inpo.engine.checkpoint import latest_checkpoint

    resumed_from = latest_checkpoint(cut / "checkpoints")
    assert resumed_from is not None and resumed_from.name < "step_00000008"
    proc = torchrun(2, _train_args(src, cut, precision), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"resuming from {resumed_from}" in proc.stdout
    got = _losses(cut)
    assert [s for s, *_ in got] == list(range(1, 9))
    for (s, l1, g1, lr1), (_, l2, g2, lr2) in zip(want, got):
        assert l2 == pytest.approx(l1, rel=1e-6, abs=1e-9), f"step {s}"
        assert g2 == pytest.approx(g1, rel=1e-5) and lr2 == pytest.approx(lr1), f"step {s}"
    result = json.loads((cut / "train_result.json").read_text())
    assert result["final_checkpoint"].endswith("step_00000008")
    # a re-run of a finished stage is a no-op
    proc = subprocess.run([PY, *_train_args(src, cut, precision)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "trained:" in proc.stdout, proc.stderr[-3000:]


@PRECISIONS
def test_distributed_optimizer_resume_matches_uninterrupted(parity, tmp_path, precision):
    """DP=2 with the distributed optimizer: stopped after step 3 and resumed == uninterrupted, bit for bit.

    Guards three megatron-core 0.16.1 gaps with torch's AdamW (engine/checkpoint.py): the default optimizer
    format cannot be saved, an optimizer that has not stepped cannot build its load target, and the load lost
    Adam's step count. A resume in another layout or optimizer setting is a clear error (checked in fp32 only:
    the check runs before any weight is touched). bf16 too is exact: same layout, same CPU arithmetic, and the
    fp32 master shards come back from the dp_reshardable state (an optimizer refreshed from the bf16 weights
    instead would diverge from step 5 on).
    """
    src, _ = parity

    def args(out, *extra):
        return ["-m", "megatron_inpo", "train", "--data", str(src / "train_pairs.jsonl"), "--init-checkpoint",
                str(src / "init_ckpt"), "--output-dir", str(out), "--train.global-batch-size", "4", "--train.micro-batch-size",
                "1", "--train.train-iters", "6", "--train.save-interval", "1", "--train.lr", "1e-3", "--train.warmup-ratio", "0",
                "--megatron.parallel.use-distributed-optimizer", "true", "--megatron.model.precision", precision, "--progress", "false", *extra]

    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = torchrun(2, args(full), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    proc = torchrun(2, args(cut, "--train.stop-after-steps", "3"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    meta = json.loads((cut / "checkpoints" / "step_00000003" / "megatron_inpo.json").read_text())
    assert meta["optimizer_format"] == "dp_reshardable" and not (cut / "train_result.json").exists()

    if precision == "fp32":
        proc = torchrun(2, args(cut, "--megatron.parallel.tensor-model-parallel-size", "2"), timeout=300)
        assert proc.returncode != 0 and "saved at TP=1 PP=1 and loads only at that layout" in proc.stderr
        proc = torchrun(2, args(cut, "--megatron.parallel.use-distributed-optimizer", "false"), timeout=300)
        assert proc.returncode != 0 and "saved with use_distributed_optimizer=true" in proc.stderr

    proc = torchrun(2, args(cut), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "resuming from" in proc.stdout and "(step 3 of 6)" in proc.stdout
    want, got = _losses(full), _losses(cut)
    assert [s for s, *_ in got] == list(range(1, 7))
    assert len({round(l, 6) for _, l, _, _ in want}) == 6, "losses do not move: the comparison would be vacuous"
    assert got == want  # (step, loss, grad norm, lr), exactly


@pytest.mark.parametrize("precision,abs_tol", [("fp32", 1e-5), ("bf16", BF16_SFT_TOL)])
def test_sft_cli_single_process_loss_equals_transformers(parity, tmp_path, precision, abs_tol):
    """`megatron-inpo train mode=sft` without torchrun: step-1 loss = transformers' mean response-token NLL.

    fp32: summation order only (measured 1.4e-7). bf16: the model runs on bf16-rounded weights and activations
    while transformers runs in fp32, see BF16_SFT_TOL."""
    from transformers import LlamaForCausalLM

    from megatron_inpo.data.preferences import read_preferences

    src, _ = parity
    pairs = read_preferences(src / "train_pairs.jsonl")
    data = tmp_path / "sft.jsonl"
    write_sft_data(data, pairs)
    out = tmp_path / "sft"
    proc = subprocess.run([PY, "-m", "megatron_inpo", "train", "--loss", "sft", "--data", str(data),
                           "--init-checkpoint", str(src / "init_ckpt"), "--output-dir", str(out),
                           "--train.global-batch-size", "8", "--train.micro-batch-size", "4", "--train.train-iters", "2",
                           "--train.lr", "1e-3", "--train.warmup-ratio", "0", "--seed", "11", "--megatron.model.precision", precision,
                           "--progress", "false"],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "MASTER_PORT": str(next(PORTS))})
    assert proc.returncode == 0, proc.stderr[-5000:]
    got = [json.loads(x) for x in (out / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    hf = LlamaForCausalLM.from_pretrained(src / "hf", attn_implementation="sdpa").eval()
    nll, n = sft_step_nll(hf, pairs, 8, seed=11)
    assert got[0]["loss"] == pytest.approx(nll, abs=abs_tol)
    assert got[0]["tokens"] == n
    assert got[1]["loss"] != got[0]["loss"] and (out / "checkpoints" / "step_00000002").is_dir()


@pytest.mark.parametrize("distributed", [False, True], ids=["plain_optimizer", "distributed_optimizer_dp2"])
def test_bf16_stage_starts_from_the_init_checkpoint(parity, tmp_path, distributed):
    """bf16: one step at lr 0 leaves exactly the weights loaded from --init-checkpoint.

    Megatron's bf16 optimizers copy the model's weights into fp32 master weights when they are built, and every
    step writes the masters back into the model: a load after the build must refresh the masters, or the step
    restores the random init (the bug this guards: every bf16 stage trained from random weights; before the fix
    the saved weights differed from the loaded ones by up to 0.29). The distributed optimizer runs at DP=2,
    where each rank holds and writes back half of the masters.
    """
    src, _ = parity
    out = tmp_path / "stage"
    args = ["-m", "megatron_inpo", *lr0_stage_args(src / "train_pairs.jsonl", src / "init_ckpt", out)]
    if distributed:
        proc = torchrun(2, args + ["--megatron.parallel.use-distributed-optimizer", "true"], timeout=300)
    else:
        proc = subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=240,
                              env={**os.environ, "MASTER_PORT": str(next(PORTS))})
    assert proc.returncode == 0, proc.stderr[-5000:]
    moved = lr0_step_weight_changes(src / "init_ckpt", out)
    assert all(v == 0.0 for v in moved.values()), f"weights changed by a step of lr 0 (max |diff| per tensor): {moved}"
