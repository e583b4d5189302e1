#!/usr/bin/env python
"""Converter benchmark: throughput (GB/s) and peak RSS of hf-to-mcore and mcore-to-hf on a random ~1 GB Llama,
against a plain file copy (read + write + fsync) of the same bytes, measured in the same run.

    python tools/bench_convert.py [--workdir DIR] [--layers 8] [--hidden 2048] [--tp 1]

Each conversion runs in a fresh subprocess that imports everything first, then times the conversion alone
and samples its resident set every 5 ms: "peak RSS" is the process peak, "conv. RSS" is the peak growth during
the conversion (the converter's own working memory; the interpreter with torch + megatron.core imported is
already ~1.7 GiB here). The copy baseline reads and writes the same files with 16 MiB buffers and fsync; it runs before and after
the conversions and the faster run is the reference (the disk here is shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_hf(d: Path, layers: int, hidden: int, ffn: int, vocab: int, heads: int, groups: int) -> int:
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    head_dim = hidden // heads
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
               intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=groups, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
               tie_word_embeddings=False, dtype="bfloat16", hidden_act="silu")
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards, total, weight_map = [], 0, {}
    shards.append({"model.embed_tokens.weight": r(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({p + "input_layernorm.weight": r(hidden) + 1, p + "post_attention_layernorm.weight": r(hidden) + 1,
                       p + "self_attn.q_proj.weight": r(heads * head_dim, hidden),
                       p + "self_attn.k_proj.weight": r(groups * head_dim, hidden),
                       p + "self_attn.v_proj.weight": r(groups * head_dim, hidden),
                       p + "self_attn.o_proj.weight": r(hidden, heads * head_dim),
                       p + "mlp.gate_proj.weight": r(ffn, hidden), p + "mlp.up_proj.weight": r(ffn, hidden),
                       p + "mlp.down_proj.weight": r(hidden, ffn)})
    shards.append({"model.norm.weight": r(hidden) + 1, "lm_head.weight": r(vocab, hidden)})
    n = len(shards)
    for i, s in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(s, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in s})
        total += sum(t.numel() * t.element_size() for t in s.values())
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}))
    return total


_CHILD = """
import json, os, threading, time
os.environ.setdefault("MASTER_PORT", "29690")
import torch, megatron.core.dist_checkpointing, torch.distributed.checkpoint, safetensors.torch, tqdm
from megatron.core.dist_checkpointing.strategies import torch as _t
from megatron_inpo.convert import hf_to_mcore, mcore_to_hf
from megatron_inpo.engine import parallel
parallel.init_distributed()
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak = [rss()]; stop = [False]
def sample():
    while not stop[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
before = rss(); th = threading.Thread(target=sample, daemon=True); th.start()
t0 = time.perf_counter()
CALL
dt = time.perf_counter() - t0
stop[0] = True; th.join()
print(json.dumps({"seconds": dt, "rss_before": before, "rss_peak": max(peak[0], rss())}))
"""


def run_child(call: str) -> dict:
    """{"seconds" (conversion only), "rss_before", "rss_peak"} of a conversion in a fresh process."""
    p = subprocess.run([sys.executable, "-c", _CHILD.replace("CALL", call)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child failed: {call}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def copy_tree(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    dst.mkdir()
    for f in src.iterdir():
        with open(f, "rb") as a, open(dst / f.name, "wb") as b:
            shutil.copyfileobj(a, b, 16 * 2**20)
            b.flush()
            os.fsync(b.fileno())
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    hf, mc, back, cp = work / "hf", work / "mc", work / "back", work / "copy"
    for p in (hf, mc, back, cp):
        shutil.rmtree(p, ignore_errors=True)
    nbytes = make_hf(hf, args.layers, args.hidden, args.ffn, args.vocab, 16, 8)
    max_tensor = 2 * args.vocab * args.hidden
    gb = nbytes / 1e9
    t_copy1 = copy_tree(hf, cp)
    shutil.rmtree(cp)
    r_in = run_child(f"hf_to_mcore.convert_hf_to_mcore({str(hf)!r}, {str(mc)!r}, tp={args.tp}, progress=False)")
    r_out = run_child(f"mcore_to_hf.convert_mcore_to_hf({str(mc)!r}, {str(back)!r}, dtype='bf16', "
                      "max_shard_size='256MB', progress=False)")
    t_copy2 = copy_tree(hf, cp)
    t_copy = min(t_copy1, t_copy2)  # the faster copy: the conservative physical limit for the ratio
    print(f"model: {gb:.3f} GB bf16 ({args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}); "
          f"largest tensor {max_tensor / 2**20:.0f} MiB")
    print(f"{'step':<32} {'seconds':>8} {'GB/s':>7} {'vs copy':>8} {'peak RSS GiB':>13} {'conv. RSS MiB':>14}")
    print(f"{'plain copy (read+write+fsync)':<32} {t_copy:8.2f} {gb / t_copy:7.3f} {1.0:7.2f}x {'-':>13} {'-':>14}"
          f"   (copies before/after: {t_copy1:.2f} s / {t_copy2:.2f} s)")
    for name, r in ((f"hf-to-mcore tp={args.tp}", r_in), ("mcore-to-hf bf16", r_out)):
        t = r["seconds"]
        print(f"{name:<32} {t:8.2f} {gb / t:7.3f} {t_copy / t:7.2f}x {r['rss_peak'] / 2**30:13.2f} "
              f"{(r['rss_peak'] - r['rss_before']) / 2**20:14.0f}")
    shutil.rmtree(work, ignore_errors=True) if args.workdir is None else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
