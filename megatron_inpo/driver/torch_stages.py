"""Reference implementations of the policy stages in plain transformers / torch, in-process, on HF directories.

Used for (1) the prototype that chose the tiny recipe's hyperparameters, (2) `trainer: torch` runs (a CPU demo or a
fallback when Megatron-Core is unavailable), and (3) cross-checking the Megatron stages. They follow the same
contracts as the Megatron stages: the log-prob pass fills the four *_logp columns of the preference JSONL; training
reads it, uses the objective registry of megatron_inpo.objectives, writes an HF directory atomically and resumes
from a step checkpoint (model + optimizer + scheduler + data position) exactly.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch

from megatron_inpo.engine.config import TrainConfig
from megatron_inpo.files import atomic_directory, atomic_write_bytes, atomic_write_json


def load_model(path: str | Path):
    from transformers import AutoModelForCausalLM

    from megatron_inpo.engine.trust import verify_export

    verify_export(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def _batch(seqs: Sequence[tuple[list[int], list[int]]], pad_id: int = 0):
    """Right-padded tokens, labels (next token) and a mask over response-token predictions."""
    L = max(len(p) + len(r) for p, r in seqs)
    B = len(seqs)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(seqs):
        ids = list(p) + list(r)
        tokens[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        mask[i, len(p) - 1 : len(ids) - 1] = 1.0  # position k predicts token k+1: response tokens only
    return tokens, attn, mask


def hf_token_logps(model, seqs: Sequence[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every next token [B, L-1] (float32) and the mask of the response-token predictions."""
    tokens, attn, mask = _batch(seqs)
    logits = model(input_ids=tokens, attention_mask=attn).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1), mask


def hf_sequence_logps(model, seqs: Sequence[tuple[list[int], list[int]]]) -> torch.Tensor:
    """Sum of response-token log-probs of each (prompt_ids, response_ids) [B] (float32)."""
    lp, mask = hf_token_logps(model, seqs)
    return (lp * mask).sum(-1)


@torch.no_grad()
def compute_logps(data: str | Path, output: str | Path, ref_dir: str | Path, last_dir: str | Path | None,
                  batch_pairs: int = 64) -> int:
    """Write `output` = `data` with ref_* and last_* log-prob columns (last = ref when last_dir is None)."""
    from megatron_inpo.data.preferences import read_preferences

    pairs = read_preferences(data)
    cols: dict[str, list[float]] = {}
    roles = [("ref", ref_dir)] + ([("last", last_dir)] if last_dir else [])
    for role, path in roles:
        model = load_model(path).eval()
        ch, rj = [], []
        for s in range(0, len(pairs), batch_pairs):
            chunk = pairs[s : s + batch_pairs]
            lp = hf_sequence_logps(model, [(p.prompt_ids, p.chosen_ids) for p in chunk]
                                + [(p.prompt_ids, p.rejected_ids) for p in chunk])
            ch += lp[: len(chunk)].tolist()
            rj += lp[len(chunk):].tolist()
        cols[f"{role}_chosen"], cols[f"{role}_rejected"] = ch, rj
    if "last_chosen" not in cols:
        cols["last_chosen"], cols["last_rejected"] = cols["ref_chosen"], cols["ref_rejected"]
    lines = []
    for i, p in enumerate(pairs):
        p.ref_chosen_logp, p.ref_rejected_logp = cols["ref_chosen"][i], cols["ref_rejected"][i]
        p.last_chosen_logp, p.last_rejected_logp = cols["last_chosen"][i], cols["last_rejected"][i]
        lines.append(p.to_json() + "\n")
    atomic_write_bytes(output, "".join(lines).encode())
    return len(pairs)


def _schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    prog = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))


class StageInterrupted(RuntimeError):
    """stop_after_steps reached (tests of interrupted runs)."""


def train_hf(init_dir: str | Path, out_dir: str | Path, n_items: int,
             loss_fn: Callable[[torch.nn.Module, list[int]], tuple[torch.Tensor, dict]],
             schedule: TrainConfig, seed: int, log: Callable[[int, dict], None] | None = None) -> dict:
    """A resumable AdamW loop with a cosine schedule, as `schedule` (engine.config.TrainConfig) sets it: lr,
    min_lr, warmup_ratio, weight_decay, Adam betas / eps, clip_grad, global_batch_size, epochs, stop_after_steps.
    Writes `out_dir/model` (HF dir) and `out_dir/result.json`.

    `loss_fn(model, item_indices)` returns the mean loss over those items and float metrics. A step checkpoint
    (`out_dir/resume.pt`: model, optimizer, step) is written after every step (or every save_interval steps);
    re-running resumes it. The data order is the engine's (engine.batches.step_items).
    """
    from megatron_inpo.engine.batches import step_items

    args = schedule
    save_interval = max(1, args.save_interval)
    out_dir = Path(out_dir)
    result_path = out_dir / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = load_model(init_dir).train()
    per_epoch = n_items // args.global_batch_size
    if per_epoch < 1:
        raise ValueError(f"{n_items} training items, fewer than one global batch ({args.global_batch_size})")
    total = per_epoch * args.epochs
    warmup = int(round(args.warmup_ratio * total))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps)
    min_ratio = args.min_lr / args.lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup, min_ratio))
    start = 0
    resume = out_dir / "resume.pt"
    if resume.exists():
        state = torch.load(resume, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["step"]
    metrics: dict = {}
    done_here = 0
    for step in range(start, total):
        idx = step_items(step, n_items, args.global_batch_size, seed, shuffle=True)
        opt.zero_grad(set_to_none=True)
        loss, metrics = loss_fn(model, idx)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad if args.clip_grad > 0 else 1e9)
        metrics = {"loss": float(loss.detach()), "grad_norm": float(gn), "lr": sched.get_last_lr()[0], **metrics}
        opt.step()
        sched.step()
        if log is not None:
            log(step + 1, metrics)
        done_here += 1
        if (step + 1) % save_interval == 0 and step + 1 < total:
            import io

            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "step": step + 1}, buf)
            atomic_write_bytes(resume, buf.getvalue())
        if args.stop_after_steps and done_here >= args.stop_after_steps and step + 1 < total:
            raise StageInterrupted(f"stopped after {done_here} steps (step {step + 1} of {total})")
    model_dir = out_dir / "model"
    with atomic_directory(model_dir, overwrite=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in Path(init_dir).iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy2(f, tmp / f.name)
    result = {"model_dir": str(model_dir), "steps": total, "metrics": metrics, "resumed_from_step": start}
    atomic_write_json(result_path, result)
    if resume.exists():
        os.unlink(resume)
    return result


def sft_loss_fn(items: list[tuple[list[int], list[int]]]):
    def fn(model, idx):
        lp, mask = hf_token_logps(model, [items[i] for i in idx])
        nll = -(lp * mask).sum() / mask.sum()
        return nll, {}
    return fn


def preference_loss_fn(pairs, objective):
    from megatron_inpo.objectives import PairLogps, compute_objective

    def col(ps, name):
        v = [getattr(p, name) for p in ps]
        return torch.tensor(v, dtype=torch.float64) if None not in v else None

    def fn(model, idx):
        ps = [pairs[i] for i in idx]
        lp = hf_sequence_logps(model, [(p.prompt_ids, p.chosen_ids) for p in ps]
                            + [(p.prompt_ids, p.rejected_ids) for p in ps]).double()
        B = len(ps)
        logps = PairLogps(policy_chosen=lp[:B], policy_rejected=lp[B:],
                          ref_chosen=col(ps, "ref_chosen_logp"), ref_rejected=col(ps, "ref_rejected_logp"),
                          last_chosen=col(ps, "last_chosen_logp"), last_rejected=col(ps, "last_rejected_logp"),
                          chosen_winrate=col(ps, "chosen_winrate"), rejected_winrate=col(ps, "rejected_winrate"))
        loss, m = compute_objective(objective, logps)
        return loss, {k: float(v) for k, v in m.items()}
    return fn
