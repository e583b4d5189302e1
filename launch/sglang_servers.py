#!/usr/bin/env python
"""Start / check / stop SGLang servers for rollout (policy) or judging (--is-embedding reward models).

  python launch/sglang_servers.py start --model-path DIR --num-servers 4 --tp 2 --base-port 30000 \
      --mem-fraction 0.85 --state run/sglang_policy.json          # prints the comma-separated URLs
  python launch/sglang_servers.py start --model-path RM_DIR --is-embedding --base-port 31000 \
      --state run/sglang_rm.json
  python launch/sglang_servers.py status --state run/sglang_policy.json
  python launch/sglang_servers.py stop --state run/sglang_policy.json

Servers bind 127.0.0.1 unless --host says otherwise; server i gets port base+i and GPUs [i*tp, (i+1)*tp).
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from megatron_inpo.rollout.servers import ServerLaunchConfig, read_state, start_servers, stop_servers
from megatron_inpo.rollout.sglang import SGLangPool


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start servers and wait until healthy")
    st.add_argument("--model-path", required=True)
    st.add_argument("--num-servers", type=int, default=1)
    st.add_argument("--tp", type=int, default=1)
    st.add_argument("--base-port", type=int, default=30000)
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--mem-fraction", type=float, default=0.0)
    st.add_argument("--is-embedding", action="store_true", help="reward-model server for /classify")
    st.add_argument("--gpus", default="", help="comma-separated GPU ids (default 0..num_servers*tp-1)")
    st.add_argument("--extra-args", default="", help="more sglang.launch_server arguments, one string")
    st.add_argument("--server-cmd", default="", help="override the server program (default: python -m "
                                                      "sglang.launch_server)")
    st.add_argument("--log-dir", default="sglang_logs")
    st.add_argument("--wait-timeout", type=float, default=1800.0)
    for p in (st, sub.add_parser("stop", help="stop recorded servers"),
              sub.add_parser("status", help="health of recorded servers")):
        p.add_argument("--state", required=True, help="JSON file recording the servers")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cmd == "start":
        cfg = ServerLaunchConfig(model_path=args.model_path, num_servers=args.num_servers, tp=args.tp,
                                 base_port=args.base_port, host=args.host, mem_fraction=args.mem_fraction,
                                 is_embedding=args.is_embedding,
                                 gpus=[int(g) for g in args.gpus.split(",") if g.strip()],
                                 extra_args=shlex.split(args.extra_args), log_dir=args.log_dir)
        if args.server_cmd:
            cfg.command = shlex.split(args.server_cmd)
        print(",".join(start_servers(cfg, args.state, wait_timeout_s=args.wait_timeout)))
        return 0
    if args.cmd == "stop":
        print(f"stopped {stop_servers(args.state)} server(s)")
        return 0
    servers = read_state(args.state)
    health = SGLangPool([s["url"] for s in servers], timeout_s=10.0, max_retries=0).health()
    print(json.dumps([{"url": s["url"], "pid": s["pid"], "healthy": h} for s, h in zip(servers, health)], indent=1))
    return 0 if all(health) else 1


if __name__ == "__main__":
    sys.exit(main())
