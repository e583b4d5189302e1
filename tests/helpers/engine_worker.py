"""torchrun worker of the engine tests: several scenarios per launch (each launch costs seconds on 2 cores).

    torchrun --nproc-per-node 2 -m tests.helpers.engine_worker parity OUT_DIR
        single-process reference (plain autograd, TP=1 PP=1, whole global batch) vs Megatron's schedule at
        DP=2, TP=2, PP=2: loss and every gradient; log-probs vs transformers; distributed vs plain optimizer;
        optimizer state saved and loaded gives back the master weights; a checkpoint saved at TP=2 (with
        optimizer) loads at TP=1 and PP=2 with the same logits. All of it in fp32 and in bf16 (check names start
        with the precision).
        Reads OUT_DIR/hf (a transformers model) and OUT_DIR/init_ckpt (the converter's output of it, at TP=2);
        writes OUT_DIR/pairs.jsonl and OUT_DIR/train_pairs.jsonl for the CLI tests.
    torchrun --nproc-per-node 4 -m tests.helpers.engine_worker tp2pp2 OUT_DIR
        TP=2 x PP=2 loss and gradients vs the single-process reference (same OUT_DIR inputs), fp32 and bf16.

Every check is recorded as {name, rank, err, tol, ok}; rank 0 writes OUT_DIR/results_<scenario>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tests.helpers.engine import PARITY_TOL, TINY_HF, hf_pair_logps, make_pairs, write_pairs

CHECKS: list[dict] = []
G, MBS = 8, 2  # global batch (pairs), micro-batch (pairs)
PRECISIONS = tuple(PARITY_TOL)  # ("fp32", "bf16"): every check runs in both, in the same launch
TOL = PARITY_TOL  # per precision, with the reasons and measured errors in tests/helpers/engine.py


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, relative: bool = False) -> None:
    import torch.distributed as dist

    got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
    if got.shape != want.shape:
        CHECKS.append(dict(name=name, rank=dist.get_rank(), err=float("inf"), tol=tol, ok=False,
                           note=f"shape {tuple(got.shape)} vs {tuple(want.shape)}"))
        return
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if relative:
        err /= max(want.abs().max().item(), 1e-12)
    rec = dict(name=name, rank=dist.get_rank(), err=err, tol=tol, ok=bool(err <= tol),
               scale=want.abs().max().item() if want.numel() else 0.0)
    if got.numel() == 1:
        rec.update(got=got.item(), want=want.item())
    CHECKS.append(rec)


def objective():
    from megatron_inpo.objectives import ObjectiveConfig

    return ObjectiveConfig(name="inpo", eta=0.005, tau=0.005 / 3)


def engine(tp: int = 1, pp: int = 1, precision: str = "fp32", use_distributed_optimizer: bool = False):
    from megatron_inpo.engine.config import MegatronConfig, MegatronModelConfig, ParallelConfig

    return MegatronConfig(parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                use_distributed_optimizer=use_distributed_optimizer),
                        model=MegatronModelConfig(precision=precision, layer_spec="local"))


def optimizer_config():
    from megatron_inpo.engine.config import OptimizerConfig

    return OptimizerConfig(lr=1e-3, warmup_ratio=0.0, lr_decay_style="constant", clip_grad=0.0)


def setup(tp: int, pp: int, ckpt: Path, precision: str = "fp32"):
    from megatron_inpo.engine import checkpoint as C
    from megatron_inpo.engine.policy import build_policy, init_runtime

    eng = engine(tp, pp, precision)
    rt = init_runtime(eng, seed=1234)
    built = build_policy(TINY_HF, eng, rt, padded_vocab_size=C.read_meta(ckpt)["padded_vocab_size"])
    C.load_checkpoint(ckpt, [built.model], load_rng=False)
    return rt, built


def global_batch(pairs):
    from megatron_inpo.engine.batches import step_items

    return step_items(0, len(pairs), G, seed=7, shuffle=True)


def reference(pairs, init, vocab, precision="fp32"):
    """One process, plain autograd over the whole global batch at once (no schedule, no DDP), in `precision`."""
    from megatron_inpo.engine.batches import make_pair_batch
    from megatron_inpo.engine.step import frozen_columns, sequence_logps
    from megatron_inpo.objectives import PairLogps, compute_objective

    rt, built = setup(1, 1, init, precision)
    m = built.model
    idx = global_batch(pairs)
    b = make_pair_batch([pairs[i] for i in idx], indices=idx)
    lp = sequence_logps(m(b.tokens, b.position_ids, attention_mask=None), b, vocab)
    cols = frozen_columns([pairs[i] for i in idx], lp.device)
    loss, metrics = compute_objective(objective(), PairLogps(lp[:G], lp[G:], **cols), "mean")
    loss.backward()
    grads = {k: p.grad.detach().float() for k, p in m.named_parameters()}
    return float(loss), {k: float(v) for k, v in metrics.items()}, grads


def reference_sft(items, init, vocab, precision="fp32"):
    """SFT reference: mean NLL over all response tokens of the global batch, plain autograd, one process."""
    from megatron_inpo.engine.batches import make_sequence_batch
    from megatron_inpo.engine.step import token_logps

    rt, built = setup(1, 1, init, precision)
    m = built.model
    idx = global_batch(items)
    b = make_sequence_batch([(items[i].prompt_ids, items[i].response_ids) for i in idx], indices=idx)
    tok = token_logps(m(b.tokens, b.position_ids, attention_mask=None), b.labels, vocab)
    loss = -(tok * b.loss_mask).sum() / b.loss_mask.sum()
    loss.backward()
    return float(loss), {k: p.grad.detach().float() for k, p in m.named_parameters()}


def unwrap(chunk):
    """The GPTModel inside DDP (and Float16Module in bf16)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def schedule_step(tp, pp, ckpt, pairs, vocab, use_distributed_optimizer=False, opt_step=False, mode="preference",
                  precision="fp32"):
    """Megatron path: DDP (+ Float16Module in bf16) + get_forward_backward_func over micro-batches split across
    DP ranks."""
    from megatron.core import parallel_state as ps

    from megatron_inpo.engine.batches import item_length, make_batches, split_micro_batches
    from megatron_inpo.engine.optimizer import build_optimizer
    from megatron_inpo.engine.policy import wrap_ddp
    from megatron_inpo.engine.step import OutputHead, global_metrics, make_loss, run_schedule

    rt, built = setup(tp, pp, ckpt, precision)
    eng = engine(tp, pp, precision, use_distributed_optimizer)
    model = wrap_ddp(built.model, eng, precision)
    idx = global_batch(pairs)
    mbs = split_micro_batches(idx, [item_length(p) for p in pairs], MBS, rt.dp_size, ps.get_data_parallel_rank())
    loss = make_loss(mode, objective(), pairs)
    opt = sched = None
    if opt_step:
        opt, sched = build_optimizer(optimizer_config(), eng.parallel, model, precision, total_steps=10)
        opt.zero_grad()
    model[0].zero_grad_buffer()
    run_schedule(model, make_batches(pairs, mbs, 8), loss, OutputHead(vocab), rt.device)
    metrics = global_metrics(loss, rt.device)
    grads = {k: p.main_grad.detach().clone() for k, p in unwrap(model[0]).named_parameters()}
    if opt_step:
        opt.step()
    return rt, built, model, metrics, grads, opt, sched


def gather_tp(name: str, t: torch.Tensor, param) -> torch.Tensor:
    """Full tensor of a TP-sharded parameter (its gradient), in the TP=1 layout."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):  # each shard is [gate_i; up_i]
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


def global_name(name: str, n_local_layers: int) -> str:
    from megatron.core import parallel_state as ps

    if name.startswith("decoder.layers."):
        parts = name.split(".")
        parts[2] = str(int(parts[2]) + ps.get_pipeline_model_parallel_rank() * n_local_layers)
        return ".".join(parts)
    return name


def compare_grads(label, model, grads, ref_grads, vocab, tol=2e-5):
    inner = unwrap(model[0])
    params = dict(inner.named_parameters())
    n_local = len(inner.decoder.layers)
    for k, g in grads.items():
        full = gather_tp(k, g, params[k])
        ref = ref_grads[global_name(k, n_local)]
        if "word_embeddings" in k or "output_layer" in k:
            full, ref = full[:vocab], ref[:vocab]
        check(f"{label} grad {global_name(k, n_local)}", full, ref, tol, relative=True)


def logits_of(model_chunks, batch):
    """Full-vocab logits [b, s, V] on the last pipeline stage through the schedule (forward only); else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def fwd(it, chunk):
        b = next(it)
        out = chunk(b.tokens, b.position_ids, attention_mask=None)
        return out, lambda o: (o.sum() * 0, {"logits": gather_from_tensor_model_parallel_region(o).detach()})

    with torch.no_grad():
        store = get_forward_backward_func()(forward_step_func=fwd, data_iterator=iter([batch]), model=model_chunks,
                                            num_microbatches=1, seq_length=batch.seq_len,
                                            micro_batch_size=batch.tokens.shape[0], forward_only=True)
    return store[0]["logits"] if ps.is_pipeline_last_stage() else None


def scenario_parity(out: Path) -> None:
    """OUT_DIR holds hf/ (transformers) and init_ckpt/ (the converter's output of it, written at TP=2)."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out / "hf", attn_implementation="sdpa").eval()
    vocab = TINY_HF["vocab_size"]
    pairs = make_pairs(16, vocab, seed=3)
    for precision in ("bf16", "fp32"):  # fp32 last: its PP=2 model and checkpoint serve extra_state_checks
        rt, saved, model2, batch, want = parity_in(precision, out, hf, pairs, vocab)
    if rt.rank == 0:
        write_pairs(out / "pairs.jsonl", make_pairs(12, vocab, seed=5, with_logps=False))
        write_pairs(out / "train_pairs.jsonl", pairs)
    extra_state_checks(saved, model2, batch, want, TOL["fp32"]["logits"])


def masters(optimizer) -> torch.Tensor:
    """This rank's fp32 master weights (what torch's AdamW updates), flattened in the optimizer's order."""
    from megatron_inpo.engine.optimizer import torch_adams

    return torch.cat([p.detach().reshape(-1).float() for _, adam in torch_adams(optimizer)
                      for g in adam.param_groups for p in g["params"]])


def parity_in(precision: str, out: Path, hf, pairs, vocab):
    """Every parity check in one precision; names start with it ("fp32 TP=2 loss", "bf16 TP=2 loss", ...)."""
    from megatron_inpo.engine import checkpoint as C
    from megatron_inpo.engine.batches import SFTItem, make_pair_batch
    from megatron_inpo.engine.logprobs import forward_pair_logps
    from megatron_inpo.engine.step import OutputHead
    from megatron_inpo.engine.optimizer import build_optimizer

    tol = TOL[precision]
    P = precision
    init = out / "init_ckpt"
    ref_loss, ref_metrics, ref_grads = reference(pairs, init, vocab, precision)
    rt, built = setup(1, 1, init, precision)
    full = {k: v.detach().clone() for k, v in built.model.named_parameters()}
    hf_lp = torch.tensor(hf_pair_logps(hf, pairs[:6]))

    def check_logps(label, chunk):
        batches = [make_pair_batch(pairs[i:i + 2], indices=[i, i + 1], pad_to=24) for i in (0, 2, 4)]
        res = forward_pair_logps([chunk], batches, OutputHead(vocab))
        if res is not None:
            got = torch.cat([torch.stack([c, r], 1) for _, c, r in res])
            check(f"{P} {label} log-probs vs transformers", got, hf_lp, tol["logps"])

    for tp, pp, label in ((1, 1, "DP=2"), (2, 1, "TP=2"), (1, 2, "PP=2")):
        rt, built, model, metrics, grads, _, _ = schedule_step(tp, pp, init, pairs, vocab, precision=precision)
        check(f"{P} {label} loss", f64(metrics["loss"]), f64(ref_loss), tol["loss"], relative=True)
        for k in ("h_mean", "h_std", "accuracy", "margin"):
            check(f"{P} {label} metric {k}", f64(metrics[k]), f64(ref_metrics[k]), tol[f"metric {k}"])
        compare_grads(f"{P} {label}", model, grads, ref_grads, vocab, tol["grad"])
        check_logps(label, model[0].module)  # Float16Module in bf16: bf16 compute, fp32 output

    # SFT mode: mean NLL of response tokens, token-weighted over micro-batches and DP ranks.
    sft = [SFTItem(p.prompt_ids, p.chosen_ids if k % 2 else p.rejected_ids) for k, p in enumerate(pairs)]
    sft_loss, sft_grads = reference_sft(sft, init, vocab, precision)
    for tp, pp, label in ((1, 1, "SFT DP=2"), (2, 1, "SFT TP=2")):
        rt, built, model, metrics, grads, _, _ = schedule_step(tp, pp, init, sft, vocab, mode="sft",
                                                               precision=precision)
        check(f"{P} {label} loss", f64(metrics["loss"]), f64(sft_loss), tol["loss"], relative=True)
        compare_grads(f"{P} {label}", model, grads, sft_grads, vocab, tol["grad"])

    # Distributed optimizer == plain optimizer after one step (DP=2); its optimizer state, saved and loaded into
    # a freshly built optimizer, gives back this rank's fp32 master weights bit for bit.
    params = {}
    for dist_opt in (False, True):
        rt, built, model, _, _, opt, sched = schedule_step(1, 1, init, pairs, vocab, use_distributed_optimizer=dist_opt,
                                                           opt_step=True, precision=precision)
        params[dist_opt] = {k: p.detach().clone() for k, p in unwrap(model[0]).named_parameters()}
        kind = "distributed" if dist_opt else "plain"
        meta = {"hf_config": TINY_HF, "padded_vocab_size": 128, "layer_spec": "local"}
        saved = C.save_checkpoint(out / f"ckpts_{P}_{kind}", 1, model, meta, opt, sched, {"step": 1})
        stepped = masters(opt)
        rt, built, model3, _, _, _, _ = schedule_step(1, 1, init, pairs, vocab, use_distributed_optimizer=dist_opt,
                                                      precision=precision)
        opt3, sched3 = build_optimizer(optimizer_config(), engine(precision=precision,
                                       use_distributed_optimizer=dist_opt).parallel, model3, precision, 10)
        C.load_checkpoint(saved, model3, opt3, sched3)
        check(f"{P} {kind} optimizer resume: master weights restored exactly", masters(opt3), stepped, 0)
        if precision == "bf16":  # the masters hold more than the bf16 weights: a refresh from them would lose it
            check(f"{P} {kind} optimizer: fp32 masters finer than the bf16 weights",
                  torch.tensor(float(_masters_finer(opt))), torch.tensor(1.0), 0)
    moved = max((params[False][k].float() - full[k].float()).abs().max().item() for k in params[False])
    check(f"{P} optimizer step moved the weights (> 1e-4)", torch.tensor(float(moved > 1e-4)), torch.tensor(1.0), 0)
    for k in params[False]:
        check(f"{P} distributed optimizer param {k}", params[True][k], params[False][k], tol["optimizer"])

    # Checkpoint saved at TP=2 (after a step, with optimizer) -> TP=1 and PP=2: the same logits (fp32: to rounding;
    # bf16: the bf16 weights load exactly, the TP reductions round in another order).
    rt, built, model, _, _, opt, sched = schedule_step(2, 1, init, pairs, vocab, opt_step=True, precision=precision)
    meta = {"hf_config": TINY_HF, "padded_vocab_size": 128, "layer_spec": "local"}
    saved = C.save_checkpoint(out / ("ckpts" if P == "fp32" else f"ckpts_{P}"), 1, model, meta, opt, sched,
                              {"step": 1})
    batch = make_pair_batch(pairs[:4], indices=range(4), pad_to=24)
    want = logits_of(model, batch)
    for tp, pp, label in ((1, 1, "TP=1"), (1, 2, "PP=2")):
        rt, built, model2, _, _, _, _ = schedule_step(tp, pp, init, pairs, vocab, opt_step=False,
                                                      precision=precision)
        opt2, sched2 = build_optimizer(optimizer_config(), engine(precision=precision).parallel, model2,
                                       precision, 10)
        C.load_checkpoint(saved, model2, opt2, sched2)
        got = logits_of(model2, batch)
        if got is not None:
            check(f"{P} TP=2 checkpoint -> {label} logits", got, want, tol["logits"])
    check(f"{P} latest_checkpoint finds it", torch.tensor(float(C.latest_checkpoint(saved.parent) == saved)),
          torch.tensor(1.0), 0)
    return rt, saved, model2, batch, want


def _masters_finer(optimizer) -> bool:
    """Whether some fp32 master weight of this rank is not a bf16 number (so it carries information the bf16 model
    weights lack)."""
    m = masters(optimizer)
    return bool((m.to(torch.bfloat16).float() != m).any())


def extra_state_checks(saved, model2, batch, want, tol: float) -> None:
    """A model whose modules carry TE's `_extra_state` (with TE installed even the final norm is TE's) loads a
    checkpoint that holds none; a key that is not `_extra_state` and not in the checkpoint is a clear error.
    (Precision does not enter: run once, on the fp32 PP=2 model and TP=2 checkpoint.)"""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    from megatron_inpo.engine import checkpoint as C

    real = C._model_sharded
    extra = {"decoder.final_layernorm._extra_state": lambda: ShardedObject(
        "decoder.final_layernorm._extra_state", None, (1,), (0,), replica_id=0)}
    last = ps.is_pipeline_last_stage()  # the final norm lives on the last stage only
    C._model_sharded = lambda chunks: {**real(chunks), **({k: f() for k, f in extra.items()} if last else {})}
    try:
        C.load_checkpoint(saved, model2, load_rng=False)  # model2: the PP=2 model above
        got = logits_of(model2, batch)
        if got is not None:
            check("TE _extra_state absent from the checkpoint: loads, same logits", got, want, tol)
        extra["decoder.stray_weight"] = lambda: ShardedTensor.from_rank_offsets(
            "decoder.stray_weight", torch.zeros(3), replica_id=(0, 0, 0))
        try:
            C.load_checkpoint(saved, model2, load_rng=False)
            named = False
        except C.CheckpointError as e:
            named = "decoder.stray_weight" in str(e) and str(saved) in str(e)
        if last:  # the stage that asks for the stray key is the one that fails (and so ends the job)
            check("a weight absent from the checkpoint: CheckpointError naming it", torch.tensor(float(named)),
                  torch.tensor(1.0), 0)
    finally:
        C._model_sharded = real


def scenario_tp2pp2(out: Path) -> None:
    vocab = TINY_HF["vocab_size"]
    pairs = make_pairs(16, vocab, seed=3)
    init = out / "init_ckpt"
    for precision in PRECISIONS:
        tol = TOL[precision]
        ref_loss, ref_metrics, ref_grads = reference(pairs, init, vocab, precision)
        rt, built, model, metrics, grads, _, _ = schedule_step(2, 2, init, pairs, vocab, precision=precision)
        check(f"{precision} TP=2xPP=2 loss", f64(metrics["loss"]), f64(ref_loss), tol["loss"], relative=True)
        compare_grads(f"{precision} TP=2xPP=2", model, grads, ref_grads, vocab, tol["grad"])


def main() -> None:
    import torch.distributed as dist

    scenario, out = sys.argv[1], Path(sys.argv[2])
    {"parity": scenario_parity, "tp2pp2": scenario_tp2pp2}[scenario](out)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, CHECKS)
    if dist.get_rank() == 0:
        flat = [c for part in gathered for c in part]
        (out / f"results_{scenario}.json").write_text(json.dumps(flat, indent=1))
        bad = [c for c in flat if not c["ok"]]
        print(f"{len(flat)} checks, {len(bad)} failed", flush=True)
        for c in bad:
            print("FAIL", c, flush=True)
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
