"""torchrun worker of tests/engine/test_packing.py: packed == padded at TP=1 (DP=2), TP=2 and PP=2, fp32; and the
chunked log-probs (engine/head.py, the default) == the full logits' (the reference path), packed and padded.

    torchrun --nproc-per-node 2 -m tests.engine.packing_worker OUT_DIR
        reads OUT_DIR/init_ckpt (a converted tiny Llama); per layout: the log-prob pass (compute_role_logps, every
        pair's chosen / rejected sums) padded vs packed, and one INPO step through run_schedule (loss, metrics and
        this rank's gradient shards) padded vs packed, each with the chunked head and with the logits head; the
        chunked log-probs of TP=2 and PP=2 against TP=1's. Rank 0 writes OUT_DIR/results_packing.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.helpers.engine import TINY_HF, make_pairs
from tests.helpers.engine_worker import CHECKS, check, engine, objective, setup, unwrap

# Per sequence, relative to max(1, |log-prob|) (|log-prob| up to 42 nats here). A packed row computes each sequence
# exactly as it would alone (checked bit for bit at TP=1); the padded path runs every sequence at the padded
# length, and torch's CPU SDPA kernel rounds a softmax over 16 keys (10 of them masked) differently from one over
# 10 keys: measured up to 1.43e-6 absolute = 3.4e-8 relative, less than one float32 ulp of a 42-nat sum (3.8e-6).
# Sums run in float64 on both paths. A leak of attention across sequences, a position not restarted or a token
# credited to the wrong sequence is off by whole nats.
LOGP_TOL = 1e-6
# Relative: the INPO loss (~1e4: (h - 1/(2 eta))^2 with 1/(2 eta) = 100) and each gradient tensor against its
# largest entry; the same float32 rounding of the padded batch as above, through the backward.
LOSS_TOL = 1e-6
GRAD_TOL = 1e-6
# Chunked vs logits (MegatronConfig.logps): the same float32 logits per token (the head's GEMM on fewer rows) and
# the same three reductions per token; relative per sequence as above, and per gradient tensor against its largest
# entry. Chunks of 8 tokens, so every row spans several chunks.
HEAD_TOL = 1e-6
CHUNK = 8
LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (TP, PP); DP = 2 / (TP x PP)


def label(tp: int, pp: int) -> str:
    return f"TP={tp}" if tp > 1 else f"PP={pp}" if pp > 1 else "TP=1 DP=2"


def head(vocab, kind):
    from megatron_inpo.engine.step import OutputHead

    return OutputHead(vocab, kind, CHUNK)


def logps(model, pairs, vocab, packing: bool, kind: str = "chunked") -> torch.Tensor:
    from megatron_inpo.engine.logprobs import compute_role_logps

    values, _ = compute_role_logps("ref", pairs, model, head(vocab, kind), micro_batch_size=2, chunk_pairs=16,
                                   store=None, pad_multiple=8, packing=packing)
    return torch.tensor(values, dtype=torch.float64)


def alone(model, pairs, vocab, kind: str) -> torch.Tensor:
    """Each sequence in a batch of its own, no padding (TP=1, PP=1: a plain model call) through the `kind` head."""
    from megatron_inpo.engine.batches import make_sequence_batch
    from megatron_inpo.engine.step import sequence_sums

    h = head(vocab, kind)
    out = []
    with torch.no_grad(), h.applied([model]):
        for p in pairs:
            row = []
            for resp in (p.chosen_ids, p.rejected_ids):
                b = make_sequence_batch([(p.prompt_ids, resp)])
                output = model(b.tokens, b.position_ids, attention_mask=None)
                row.append(float(sequence_sums(h.token_logps(model, output, b.labels), b)[0]))
            out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def step(model, pairs, vocab, packing: bool, rt, kind: str = "chunked") -> tuple[dict, dict, list]:
    from megatron.core import parallel_state as ps

    from megatron_inpo.engine.batches import plan_step, step_items
    from megatron_inpo.engine.step import global_metrics, make_loss, run_schedule

    idx = step_items(0, len(pairs), 8, seed=7, shuffle=True)
    batches = plan_step(pairs, idx, packing=packing, micro_batch_size=2, capacity=40, dp_size=rt.dp_size,
                        dp_rank=ps.get_data_parallel_rank(), pad_multiple=8,
                        uniform=ps.get_pipeline_model_parallel_world_size() > 1)
    loss = make_loss("preference", objective(), pairs)
    model[0].zero_grad_buffer()
    run_schedule(model, batches, loss, head(vocab, kind), rt.device)
    metrics = global_metrics(loss, rt.device)
    grads = {k: p.main_grad.detach().clone() for k, p in unwrap(model[0]).named_parameters()}
    return metrics, grads, batches


def scenario(out: Path) -> None:
    from megatron_inpo.engine.policy import wrap_ddp

    vocab = TINY_HF["vocab_size"]
    pairs = make_pairs(16, vocab, seed=3)
    one_process = None
    rel = lambda a, b: (a - b) / b.abs().clamp(min=1.0)  # noqa: E731
    for tp, pp in LAYOUTS:
        name = label(tp, pp)
        rt, built = setup(tp, pp, out / "init_ckpt")
        padded, packed = logps([built.model], pairs, vocab, False), logps([built.model], pairs, vocab, True)
        check(f"{name} log-probs packed vs padded", rel(packed, padded), torch.zeros_like(padded), LOGP_TOL)
        for packing, chunked in ((False, padded), (True, packed)):
            ref = logps([built.model], pairs, vocab, packing, "logits")
            check(f"{name} log-probs chunked vs logits{' packed' if packing else ''}", rel(chunked, ref),
                  torch.zeros_like(ref), HEAD_TOL)
        if tp == 1 and pp == 1:
            one_process = packed
            # bit for bit through the logits head; the chunked head's GEMMs run on chunks of other sizes alone
            # (torch's CPU GEMM rounds a few-row product differently), so to LOGP_TOL there
            for kind, tol in (("logits", 1e-9), ("chunked", LOGP_TOL)):
                got, want = logps([built.model], pairs, vocab, True, kind), alone(built.model, pairs, vocab, kind)
                check(f"{name} log-probs packed vs each sequence alone ({kind})", rel(got, want),
                      torch.zeros_like(want), tol)
        else:
            check(f"{name} chunked log-probs vs TP=1's", rel(packed, one_process), torch.zeros_like(packed), HEAD_TOL)
        model = wrap_ddp(built.model, engine(tp, pp), "fp32")
        m_pad, g_pad, b_pad = step(model, pairs, vocab, False, rt)
        m_pk, g_pk, b_pk = step(model, pairs, vocab, True, rt)
        for packing, (m_c, g_c) in ((False, (m_pad, g_pad)), (True, (m_pk, g_pk))):
            m_l, g_l, _ = step(model, pairs, vocab, packing, rt, "logits")
            what = f"{name} chunked vs logits{' packed' if packing else ''}"
            check(f"{what} loss", torch.tensor(m_c["loss"]), torch.tensor(m_l["loss"]), HEAD_TOL, relative=True)
            for k, g in g_l.items():
                check(f"{what} grad {k}", g_c[k], g, HEAD_TOL, relative=True)
        # the check is not vacuous: the packed step really packs several pairs per row and pads less
        rows_hold_pairs = all(b.packed for b in b_pk) and max(b.num_pairs for b in b_pk) >= 2
        check(f"{name} packed rows hold several pairs", torch.tensor(float(rows_hold_pairs)), torch.tensor(1.0), 0)
        for k in ("loss", "h_mean", "h_std", "margin"):
            check(f"{name} {k} packed vs padded", torch.tensor(m_pk[k]), torch.tensor(m_pad[k]), LOSS_TOL,
                  relative=True)
        for k, g in g_pad.items():
            check(f"{name} grad {k}", g_pk[k], g, GRAD_TOL, relative=True)


def main() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out = Path(sys.argv[1])
    scenario(out)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, CHECKS)
    if dist.get_rank() == 0:
        flat = [c for part in gathered for c in part]
        (out / "results_packing.json").write_text(json.dumps(flat, indent=1))
        print(f"{len(flat)} checks, {sum(not c['ok'] for c in flat)} failed", flush=True)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
