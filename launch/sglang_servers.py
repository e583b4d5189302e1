#!/usr/bin/env python
"""Start / check / stop SGLang servers for rollout (policy) or judging (--is-embedding reward models).

  python launch/sglang_servers.py start --model-path DIR --num-servers 4 --tp 2 --base-port 30000 \
      --mem-fraction 0.85 --state run/sglang_policy.json          # prints the comma-separated URLs
  python launch/sglang_servers.py start --model-path RM_DIR --is-embedding --base-port 31000 \
      --state run/sglang_rm.json
  python launch/sglang_servers.py status --state run/sglang_policy.json
  python launch/sglang_servers.py stop --state run/sglang_policy.json
  python launch/sglang_servers.py plan --policy-model DIR --policy-servers 8 --judge-model PM_DIR --judge-gpus 0
      # prints POLICY_MEM_FRACTIONS=...  JUDGE_MEM_FRACTIONS=... (shell assignments) and a table on stderr

Servers bind 127.0.0.1 unless --host says otherwise; server i gets port base+i and GPUs [i*tp, (i+1)*tp).
--api-key env:VAR starts them with SGLang's --api-key set to $VAR (every call but /health and /ready then needs
`Authorization: Bearer $VAR`; the clients read it with rollout.api_key / judge.api_key = env:VAR); servers
reachable beyond this machine (--host other than 127.0.0.1) should always have one.
Servers start with SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0, so their /health only says the process is alive
(by default SGLang answers it with a one-token generation, which crashes a server whose memory the driver has
released); `start` waits for /ready, then proves each server generates once (/health_generate); `status` asks
/ready only.
--mem-fraction takes one value or one per server (comma-separated). `plan` computes them with SGLang's own
KV-cache rule from the models' config.json and the GPUs' free memory (nvidia-smi, or --gpu-memory-gib), and
exits with status 2 and a message naming the server when one would get less KV cache than one batch at full
context (serving/memory_plan.py). Policy servers start first, then the judge; the plan assumes that order.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from megatron_inpo.serving.servers import ServerLaunchConfig, read_state, start_servers, stop_servers
from megatron_inpo.serving.pool import SGLangPool

# Minimum KV tokens of a server (one batch at full context): a policy server must hold the K = 8 samples of one
# prompt at once (they run together and share the prompt's prefix) at the recipes' train.max_seq_len 4096; the
# pairwise judge one comparison in both orders, each a prompt with two responses (up to 2 x 4096 tokens).
POLICY_MIN_KV_TOKENS = 8 * 4096
JUDGE_MIN_KV_TOKENS = 2 * 2 * 4096


def _gpu_memory_gib() -> tuple[float, float]:
    """(free, total) GiB: the smallest over the visible GPUs (every server of the plan must fit on the fullest one;
    SGLang sizes its runtime reserve from nvidia-smi's memory.total, the smallest too)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        rows = [[float(x) for x in line.split(",")] for line in out.splitlines() if line.strip()]
        return min(r[0] for r in rows) / 1024, min(r[1] for r in rows) / 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info = [torch.cuda.mem_get_info(i) for i in range(torch.cuda.device_count())]
            return min(f for f, _ in info) / (1 << 30), min(t for _, t in info) / (1 << 30)
    except ImportError:
        pass
    raise SystemExit("plan: no GPU found (nvidia-smi, torch.cuda); pass --gpu-memory-gib")


def _gpu_list(text: str, default: list[int]) -> tuple[int, ...]:
    return tuple(int(g) for g in text.split(",") if g.strip()) if text else tuple(default)


def hold(state: str, poll_s: float = 1.0, stop_grace_s: float = 40.0) -> int:
    """Keep the servers of `state` (started by this process) up until SIGTERM / SIGINT or until `stop --state`
    (from any process) has stopped them; exit 1 if one of them exits on its own."""
    import signal
    import time

    from megatron_inpo.serving.servers import _is_zombie

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    servers = read_state(state)
    while not stop:
        if not Path(state).exists():  # `stop` removes the state file once every server is gone
            print("servers stopped by `stop`", flush=True)
            return 0
        dead = [s for s in servers if _is_zombie(s["pid"])]  # our children: a dead one stays a zombie
        if dead:
            # a `stop` in progress kills them one by one, then removes the state file: give it that long
            deadline = time.monotonic() + stop_grace_s
            while Path(state).exists() and time.monotonic() < deadline:
                time.sleep(poll_s)
            if not Path(state).exists():
                print("servers stopped by `stop`", flush=True)
                return 0
            print(f"SGLang server {dead[0]['url']} exited; log {dead[0]['log']}; stopping the others", file=sys.stderr)
            stop_servers(state)
            return 1
        time.sleep(poll_s)
    print(f"stopped {stop_servers(state)} server(s)", flush=True)
    return 0


def plan(args: argparse.Namespace) -> int:
    from megatron_inpo.config import ConfigError
    from megatron_inpo.serving.memory_plan import (ModelMemory, ServerSlot, format_plan, plan_server_memory)

    def model(path: str, tp: int) -> ModelMemory:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.exists():
            raise SystemExit(f"plan: {cfg_path} not found (the model's HF config.json sizes the server)")
        try:
            return ModelMemory.from_hf_config(json.loads(cfg_path.read_text()), tp=tp, dtype=args.dtype)
        except ConfigError as e:
            raise SystemExit(f"plan: {cfg_path}: {e}") from None

    def fractions(text: str, n: int, what: str) -> list[float | None]:
        if not text:
            return [None] * n
        vals = [float(x) for x in text.split(",")]
        if len(vals) == 1:
            vals *= n
        if len(vals) != n:
            raise SystemExit(f"plan: {what}: {len(vals)} values for {n} servers")
        return vals

    slots = []
    pm = model(args.policy_model, args.policy_tp)
    gpus = _gpu_list(args.policy_gpus, list(range(args.policy_servers * args.policy_tp)))
    if len(gpus) < args.policy_servers * args.policy_tp:
        raise SystemExit(f"plan: --policy-gpus: {len(gpus)} GPUs for {args.policy_servers} servers x TP "
                         f"{args.policy_tp}")
    for i, f in enumerate(fractions(args.policy_mem_fraction, args.policy_servers, "--policy-mem-fraction")):
        slots.append(ServerSlot(f"policy {i}", pm, gpus[i * args.policy_tp:(i + 1) * args.policy_tp],
                                args.policy_min_kv_tokens, f))
    n_judge = 0
    if args.judge_model:
        jm = model(args.judge_model, args.judge_tp)
        jgpus = _gpu_list(args.judge_gpus, [0])
        n_judge = len(jgpus) // args.judge_tp
        for i, f in enumerate(fractions(args.judge_mem_fraction, n_judge, "--judge-mem-fraction")):
            slots.append(ServerSlot(f"judge {i}", jm, jgpus[i * args.judge_tp:(i + 1) * args.judge_tp],
                                    args.judge_min_kv_tokens, f))
    if args.gpu_memory_gib:
        gib, total = args.gpu_memory_gib, args.gpu_total_gib or args.gpu_memory_gib
    else:
        gib, total = _gpu_memory_gib()
        total = args.gpu_total_gib or total
    try:
        plans = plan_server_memory(slots, gib, args.runtime_reserve_gib, gpu_total_gib=total,
                                   chunked_prefill_size=args.chunked_prefill_size)
    except ConfigError as e:
        print(f"plan: {e}", file=sys.stderr)
        return 2
    print(f"GPU memory free before the servers: {gib:.1f} GiB", file=sys.stderr)
    print(format_plan(plans), file=sys.stderr)
    print("POLICY_MEM_FRACTIONS=" + ",".join(f"{p.mem_fraction:.3f}" for p in plans[:args.policy_servers]))
    if n_judge:
        print("JUDGE_MEM_FRACTIONS=" + ",".join(f"{p.mem_fraction:.3f}" for p in plans[args.policy_servers:]))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start servers and wait until healthy")
    st.add_argument("--model-path", required=True)
    st.add_argument("--num-servers", type=int, default=1)
    st.add_argument("--tp", type=int, default=1)
    st.add_argument("--base-port", type=int, default=30000)
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--mem-fraction", default="0", help="--mem-fraction-static: one value, or one per server "
                                                          "(comma-separated; see `plan`); 0 = sglang's default")
    st.add_argument("--deterministic", action="store_true",
                    help="--enable-deterministic-inference (SGLang ignores sampling_seed without it)")
    st.add_argument("--is-embedding", action="store_true", help="reward-model server for /classify")
    st.add_argument("--gpus", default="", help="comma-separated GPU ids (default 0..num_servers*tp-1)")
    st.add_argument("--api-key", default="",
                    help="SGLang --api-key of every server: env:VAR (read from the environment; preferred, a "
                         "literal key here is visible to other users in ps) or the key itself; empty: none")
    st.add_argument("--extra-args", default="", help="more sglang.launch_server arguments, one string")
    st.add_argument("--server-cmd", default="", help="override the server program (default: python -m "
                                                      "sglang.launch_server)")
    st.add_argument("--log-dir", default="sglang_logs")
    st.add_argument("--hold", action="store_true",
                    help="stay until SIGTERM / SIGINT, then stop the servers; exit 1 if one dies. Needed under srun: "
                         "SLURM ends a job step's processes with the step, servers included")
    st.add_argument("--ready-file", default="", help="write the URLs here once every server is healthy")
    st.add_argument("--wait-timeout", type=float, default=1800.0)
    pl = sub.add_parser("plan", help="--mem-fraction-static of each server from the model sizes (SGLang's rule)")
    pl.add_argument("--policy-model", required=True, help="HF directory (its config.json sizes the server)")
    pl.add_argument("--policy-servers", type=int, default=1)
    pl.add_argument("--policy-tp", type=int, default=1)
    pl.add_argument("--policy-gpus", default="", help="comma-separated (default 0..servers*tp-1)")
    pl.add_argument("--policy-mem-fraction", default="", help="check these instead of planning (one or per server)")
    pl.add_argument("--policy-min-kv-tokens", type=int, default=POLICY_MIN_KV_TOKENS)
    pl.add_argument("--judge-model", default="", help="HF directory of the judge, started after the policy")
    pl.add_argument("--judge-tp", type=int, default=1)
    pl.add_argument("--judge-gpus", default="0")
    pl.add_argument("--judge-mem-fraction", default="")
    pl.add_argument("--judge-min-kv-tokens", type=int, default=JUDGE_MIN_KV_TOKENS)
    pl.add_argument("--dtype", default="auto", help="sglang --dtype of the servers")
    pl.add_argument("--gpu-memory-gib", type=float, default=0.0,
                    help="free memory per GPU before the servers start (default: nvidia-smi)")
    pl.add_argument("--gpu-total-gib", type=float, default=0.0,
                    help="total memory per GPU, which sizes SGLang's runtime reserve (default: nvidia-smi, or "
                         "--gpu-memory-gib)")
    pl.add_argument("--chunked-prefill-size", type=int, default=None,
                    help="the servers' --chunked-prefill-size (default: SGLang's for the GPU size: 8192 on 60-160 GiB)")
    pl.add_argument("--runtime-reserve-gib", type=float, default=None,
                    help="per-server activations / CUDA graphs, overriding SGLang's own rule (default: that rule "
                         "for the GPU size, the server's TP and the chunked-prefill size; 13.6 GiB on an 80 GiB GPU "
                         "at TP1, at least 10 GiB on GPUs over 60 GiB; serving/memory_plan.py)")
    for p in (st, sub.add_parser("stop", help="stop recorded servers"),
              sub.add_parser("status", help="whether recorded servers are up and ready (GET /ready: never "
                                            "generates, safe on servers whose memory is released)")):
        p.add_argument("--state", required=True, help="JSON file recording the servers")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cmd == "plan":
        return plan(args)
    if args.cmd == "start":
        fr = [float(x) for x in args.mem_fraction.split(",") if x.strip()]
        cfg = ServerLaunchConfig(model_path=args.model_path, num_servers=args.num_servers, tp=args.tp,
                                 base_port=args.base_port, host=args.host,
                                 mem_fraction=fr[0] if len(fr) == 1 else 0.0,
                                 mem_fractions=fr if len(fr) > 1 else [], deterministic=args.deterministic,
                                 is_embedding=args.is_embedding, api_key=args.api_key,
                                 gpus=[int(g) for g in args.gpus.split(",") if g.strip()],
                                 extra_args=shlex.split(args.extra_args), log_dir=args.log_dir)
        if args.server_cmd:
            cfg.command = shlex.split(args.server_cmd)
        from megatron_inpo.config import ConfigError

        try:
            urls = start_servers(cfg, args.state, wait_timeout_s=args.wait_timeout)
        except ConfigError as e:
            print(f"start: {e}", file=sys.stderr)
            return 2
        print(",".join(urls), flush=True)
        if args.ready_file:
            from megatron_inpo.files import atomic_write_text

            atomic_write_text(args.ready_file, ",".join(urls) + "\n")
        return hold(args.state) if args.hold else 0
    if args.cmd == "stop":
        if not Path(args.state).exists():  # nothing was started (e.g. the launch stopped before the servers)
            print(f"no server state at {args.state}: nothing to stop")
            return 0
        print(f"stopped {stop_servers(args.state)} server(s)")
        return 0
    servers = read_state(args.state)
    # SGLangPool.health asks /ready, which needs no API key and never generates: the servers may be between a
    # release and a resume of their memory (server_memory_saver), where a generation would crash them
    health = SGLangPool([s["url"] for s in servers], timeout_s=10.0, max_retries=0).health()
    print(json.dumps([{"url": s["url"], "pid": s["pid"], "healthy": h} for s, h in zip(servers, health)], indent=1))
    return 0 if all(health) else 1


if __name__ == "__main__":
    sys.exit(main())
