"""Packed pairs (engine/batches.py, engine/model.py, MegatronConfig.packing): the row layout, first-fit decreasing,
the data-parallel deal, length-grouped steps, the PackedSeqParams checks, config validation; then on CPU / gloo:
packed == padded log-probs, INPO loss and gradients at TP=1 (DP=2), TP=2 and PP=2 (tests/engine/packing_worker.py),
the SFT loss packed == padded, and a SIGKILL + resume with packing == the uninterrupted run."""
import json
import os
import subprocess

import pytest
import torch

from megatron_inpo.config import ConfigError, validate_all
from megatron_inpo.data.preferences import PreferencePair
from megatron_inpo.engine.batches import (SFTItem, deal_to_ranks, length_grouped, make_packed_batch, make_pair_batch,
                                          pack_rows, packed_size, pair_sequences, plan_step, step_items)
from megatron_inpo.engine.config import MegatronConfig, MegatronModelConfig, TrainConfig, TrainStageConfig

from tests.helpers.engine import (PORTS, PY, REPO, convert_to_mcore, kill_training_at, make_pairs, tiny_hf_model,
                                  torchrun, write_pairs, write_sft_data)


def _pair(prompt, chosen, rejected):
    return PreferencePair(prompt_id="x", prompt="", prompt_ids=prompt, chosen="", rejected="", chosen_ids=chosen,
                          rejected_ids=rejected)


# ---------------------------------------------------------------------------------------------------------------
# Layout and plans (no process group)


def test_packed_row_layout_matches_the_padded_batch():
    pairs = [_pair([1, 2, 3], [4, 5], [6]), _pair([7], [8, 9, 10, 11], [12, 13])]
    padded = make_pair_batch(pairs, indices=[0, 1])
    b = make_packed_batch(pair_sequences(pairs), pad_multiple=8, num_pairs=2, indices=[0, 1])
    # sequences in the padded order (chosen0, chosen1, rejected0, rejected1) of lengths 4, 4, 3, 2; 13 -> 16
    assert b.tokens.shape == (1, 16) and b.packed and b.num_sequences == 4 and b.num_pairs == 2
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 4, 8, 11, 13, 16]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]
    assert b.seq_ids[0].tolist() == [0] * 4 + [1] * 4 + [2] * 3 + [3] * 2 + [4] * 3
    for i, (a, e) in enumerate(zip(b.cu_seqlens[:-2].tolist(), b.cu_seqlens[1:-1].tolist())):
        L = e - a
        assert b.tokens[0, a:e].tolist() == padded.tokens[i, :L].tolist()
        assert b.labels[0, a:e].tolist() == padded.labels[i, :L].tolist()
        assert b.loss_mask[0, a:e].tolist() == padded.loss_mask[i, :L].tolist()
    assert b.loss_mask[0, 13:].sum() == 0 and b.num_response_tokens == padded.num_response_tokens
    assert b.segment_lengths == [4, 4, 3, 2, 3]
    # exactly full: no padding segment
    full = make_packed_batch(pair_sequences(pairs), num_pairs=2)
    assert full.cu_seqlens.tolist() == [0, 4, 8, 11, 13] and full.tokens.shape == (1, 13)
    with pytest.raises(ValueError, match="shorter"):
        make_packed_batch(pair_sequences(pairs), pad_to=12)


def test_first_fit_decreasing_and_the_data_parallel_deal():
    assert pack_rows([5, 3, 8, 2, 4, 6], 10) == [[2, 3], [5, 4], [0, 1]]  # 8+2, 6+4, 5+3
    assert pack_rows([12, 3], 10) == [[0], [1]]                           # too long: a row of its own
    assert pack_rows([3, 3, 3], 10) == [[0, 1, 2]]
    sizes = {i: s for i, s in enumerate([9, 1, 7, 3, 5, 5])}
    assert deal_to_ranks(list(range(6)), sizes, 2) == [[0, 5, 1], [2, 4, 3]]  # 15 tokens each
    assert deal_to_ranks([4], sizes, 1) == [[4]]


def test_plan_step_keeps_pairs_whole_and_covers_the_batch_once():
    pairs = make_pairs(40, seed=1)
    idx = list(range(3, 35))
    for dp in (1, 2, 4):
        seen = []
        for rank in range(dp):
            for uniform in (False, True):
                bs = plan_step(pairs, idx, packing=True, micro_batch_size=2, capacity=40, dp_size=dp, dp_rank=rank,
                               pad_multiple=8, uniform=uniform)
                assert all(b.packed and b.tokens.shape[0] == 1 and b.tokens.shape[1] % 8 == 0 for b in bs)
                if uniform:
                    assert len({b.tokens.shape for b in bs}) == 1  # one row shape per step (pipeline)
                for b in bs:  # every pair's chosen and rejected in the same row
                    assert b.num_sequences == 2 * b.num_pairs == 2 * len(b.indices)
                    assert sum(packed_size(pairs[i]) for i in b.indices) <= 40 or len(b.indices) == 1
                # deterministic: the same call gives the same rows
                again = plan_step(pairs, idx, packing=True, micro_batch_size=2, capacity=40, dp_size=dp,
                                  dp_rank=rank, pad_multiple=8, uniform=uniform)
                assert [b.indices for b in again] == [b.indices for b in bs]
            seen += [i for b in bs for i in b.indices]
        assert sorted(seen) == idx
    # padded path without a pipeline: each micro-batch padded to its own longest sequence
    bs = plan_step(pairs, idx, packing=False, micro_batch_size=4, capacity=40, dp_size=1, dp_rank=0, pad_multiple=1,
                   uniform=False)
    lens = [b.seq_len for b in bs]
    assert lens == sorted(lens, reverse=True) and len(set(lens)) > 1
    assert all(b.seq_len == max(int(x) for x in b.lengths) for b in bs)
    sft = [SFTItem(p.prompt_ids, p.chosen_ids) for p in pairs]
    bs = plan_step(sft, idx, packing=True, micro_batch_size=4, capacity=32, dp_size=1, dp_rank=0, pad_multiple=8,
                   uniform=False)
    assert sorted(i for b in bs for i in b.indices) == idx and all(b.num_pairs == 0 for b in bs)


def test_length_grouped_steps_are_deterministic_and_a_permutation():
    lengths = [(i * 37) % 50 for i in range(100)]
    n, G = 100, 8
    steps = [step_items(s, n, G, seed=3, shuffle=True, lengths=lengths, length_buckets=4) for s in range(24)]
    assert steps == [step_items(s, n, G, seed=3, shuffle=True, lengths=lengths, length_buckets=4) for s in range(24)]
    epoch0 = [i for s in steps[:12] for i in s]
    assert len(set(epoch0)) == 96  # 12 whole global batches, no item twice
    assert steps[12:] != steps[:12]  # the next epoch is another order
    # grouped: the spread of lengths inside a step is far below that of plain shuffled steps
    spread = lambda ss: sum(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in ss)  # noqa: E731
    plain = [step_items(s, n, G, seed=3, shuffle=True) for s in range(12)]
    assert spread(steps[:12]) < 0.5 * spread(plain)
    order = list(range(20))
    assert sorted(length_grouped(order, lengths, 4, 2, 0, 1, False)) == order


# ---------------------------------------------------------------------------------------------------------------
# Config and the PackedSeqParams checks (what the TE path receives), on CPU


def test_packing_config_validation():
    cfg = TrainStageConfig(data="d", init_checkpoint="c", output_dir="o")
    assert cfg.megatron.packing is True
    validate_all(cfg)
    for engine, where in ((MegatronConfig(packing="yes"), "megatron.packing"),
                          (MegatronConfig(model=MegatronModelConfig(layer_spec="local", attention="unfused")),
                           "megatron.packing")):
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            validate_all(TrainStageConfig(data="d", init_checkpoint="c", output_dir="o", megatron=engine))
    validate_all(TrainStageConfig(data="d", init_checkpoint="c", output_dir="o",
                                  megatron=MegatronConfig(packing=False, model=MegatronModelConfig(attention="unfused"))))
    with pytest.raises(ConfigError, match=r"megatron\.packing"):  # 'auto' resolves to local on this machine
        MegatronConfig(model=MegatronModelConfig(attention="unfused")).validate_runtime(1, cuda=False)
    with pytest.raises(ConfigError, match=r"train\.length_buckets"):
        validate_all(TrainStageConfig(data="d", init_checkpoint="c", output_dir="o",
                                      train=TrainConfig(length_buckets=-1)))


def test_packed_seq_params_for_the_te_path():
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_inpo.engine.model import check_packed_seq_params, packed_seq_params

    pairs = [_pair([1, 2, 3], [4, 5], [6]), _pair([7], [8, 9, 10, 11], [12, 13])]
    b = make_packed_batch(pair_sequences(pairs), pad_multiple=8, num_pairs=2)
    p = packed_seq_params(b)
    assert isinstance(p, PackedSeqParams) and p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 4, 8, 11, 13, 16] and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_kv is p.cu_seqlens_q and p.max_seqlen_q == p.max_seqlen_kv == 4
    assert packed_seq_params(make_pair_batch(pairs)) is None  # padded batches: sbhd, no params
    check_packed_seq_params(p, 16, tp=2, sequence_parallel=True)
    cu = torch.tensor([0, 4, 8, 16], dtype=torch.int32)

    def params(**kw):
        base = dict(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8)
        return PackedSeqParams(**{**base, **kw})

    bad = [
        (params(qkv_format="sbhd"), 16, {}, "qkv_format"),
        (params(), 16, {"batch_rows": 2}, "one row"),
        (params(cu_seqlens_kv=torch.tensor([0, 8, 16], dtype=torch.int32)), 16, {}, "cu_seqlens_kv must equal"),
        (params(cu_seqlens_q=cu.long(), cu_seqlens_kv=cu.long()), 16, {}, "int32"),
        (params(cu_seqlens_q=torch.tensor([0, 4, 4, 16], dtype=torch.int32),
                cu_seqlens_kv=torch.tensor([0, 4, 4, 16], dtype=torch.int32), max_seqlen_q=12, max_seqlen_kv=12),
         16, {}, "increase strictly"),
        (params(), 20, {}, "the row has 20 tokens"),
        (params(max_seqlen_q=16), 16, {}, "max_seqlen_q=16"),
        (params(), 16, {"tp": 3, "sequence_parallel": True}, "sequence-parallel"),
    ]
    for prm, n, kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            check_packed_seq_params(prm, n, **kw)


# ---------------------------------------------------------------------------------------------------------------
# Megatron on CPU / gloo



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("packing")
    tiny_hf_model(seed=0).save_pretrained(out / "hf")
    convert_to_mcore(out / "hf", out / "init_ckpt", tp=1)
    write_pairs(out / "train_pairs.jsonl", make_pairs(16, 100, seed=3))
    return out


@pytest.mark.slow
@pytest.mark.megatron
def test_packed_equals_padded_at_tp1_tp2_pp2(tiny):
    """Log-probs per sequence, INPO loss / metrics and every gradient shard, packed vs padded, and the chunked
    log-probs (engine/head.py) vs the full logits', packed and padded, in one launch of 2 processes (TP=1 with DP=2,
    TP=2, PP=2); tolerances and measured errors in tests/engine/packing_worker.py."""
    proc = torchrun(2, ["-m", "tests.engine.packing_worker", str(tiny)], timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = json.loads((tiny / "results_packing.json").read_text())
    bad = [c for c in results if not c["ok"]]
    assert not bad, "\n".join(f"{c['name']} (rank {c['rank']}): err {c['err']:.3e} > tol {c['tol']}" for c in bad)
    names = {c["name"] for c in results}
    for layout in ("TP=1 DP=2", "TP=2", "PP=2"):
        assert f"{layout} log-probs packed vs padded" in names and f"{layout} loss packed vs padded" in names
        assert f"{layout} packed rows hold several pairs" in names
        assert sum(c["name"].startswith(f"{layout} grad ") for c in results if c["rank"] == 0) > 0
    for kind in ("chunked", "logits"):
        assert f"TP=1 DP=2 log-probs packed vs each sequence alone ({kind})" in names
    for layout in ("TP=1 DP=2", "TP=2", "PP=2"):  # the chunked head against the logits one, packed and padded
        for packed in ("", " packed"):
            assert f"{layout} log-probs chunked vs logits{packed}" in names
            assert f"{layout} chunked vs logits{packed} loss" in names
            assert sum(c["name"].startswith(f"{layout} chunked vs logits{packed} grad ") for c in results) > 0
    assert {"TP=2 chunked log-probs vs TP=1's", "PP=2 chunked log-probs vs TP=1's"} <= names
    grads = [c for c in results if " grad " in c["name"]]
    assert all(c["scale"] > 0 for c in grads), "a gradient is identically zero: the check is vacuous"


def _metrics(out):
    return [json.loads(x) for x in (out / "tensorboard" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.megatron
def test_sft_loss_packed_equals_padded(tiny, tmp_path):
    """`train --loss sft`, one process: the step-1 mean NLL and its token count with packing == without."""
    from megatron_inpo.data.preferences import read_preferences

    data = write_sft_data(tmp_path / "sft.jsonl", read_preferences(tiny / "train_pairs.jsonl"))
    got = {}
    for packing in ("true", "false"):
        out = tmp_path / f"sft_{packing}"
        proc = subprocess.run([PY, "-m", "megatron_inpo", "train", "--loss", "sft", "--data", str(data),
                               "--init-checkpoint", str(tiny / "init_ckpt"), "--output-dir", str(out),
                               "--train.global-batch-size", "8", "--train.micro-batch-size", "2",
                               "--train.train-iters", "1", "--train.max-seq-len", "32", "--train.lr", "1e-3",
                               "--train.warmup-ratio", "0", "--megatron.model.precision", "fp32",
                               "--megatron.packing", packing, "--progress", "false"],
                              cwd=REPO, capture_output=True, text=True, timeout=240,
                              env={**os.environ, "MASTER_PORT": str(next(PORTS)), "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-5000:]
        got[packing] = _metrics(out)[0]
    assert got["true"]["tokens"] == got["false"]["tokens"] > 0
    assert got["true"]["loss"] == pytest.approx(got["false"]["loss"], rel=1e-6)
    assert got["true"]["grad_norm"] == pytest.approx(got["false"]["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.megatron
def test_sigkill_and_resume_with_packing_matches_uninterrupted(tiny, tmp_path):
    """DP=2, distributed optimizer, packed rows of 24 tokens: killed (SIGKILL, launcher and workers) after the
    checkpoint of step 3 and resumed == the uninterrupted run, loss / grad norm / lr at every step, exactly (same
    layout, same arithmetic: the rows of a step are a pure function of (seed, step))."""

    def args(out):
        return ["-m", "megatron_inpo", "train", "--data", str(tiny / "train_pairs.jsonl"), "--init-checkpoint",
                str(tiny / "init_ckpt"), "--output-dir", str(out), "--train.global-batch-size", "4",
                "--train.micro-batch-size", "1", "--train.train-iters", "6", "--train.save-interval", "1",
                "--train.max-seq-len", "24", "--train.lr", "1e-3", "--train.warmup-ratio", "0",
                "--train.keep-checkpoints", "3", "--megatron.parallel.use-distributed-optimizer", "true",
                "--megatron.packing", "true", "--megatron.model.precision", "fp32", "--progress", "false"]

    full, cut = tmp_path / "full", tmp_path / "cut"
    proc = torchrun(2, args(full), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    want = [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in _metrics(full)]
    assert [s for s, *_ in want] == list(range(1, 7))
    assert len({round(l, 6) for _, l, _, _ in want}) == 6, "losses do not move: the comparison would be vacuous"

    kill_training_at(args(cut), cut, step=3)
    from megatron_inpo.engine.checkpoint import latest_checkpoint

    resumed_from = latest_checkpoint(cut / "checkpoints")
    assert resumed_from is not None and resumed_from.name < "step_00000006"
    proc = torchrun(2, args(cut), timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert f"resuming from {resumed_from}" in proc.stdout
    got = [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in _metrics(cut)]
    assert got == want


@pytest.mark.slow
@pytest.mark.megatron
def test_bench_lengths_file_prints_packed_and_padded(tmp_path):
    """tools/bench_train.py --lengths FILE: the three ways on the same pairs and their ratios (tiny shapes, one
    timed step: the figures are not checked here, only what is printed)."""
    lengths = tmp_path / "lengths.jsonl"
    lengths.write_text('{"prompt_len": 3, "chosen_len": 10, "rejected_len": 4}\n[5, 20, 30]\n[2, 1, 1]\n')
    proc = subprocess.run([PY, "tools/bench_train.py", "--lengths", str(lengths), "--layers", "1", "--hidden", "64",
                           "--heads", "4", "--groups", "2", "--ffn", "128", "--vocab", "256", "--seq", "64",
                           "--global-batch", "4", "--pairs", "8", "--steps", "1", "--warmup", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MASTER_PORT": str(next(PORTS)), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r.get("way", "config"): r for r in (json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{"))}
    assert set(rows) == {"config", "packed", "padded", "padded_step_max", "ratio"}
    assert rows["packed"]["pad_fraction"] < rows["padded"]["pad_fraction"] <= rows["padded_step_max"]["pad_fraction"]
    assert rows["ratio"]["real_tokens_per_s_packed_over_padded"] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[5, 70, 30]\n")
    proc = subprocess.run([PY, "tools/bench_train.py", "--lengths", str(bad), "--seq", "64"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MASTER_PORT": str(next(PORTS))})
    assert proc.returncode != 0 and "bad.jsonl:1" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA; not yet run on a GPU: no device machine was lent while this was written)


def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.megatron
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec,precision,tol", [("local", "fp32", 1e-6), ("te", "bf16", 5e-2)])
def test_gpu_logprobs_packed_equal_padded(tiny, tmp_path, spec, precision, tol):
    """The log-prob CLI on one GPU, packed vs padded: the local spec in fp32 (relative per sequence, as on CPU) and
    the TE spec's THD varlen attention in bf16 (absolute per sequence; both runs bf16, kernels differ)."""
    if spec == "te" and not _te_importable():
        pytest.skip("Transformer Engine does not import here")
    from megatron_inpo.data.preferences import read_preferences

    write_pairs(tmp_path / "pairs.jsonl", make_pairs(12, 100, seed=5, with_logps=False))
    got = {}
    for packing in ("true", "false"):
        out = tmp_path / f"lp_{packing}.jsonl"
        proc = subprocess.run([PY, "-m", "megatron_inpo", "logprobs", "--data", str(tmp_path / "pairs.jsonl"),
                               "--output", str(out), "--ref-checkpoint", str(tiny / "init_ckpt"),
                               "--megatron.model.layer-spec", spec, "--megatron.model.precision", precision,
                               "--megatron.packing", packing, "--logprobs.micro-batch-size", "2", "--progress",
                               "false"], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "MASTER_PORT": str(next(PORTS))})
        assert proc.returncode == 0, proc.stderr[-5000:]
        got[packing] = torch.tensor([[p.ref_chosen_logp, p.ref_rejected_logp] for p in read_preferences(out)],
                                    dtype=torch.float64)
    diff = (got["true"] - got["false"]).abs()
    if precision == "fp32":
        diff = diff / got["false"].abs().clamp(min=1.0)
    assert diff.max() <= tol, diff.max()


@pytest.mark.gpu
@pytest.mark.megatron
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bench_packed_vs_padded_runs():
    """`bench_train.py --lengths lognormal` on the GPU (small shapes): prints the ratio (the 1.7B figure is the
    device check's to measure: `--preset gpu-1.7b --lengths lognormal`)."""
    proc = subprocess.run([PY, "tools/bench_train.py", "--lengths", "lognormal", "--layers", "2", "--hidden", "256",
                           "--heads", "8", "--groups", "4", "--ffn", "512", "--vocab", "4096", "--seq", "256",
                           "--steps", "2", "--warmup", "1"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MASTER_PORT": str(next(PORTS))})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert '"way": "ratio"' in proc.stdout
