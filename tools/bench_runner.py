#!/usr/bin/env python
"""Stage-runner benchmark: the same INPO run with `launch.stage_runner=subprocess` (a fresh process per Megatron
stage) and `persistent` (one stage worker per run), back to back on this machine; prints both wall times, their
ratio (persistent / subprocess; issue 15's target is <= 0.6), the time of the Megatron stages in each, and
whether the two runs' tables and final HF weights are identical (bit for bit).

    python tools/bench_runner.py [--recipe tiny_cpu] [--shrink] [--order subprocess,persistent] [--repeats N]
                                 [--workdir DIR] [--key=value ...]

Default: the tiny_cpu demo as `megatron-inpo run --recipe tiny_cpu` runs it (engine megatron). `--shrink` lays the
driver tests' overrides on top (tests/helpers/driver.py tiny_overrides: 32 prompts per iteration, 256 SFT
examples, 2 iterations: the stages are then mostly start-up). Further `--key=value` go to both runs. The load
average is printed before and after each run: on a shared machine, compare figures only of runs whose load was
alike. `--repeats N` runs N pairs, the order alternating from pair to pair, and prints each pair's ratio and
their median.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEGATRON_STAGES = ("sft", "import", "export", "logprobs", "train")


def run_once(runner: str, run_dir: Path, recipe: str, extra: list[str], port: int) -> dict:
    cmd = [sys.executable, "-m", "megatron_inpo", "run", "--recipe", recipe, "--no-progress", f"--run_dir={run_dir}",
           f"--launch.stage_runner={runner}", f"--launch.master_port={port}", *extra]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{runner} run failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    stages = results["stage_seconds"]
    megatron = sum(v for k, v in stages.items() if k.split("/")[-1] in MEGATRON_STAGES)
    return {"wall": wall, "megatron_stages": megatron, "stages": stages, "results": results,
            "load": (load0, os.getloadavg()), "stdout": r.stdout}


def same_weights(a: str, b: str) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(d: str) -> dict:
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tiny_cpu")
    p.add_argument("--shrink", action="store_true", help="the driver tests' shrunk variant (tiny_overrides)")
    p.add_argument("--order", default="subprocess,persistent", help="which runner goes first")
    p.add_argument("--workdir", default=None, help="where the two runs go (default: a temporary directory)")
    p.add_argument("--port", type=int, default=29650, help="launch.master_port of the runs")
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs (the order alternates)")
    args, extra = p.parse_known_args()
    order = args.order.split(",")
    if sorted(order) != ["persistent", "subprocess"]:
        p.error("--order: subprocess,persistent or persistent,subprocess")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_runner_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.shrink:
        sys.path.insert(0, str(REPO))
        from tests.helpers.driver import tiny_overrides

        extra = [o for o in tiny_overrides(work / "unused", engine="megatron")
                 if not o.startswith(("--run_dir=", "--launch.master_port="))] + extra
    print(f"recipe {args.recipe}{' (shrunk: tiny_overrides)' if args.shrink else ''}, {os.cpu_count()} CPUs, "
          f"runs in {work}; overrides: {' '.join(extra) or '-'}", flush=True)
    ratios, ok = [], True
    for i in range(args.repeats):
        got = {}
        for runner in (order if i % 2 == 0 else order[::-1]):
            run_dir = work / f"{runner}_{i + 1}"
            if run_dir.exists():
                sys.exit(f"{run_dir} exists: pick another --workdir (a resumed run would time nothing)")
            got[runner] = g = run_once(runner, run_dir, args.recipe, extra, args.port)
            (l0, l1) = g["load"]
            print(f"{i + 1}: {runner:>10}: wall {g['wall']:7.1f} s   Megatron stages {g['megatron_stages']:7.1f} s   "
                  f"load average {l0[0]:.1f} -> {l1[0]:.1f}", flush=True)
        s, q = got["subprocess"], got["persistent"]
        ratios.append(q["wall"] / s["wall"])
        same_table = s["results"]["table"] == q["results"]["table"]
        same = same_weights(s["results"]["final_hf"], q["results"]["final_hf"])
        ok &= same_table and same
        print(f"{i + 1}: ratio persistent / subprocess = {ratios[-1]:.2f} (wall), "
              f"{q['megatron_stages'] / max(s['megatron_stages'], 1e-9):.2f} (Megatron stages); identical table: "
              f"{same_table}; identical final HF weights: {same}", flush=True)
    print(f"\nratio persistent / subprocess (wall): {' '.join(f'{r:.2f}' for r in ratios)}; median "
          f"{statistics.median(ratios):.2f} (target <= 0.6)")
    print("\nstage seconds of the last pair (subprocess / persistent):")
    for k in s["stages"]:
        print(f"  {k:<18} {s['stages'][k]:7.1f} {q['stages'].get(k, float('nan')):7.1f}")
    table = q["stdout"][q["stdout"].find("iter |"):].split("\n\n")[0]
    print("\n" + table)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
