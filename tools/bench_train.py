"""Benchmark of the INPO training step: megatron-inpo's engine vs transformers LlamaForCausalLM (sdpa), same run.

    python tools/bench_train.py                      # CPU: a small Llama, fp32
    python tools/bench_train.py --preset gpu-1.7b     # one GPU: the 1.7B-class config of shared/bench/gpu_baseline.py
    python tools/bench_train.py --preset gpu-1.7b --fp8 hybrid   # engine with Transformer Engine FP8
    python tools/bench_train.py --preset smollm2-135m --profile  # + where each one's step time goes

Both implementations run the same INPO step on the same synthetic pairs: per-sequence sums of response-token
log-probs of micro_batch pairs (2 x micro_batch sequences of --seq tokens), the INPO loss, backward and an AdamW
step. Engine: Megatron-Core GPTModel + DDP + Megatron optimizer through get_forward_backward_func (the exact
training code path, engine/step.py run_schedule). Baseline: transformers with torch.optim.AdamW. Each runs in its
own subprocess (clean peak memory); the parent prints one JSON line per implementation and the ratios.
FLOPs: notes/05 formula (engine/metrics.py), counted on all tokens; MFU against --peak-tflops (default: H100 dense
bf16 989, or 1979 with --fp8; none on CPU).
Packed vs padded (`--lengths lognormal|FILE`): the engine alone, in one process, runs the same global batches of
--pairs pairs with varied lengths three ways: packed (rows of --seq tokens, engine/batches.py plan_step), padded
(micro-batches of --micro-batch pairs sorted by length, each padded to its own longest: the unpacked path without
pipeline parallelism) and padded to the step's longest (the unpacked path under pipeline parallelism). It prints,
per way, real-token tokens/s (padding not counted; from the median step time, and from the fastest step, which a
shared machine's load disturbs least), step time and pad fraction, then the packed / padded ratios.
`lognormal`: sequence lengths (prompt + response) lognormal with median --seq/8 (sigma --sigma), prompts
lognormal with median --seq/32, all within --seq; FILE: JSONL of {"prompt_len", "chosen_len", "rejected_len"}
(or [prompt_len, chosen_len, rejected_len]) per pair, response lengths in tokens.

    python tools/bench_train.py --lengths lognormal                  # CPU, cpu-small
    python tools/bench_train.py --preset gpu-1.7b --lengths lognormal

Not the same arithmetic, by design: the baseline is what TRL-style users run, AdamW straight on bf16 weights (bf16
moments, no master copy: at the paper's lr of 5e-7 most of its updates round away). The engine keeps fp32 master
weights, fp32 gradients and fp32 moments (Megatron's mixed precision), so it moves more bytes per step and its peak
memory ratio is not like for like.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

PRESETS = {
    "cpu-small": dict(layers=4, hidden=256, heads=8, groups=4, ffn=688, vocab=4096, seq=256, micro_batch=2),
    # SmolLM2-135M's shape with an untied head (163M parameters), the shape of issue 26's figures
    "smollm2-135m": dict(layers=30, hidden=576, heads=9, groups=3, ffn=1536, vocab=49152, seq=512, micro_batch=4),
    "gpu-1.7b": dict(layers=16, hidden=2048, heads=16, groups=8, ffn=8192, vocab=128256, seq=2048, micro_batch=2),
}


def hf_config(a) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=a.vocab, hidden_size=a.hidden,
                intermediate_size=a.ffn, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                num_key_value_heads=a.groups, max_position_embeddings=a.seq, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu")


def synthetic_pairs(a, n: int):
    import random

    from megatron_inpo.data.preferences import PreferencePair

    rng = random.Random(0)
    prompt_len = a.seq // 4
    resp_len = a.seq + 1 - prompt_len  # sequence length (input) = prompt + response - 1 = seq
    out = []
    for i in range(n):
        ids = lambda k: [rng.randrange(1, a.vocab) for _ in range(k)]  # noqa: E731
        out.append(PreferencePair(prompt_id=str(i), prompt="", prompt_ids=ids(prompt_len), chosen="", rejected="",
                                  chosen_ids=ids(resp_len), rejected_ids=ids(resp_len), ref_chosen_logp=-1.0 * a.seq,
                                  ref_rejected_logp=-1.0 * a.seq, last_chosen_logp=-1.0 * a.seq,
                                  last_rejected_logp=-1.0 * a.seq))
    return out


def build_engine(a):
    """The Megatron engine of the benchmark (TE + FP8 with --fp8): (engine config, runtime, built policy, DDP
    model, optimizer, scheduler)."""
    from megatron_inpo.engine.config import MegatronConfig, MegatronModelConfig, OptimizerConfig
    from megatron_inpo.engine.optimizer import build_optimizer
    from megatron_inpo.engine.policy import build_policy, init_runtime, wrap_ddp

    engine = MegatronConfig(model=MegatronModelConfig(fp8=a.fp8 or "", layer_spec="te" if a.fp8 else "auto",
                                                      local_ops=a.local_ops), logps=a.logps)
    rt = init_runtime(engine, seed=0)
    built = build_policy(hf_config(a), engine, rt)
    precision = engine.model.resolved_precision(rt.cuda)
    model = wrap_ddp(built.model, engine, precision)
    opt, sched = build_optimizer(OptimizerConfig(lr=1e-6, warmup_ratio=0.0, clip_grad=1.0), engine.parallel, model,
                                 precision, total_steps=1000)
    return engine, rt, built, model, opt, sched


def run_engine(a) -> tuple[list[float], tuple[str, float]]:
    from megatron_inpo.engine.batches import make_pair_batch
    from megatron_inpo.engine.config import batch_pad_multiple
    from megatron_inpo.engine.step import OutputHead, PreferenceLoss, run_schedule
    from megatron_inpo.objectives import ObjectiveConfig

    engine, rt, built, model, opt, sched = build_engine(a)
    pairs = synthetic_pairs(a, a.micro_batch)
    # FP8 GEMMs need token rows in multiples of 16, as training pads them
    batch = make_pair_batch(pairs, indices=range(a.micro_batch), pad_multiple=batch_pad_multiple(1, engine))
    loss = PreferenceLoss(ObjectiveConfig(), pairs)
    head = OutputHead.of(engine, built.vocab_size)

    def one_step():
        model[0].zero_grad_buffer()
        opt.zero_grad()
        run_schedule(model, [batch], loss, head, rt.device)
        with optimizer_scope():
            opt.step()
            sched.step(1)

    measured = time_steps(one_step, a, rt.cuda)
    import torch.distributed as dist

    dist.destroy_process_group()
    return measured


def run_hf(a) -> tuple[list[float], tuple[str, float]]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_inpo.engine.batches import make_pair_batch
    from megatron_inpo.objectives import ObjectiveConfig, PairLogps, compute_objective

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    cfg = LlamaConfig(**{k: v for k, v in hf_config(a).items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16 if cuda else torch.float32)
    model.gradient_checkpointing_disable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
    pairs = synthetic_pairs(a, a.micro_batch)
    b = make_pair_batch(pairs, indices=range(a.micro_batch)).to(dev)
    B = a.micro_batch
    frozen = torch.full((B,), -1.0 * a.seq, device=dev)
    obj = ObjectiveConfig()

    def one_step():
        logits = model(input_ids=b.tokens).logits.float()
        tok = torch.log_softmax(logits, -1).gather(-1, b.labels.unsqueeze(-1)).squeeze(-1)
        lp = (tok * b.loss_mask).sum(-1)
        loss, _ = compute_objective(obj, PairLogps(lp[:B], lp[B:], frozen, frozen, frozen, frozen))
        loss.backward()
        with optimizer_scope():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return time_steps(one_step, a, cuda)


OPTIMIZER_SCOPE = "bench.optimizer"


def optimizer_scope():
    """A profiler range around the optimizer's work: every operator inside it counts as 'optimizer'."""
    import torch

    return torch.profiler.record_function(OPTIMIZER_SCOPE)


def time_steps(one_step, a, cuda: bool) -> tuple[list[float], tuple[str, float]]:
    """Wall time of --warmup + --steps calls of one_step, and the peak memory they reached ((name, GiB): the GPU's
    max allocated, or the process's max RSS on CPU), taken before the profiled step: with --profile one more step
    runs under torch's profiler, whose records would count in the peak, and its summary is printed as a PROFILE
    line."""
    import resource

    import torch

    times = []
    for _ in range(a.steps + a.warmup):
        sync(cuda)
        t = time.perf_counter()
        one_step()
        sync(cuda)
        times.append(time.perf_counter() - t)
    peak = ("gpu_max_allocated_gib", torch.cuda.max_memory_allocated() / 2**30) if cuda else (
        "cpu_max_rss_gib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if a.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            one_step()
            sync(cuda)
        print("PROFILE " + json.dumps(profile_summary(prof, a.profile_top, cuda)), flush=True)
    return times, peak


# Where a step's time goes: operator (self time) -> category; the optimizer is every operator inside
# OPTIMIZER_SCOPE, whatever its name. Composite ops (aten::linear, aten::matmul) have next to no self time.
CATEGORIES = (
    ("gemm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "mkldnn", "gemm", "cublas")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "_cudnn_attention")),
    ("copies", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::index",
                "aten::stack", "aten::repeat", "aten::expand_as", "aten::masked_fill", "aten::fill_", "aten::zero_",
                "aten::zeros", "aten::empty_strided", "aten::gather", "aten::scatter", "Memcpy", "Memset")),
)


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "elementwise" if name.startswith("aten::") else "other"


def profile_summary(prof, top: int, cuda: bool) -> dict:
    """The step's self time by operator (the `top` largest) and by category (gemm, attention, elementwise, copies,
    optimizer, other), in seconds; on a GPU the device time, else the CPU time."""
    def self_us(e):
        return (e.self_device_time_total if cuda else e.self_cpu_time_total)

    by_op: dict[str, list] = {}
    by_cat: dict[str, float] = {}
    for e in prof.events():
        us = self_us(e)
        if us <= 0 or e.name == OPTIMIZER_SCOPE:
            continue
        node, in_opt = e, False
        while node is not None and not in_opt:
            in_opt, node = node.name == OPTIMIZER_SCOPE, node.cpu_parent
        cat = "optimizer" if in_opt else category(e.name)
        by_cat[cat] = by_cat.get(cat, 0.0) + us / 1e6
        row = by_op.setdefault(e.name, [0.0, 0, cat])
        row[0] += us / 1e6
        row[1] += 1
    total = sum(by_cat.values())
    ops = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(total_s=round(total, 4),
                categories={k: round(v, 4) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
                top=[dict(op=k, self_s=round(v[0], 4), calls=v[1], category=v[2]) for k, v in ops])


def length_triples(a) -> list[tuple[int, int, int]]:
    """(prompt_len, chosen_len, rejected_len) of --pairs pairs: from --lengths FILE, or lognormal (see the module
    docstring). Every sequence (prompt + response - 1 input tokens) fits in --seq."""
    import random

    if a.lengths != "lognormal":
        out = []
        with open(a.lengths, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                t = [obj[k] for k in ("prompt_len", "chosen_len", "rejected_len")] if isinstance(obj, dict) else obj
                if len(t) != 3 or any(type(x) is not int or x < 1 for x in t) or t[0] + max(t[1:]) - 1 > a.seq:
                    raise SystemExit(f"{a.lengths}:{lineno}: expected three positive lengths with prompt + response "
                                     f"- 1 <= --seq={a.seq}, got {t}")
                out.append(tuple(t))
        if not out:
            raise SystemExit(f"{a.lengths}: no lengths")
        return [out[i % len(out)] for i in range(a.pairs)]
    rng = random.Random(0)
    out = []
    for _ in range(a.pairs):
        prompt = min(max(1, round(rng.lognormvariate(math.log(a.seq / 32), 0.5))), a.seq // 4)
        resp = [min(max(2, round(rng.lognormvariate(math.log(a.seq / 8), a.sigma))), a.seq) - prompt + 1
                for _ in range(2)]
        out.append((prompt, max(1, resp[0]), max(1, resp[1])))
    return out


def run_packing(a) -> None:
    """Packed vs padded on the same pairs, one process (see the module docstring); prints RESULT lines."""
    import random

    import torch

    from megatron_inpo.data.preferences import PreferencePair
    from megatron_inpo.engine.batches import plan_step
    from megatron_inpo.engine.config import batch_pad_multiple
    from megatron_inpo.engine.step import OutputHead, PreferenceLoss, run_schedule
    from megatron_inpo.objectives import ObjectiveConfig

    engine, rt, built, model, opt, sched = build_engine(a)
    rng = random.Random(1)
    ids = lambda k: [rng.randrange(1, a.vocab) for _ in range(k)]  # noqa: E731
    pairs = [PreferencePair(prompt_id=str(i), prompt="", prompt_ids=ids(p), chosen="", rejected="",
                            chosen_ids=ids(c), rejected_ids=ids(r), ref_chosen_logp=-2.0 * c,
                            ref_rejected_logp=-2.0 * r, last_chosen_logp=-2.0 * c, last_rejected_logp=-2.0 * r)
             for i, (p, c, r) in enumerate(length_triples(a))]
    loss = PreferenceLoss(ObjectiveConfig(), pairs)
    head = OutputHead.of(engine, built.vocab_size)
    pad_multiple = batch_pad_multiple(8, engine)
    ways = {"packed": dict(packing=True, uniform=False), "padded": dict(packing=False, uniform=False),
            "padded_step_max": dict(packing=False, uniform=True)}
    # the same global batches for every way: a step is a slice of --global-batch pairs
    steps = [list(range(k * a.global_batch, (k + 1) * a.global_batch)) for k in range(a.pairs // a.global_batch)]
    plans = {w: [plan_step(pairs, idx, micro_batch_size=a.micro_batch, capacity=a.seq, dp_size=1, dp_rank=0,
                           pad_multiple=pad_multiple, **kw) for idx in steps] for w, kw in ways.items()}
    times: dict[str, list[float]] = {w: [] for w in ways}
    n = a.warmup + a.steps
    for k in range(n):  # the ways interleaved step by step: a shared machine's load drifts
        for w in ways:
            batches = plans[w][k % len(steps)]
            sync(rt.cuda)
            t = time.perf_counter()
            model[0].zero_grad_buffer()
            opt.zero_grad()
            run_schedule(model, batches, loss, head, rt.device)
            opt.step()
            sched.step(1)
            sync(rt.cuda)
            if k >= a.warmup:
                times[w].append(time.perf_counter() - t)
    real = sum(sum(len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) - 2 for p in (pairs[i] for i in idx))
               for idx in steps) / len(steps)
    rows = {}
    for w in ways:
        computed = sum(b.tokens.numel() for plan in plans[w] for b in plan) / len(steps)
        step_s = statistics.median(times[w])
        rows[w] = dict(way=w, step_s=round(step_s, 5), real_tokens_per_s=round(real / step_s, 1),
                       step_s_min=round(min(times[w]), 5), real_tokens_per_s_best=round(real / min(times[w]), 1),
                       pad_fraction=round(1 - real / computed, 4),
                       micro_batches=round(sum(len(plan) for plan in plans[w]) / len(steps), 2))
        print("RESULT " + json.dumps(rows[w]), flush=True)
    print("RESULT " + json.dumps(dict(
        way="ratio", real_tokens_per_s_packed_over_padded=round(rows["packed"]["real_tokens_per_s"]
                                                                / rows["padded"]["real_tokens_per_s"], 3),
        real_tokens_per_s_packed_over_padded_step_max=round(rows["packed"]["real_tokens_per_s"]
                                                            / rows["padded_step_max"]["real_tokens_per_s"], 3),
        best_step_packed_over_padded=round(rows["padded"]["step_s_min"] / rows["packed"]["step_s_min"], 3),
        real_tokens_per_step=real, device=torch.cuda.get_device_name() if rt.cuda else "cpu")), flush=True)
    import torch.distributed as dist

    dist.destroy_process_group()


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def child(a) -> None:
    import torch

    if a.impl == "packing":
        run_packing(a)
        return
    times, (peak_kind, peak) = (run_engine if a.impl == "engine" else run_hf)(a)
    step = statistics.median(times[a.warmup:])
    from megatron_inpo.engine.metrics import FlopDims, batch_flops, throughput

    dims = FlopDims.from_hf_config(hf_config(a))
    seqs = [a.seq] * (2 * a.micro_batch)
    peak_tflops = a.peak_tflops if a.peak_tflops is not None else (
        (1979.0 if a.fp8 else 989.0) if torch.cuda.is_available() else None)
    speed = throughput(batch_flops(dims, seqs), sum(seqs), step, peak_tflops)
    print("RESULT " + json.dumps(dict(impl=a.impl, fp8=a.fp8 or None, step_s=round(step, 5),
                                      steps_s=[round(t, 3) for t in times],
                                      tokens_per_s=round(speed["tokens_per_s"], 1),
                                      tflops=round(speed["tflops"], 4), mfu=round(speed["mfu"], 4) if "mfu" in speed
                                      else None, **{peak_kind: round(peak, 3)},
                                      device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="config preset (default: cpu-small on CPU, gpu-1.7b on GPU)")
    for k in ("layers", "hidden", "heads", "groups", "ffn", "vocab", "seq", "micro_batch"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1, help="alternate hf / engine runs this often; best of each")
    p.add_argument("--fp8", default="", choices=["", "hybrid", "e4m3"], help="engine with TE FP8 (GPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator")
    p.add_argument("--lengths", default=None, help="'lognormal' or a JSONL of (prompt_len, chosen_len, "
                   "rejected_len): packed vs padded engine instead of engine vs transformers")
    p.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the sequence lengths")
    p.add_argument("--pairs", type=int, default=None, help="pairs in all (--lengths; default 4 global batches)")
    p.add_argument("--global-batch", type=int, default=16, help="pairs per step (--lengths)")
    p.add_argument("--profile", action="store_true", help="profile one more step of each implementation (torch's "
                   "profiler) and print its top operators by self time and the split by category")
    p.add_argument("--profile-top", type=int, default=15, help="operators listed by --profile")
    p.add_argument("--logps", choices=["chunked", "logits"], default="chunked",
                   help="the engine's log-prob head (MegatronConfig.logps)")
    p.add_argument("--local-ops", choices=["inplace", "megatron"], default="inplace",
                   help="the engine's RoPE and SwiGLU on the local spec (MegatronModelConfig.local_ops)")
    p.add_argument("--reference", action="store_true", help="also run the engine on its earlier paths (full logits, "
                   "Megatron's RoPE and SwiGLU) as engine_ref, in the same run")
    p.add_argument("--impl", choices=["engine", "hf", "packing"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    preset = PRESETS[a.preset or ("gpu-1.7b" if torch.cuda.is_available() else "cpu-small")]
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.pairs is None:
        a.pairs = 4 * a.global_batch
    if a.impl:
        child(a)
        return 0
    if a.lengths:
        args = [sys.executable, os.path.abspath(__file__), "--impl", "packing"] + [
            f"--{k.replace('_', '-')}={getattr(a, k)}" for k in list(preset) + [
                "steps", "warmup", "lengths", "sigma", "pairs", "global_batch"]]
        if a.fp8:
            args.append(f"--fp8={a.fp8}")
        env = {**os.environ, "MASTER_PORT": os.environ.get("MASTER_PORT", "29598")}
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        lines = [x[len("RESULT "):] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"packing bench failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
            return 1
        cfg = {k: getattr(a, k) for k in list(preset) + ["lengths", "sigma", "pairs", "global_batch"]}
        print(json.dumps({"config": cfg}), flush=True)
        for line in lines:
            print(line, flush=True)
        return 0
    results: dict = {}
    profiles: dict = {}
    # Alternate the implementations and keep each one's fastest repeat: a shared machine's load drifts.
    # engine_ref: the engine on the earlier paths (full logits, Megatron's RoPE and SwiGLU), with --reference.
    labels = ("hf", "engine") + (("engine_ref",) if a.reference else ())
    for label in labels * a.repeats:
        impl = "hf" if label == "hf" else "engine"
        paths = ["--logps=logits", "--local-ops=megatron"] if label == "engine_ref" else [
            f"--logps={a.logps}", f"--local-ops={a.local_ops}"]
        args = [sys.executable, os.path.abspath(__file__), "--impl", impl, *paths] + [
            f"--{k.replace('_', '-')}={getattr(a, k)}" for k in list(preset) + ["steps", "warmup"]]
        if a.profile:
            args += ["--profile", f"--profile-top={a.profile_top}"]
        if a.fp8 and impl == "engine":
            args.append(f"--fp8={a.fp8}")
        if a.peak_tflops is not None:
            args.append(f"--peak-tflops={a.peak_tflops}")
        env = {**os.environ, "MASTER_PORT": os.environ.get("MASTER_PORT", "29598")}
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{impl} failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
            return 1
        row = {"impl": label, **{k: v for k, v in json.loads(line[len("RESULT "):]).items() if k != "impl"}}
        print(json.dumps(row), flush=True)
        prof = next((x for x in proc.stdout.splitlines() if x.startswith("PROFILE ")), None)
        if prof is not None:
            profiles[label] = json.loads(prof[len("PROFILE "):])
        if label not in results or row["step_s"] < results[label]["step_s"]:
            results[label] = row
    cfg = {k: getattr(a, k) for k in preset}
    h = results["hf"]
    mem_key = next(k for k in h if k.endswith("_gib"))
    ratios = {f"{x}_over_hf_{m}": round(v, 3) for x in labels[1:] for m, v in (
        ("tokens_per_s", results[x]["tokens_per_s"] / h["tokens_per_s"]),
        ("peak_mem", results[x][mem_key] / h[mem_key]))}
    print(json.dumps({"config": cfg, **ratios}), flush=True)
    if profiles:
        print_profiles(profiles)
    return 0


def print_profiles(profiles: dict) -> None:
    """The profiled step of each implementation: self time by category side by side, then each one's top
    operators."""
    impls = [i for i in ("hf", "engine", "engine_ref") if i in profiles]
    cats = sorted({c for p in profiles.values() for c in p["categories"]},
                  key=lambda c: -max(p["categories"].get(c, 0.0) for p in profiles.values()))
    print("\nwhere one step's time goes (profiler self time, s; % of the step)")
    print(f"{'category':<12}" + "".join(f"{i:>20}" for i in impls))
    for c in cats + ["total"]:
        cells = []
        for i in impls:
            p = profiles[i]
            v = p["total_s"] if c == "total" else p["categories"].get(c, 0.0)
            cells.append(f"{v:>12.3f} ({100 * v / p['total_s']:>4.1f}%)")
        print(f"{c:<12}" + "".join(cells))
    for i in impls:
        print(f"\ntop operators, {i} (self s, calls, category)")
        for r in profiles[i]["top"]:
            print(f"  {r['op']:<48}{r['self_s']:>9.3f}{r['calls']:>7}  {r['category']}")


if __name__ == "__main__":
    sys.exit(main())
