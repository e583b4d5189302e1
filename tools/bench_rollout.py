#!/usr/bin/env python
"""Rollout + judging throughput, as ratios against baselines run in the same process.

1. Generation: the in-process engine (per-sequence counter-based random numbers, our KV-cache loop) against
   transformers' `model.generate(do_sample=True)` on the same model, prompts and lengths (ignore_eos, so equal
   token counts).
2. Judging: the tournament (3K/2 - 1 comparisons) against SPPO's all-pairs estimate (K(K-1)/2) with an
   in-process pairwise PM, wall time and comparisons for the same rollouts.

  .venv/bin/python tools/bench_rollout.py [--hidden 256 --layers 4 --prompts 16 --k 8 --new 32 --device cpu]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.helpers


def build(path: Path, hidden: int, layers: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers.rollout import BOS, EOS, PAD, make_tokenizer

    tok = make_tokenizer(path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=2048, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(str(path))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--judge-prompts", type=int, default=4)
    args = ap.parse_args()

    from megatron_inpo.data.prompts import PromptRecord
    from megatron_inpo.judge import JudgeConfig, build_preferences, make_judge
    from megatron_inpo.rollout import RolloutConfig, SamplingConfig, make_engine

    tmp = Path(tempfile.mkdtemp())
    build(tmp / "policy", args.hidden, args.layers, 0)
    build(tmp / "pm", args.hidden, args.layers, 1)
    cfg = RolloutConfig(backend="local", model_path=str(tmp / "policy"), device=args.device, dtype=args.dtype,
                        max_batch_sequences=args.prompts * args.k,
                        sampling=SamplingConfig(n=args.k, max_new_tokens=args.new, ignore_eos=True, seed=0))
    eng = make_engine(cfg)
    prompts = [PromptRecord(id=str(i), prompt=f"Question number {i}: what is {i} plus {i}?")
               for i in range(args.prompts)]
    ids = eng.tokenize(prompts)
    L = max(len(x) for x in ids)
    batch = torch.full((len(ids), L), 0, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for r, x in enumerate(ids):
        batch[r, L - len(x):] = torch.tensor(x)
        mask[r, L - len(x):] = 1
    batch, mask = batch.to(args.device), mask.to(args.device)
    gen_kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new,
                  min_new_tokens=args.new, num_return_sequences=args.k, pad_token_id=0)

    def ours() -> tuple[float, int, list]:
        t0 = time.perf_counter()
        rs = eng.rollout(prompts)
        return time.perf_counter() - t0, sum(len(c.token_ids) for r in rs for c in r.completions), rs

    def hf() -> tuple[float, int]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = eng.model.generate(input_ids=batch, attention_mask=mask, **gen_kw)
            return time.perf_counter() - t0, (out.shape[1] - L) * out.shape[0]

    eng.rollout(prompts[:2])  # warm-up both
    with torch.inference_mode():
        eng.model.generate(input_ids=batch[:2], attention_mask=mask[:2], **gen_kw)
    # alternate the two and keep each one's best run: the machine may be shared, the ratio is what counts
    ours_runs, hf_runs = [], []
    for _ in range(args.repeats):
        ours_runs.append(ours())
        hf_runs.append(hf())
    o_s, o_tok, rollouts = min(ours_runs, key=lambda r: r[0])
    h_s, h_tok = min(hf_runs)
    print(f"device {args.device}, model hidden {args.hidden} x {args.layers} layers, "
          f"{args.prompts} prompts x K={args.k}, {args.new} new tokens, best of {args.repeats}")
    print(f"generation  ours: {o_tok / o_s:10.1f} tokens/s ({args.prompts / o_s:.2f} prompts/s)")
    print(f"generation  transformers.generate: {h_tok / h_s:10.1f} tokens/s")
    print(f"generation  ratio ours / transformers = {(o_tok / o_s) / (h_tok / h_s):.2f}")

    judge = make_judge(JudgeConfig(kind="pairwise", model_path=str(tmp / "pm"), device=args.device,
                                   dtype=args.dtype, batch_size=64))
    sub = rollouts[:args.judge_prompts]
    res: dict[str, list] = {"tournament": [], "all_pairs": []}
    for _ in range(args.repeats):
        for method in res:
            t0 = time.perf_counter()
            pairs, dropped, stats = build_preferences(sub, judge, method)
            res[method].append((time.perf_counter() - t0, stats["comparisons"], len(pairs)))
    best = {m: min(v) for m, v in res.items()}
    for m, (s_, c, n) in best.items():
        print(f"judge {m:<10}: {c:5d} comparisons ({c // len(sub)} per prompt), {s_:7.2f} s, {n} pairs kept")
    print(f"judge ratio all_pairs / tournament time = {best['all_pairs'][0] / best['tournament'][0]:.2f} "
          f"(comparisons {best['all_pairs'][1] / best['tournament'][1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
