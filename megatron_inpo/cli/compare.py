"""`megatron-inpo compare`: the same task, seed and budget run once per algorithm, measured by the Nash meter.

    megatron-inpo compare --recipe game_cpu --algorithms inpo,dpo,sppo,inpo_nokl [--run_dir runs/cmp] [--key=value ...]

Each algorithm (an `algorithm.objective.name`) runs the recipe with every other field unchanged into its own
directory `<run_dir>/<algorithm>`, one after the other, through the driver of `megatron-inpo run`: rerunning the
command replays finished runs from their manifests (no work) and resumes an unfinished one where it stopped; a
changed config is refused per run, as `run` does. The meter's tau (eval.nash_tau) is fixed to the recipe's
objective tau for all of them, so every run is measured against the same pi* (INPO w/o KL trains without the KL
term but is still measured in the regularised game). Then it writes `<run_dir>/compare.txt` (one block per
metric: rows = iterations, 0 = pi_ref; columns = algorithms), `compare.json` and `compare.png` (duality gap, KL
to Nash and win rate vs pi_ref per iteration, one line per algorithm). On the word task (task.kind synthetic) the
Nash columns are replaced by the style game's exploitability (an approximation; megatron_inpo/nash_meter.py).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from megatron_inpo.cli.loader import Command, run_command

PROG = "megatron-inpo compare"
DEFAULT_ALGORITHMS = "inpo,dpo,sppo,inpo_nokl"
METRICS = [  # (row key, title, pi_ref's key or None)
    ("kl_to_nash", "KL(pi* || pi_t), exact, mean over games", "ref_kl_to_nash"),
    ("duality_gap", "duality gap of pi_t, exact, mean over games", "ref_duality_gap"),
    ("style_exploitability", "style-game exploitability of the eval mix (approximation)", "ref_style_exploitability"),
    ("win_rate", "win rate of pi_t vs pi_ref (oracle, held-out prompts)", None),
]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algorithms", default=DEFAULT_ALGORITHMS,
                   help=f"comma-separated objective names, one run each (default {DEFAULT_ALGORITHMS})")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (stage lines are still printed)")


def command() -> Command:
    from megatron_inpo.driver.config import RunConfig
    from megatron_inpo.driver.recipes import RECIPES

    return Command(prog=PROG, config=RunConfig, doc=__doc__ or "", recipes=RECIPES, default_recipe="game_cpu",
                   arguments=_arguments)


def main(argv: list[str] | None = None) -> int:
    return run_command(command(), argv, _compare)


def run_configs(cfg: Any, algorithms: list[str]) -> dict[str, Any]:
    """One RunConfig per algorithm: the base config with only objective.name and run_dir changed (validated)."""
    from megatron_inpo.config import ConfigError, validate_all

    if not algorithms or len(set(algorithms)) != len(algorithms):
        raise ConfigError(f"--algorithms: give distinct objective names, got {algorithms}")
    out = {}
    for name in algorithms:
        c = copy.deepcopy(cfg)
        c.algorithm.objective.name = name
        c.run_dir = str(Path(cfg.run_dir) / name)
        if not c.eval.nash_tau:
            c.eval.nash_tau = cfg.algorithm.objective.tau
        try:
            validate_all(c)
        except ConfigError as e:
            raise ConfigError(f"--algorithms: {name}: {e}") from None
        out[name] = c
    return out


def _compare(cfg: Any, args: argparse.Namespace) -> int:
    from megatron_inpo.cli.run import _quiet_libraries
    from megatron_inpo.driver.launcher import StageError
    from megatron_inpo.driver.loop import Driver
    from megatron_inpo.files import atomic_write_json, atomic_write_text

    _quiet_libraries()
    configs = run_configs(cfg, [a.strip() for a in args.algorithms.split(",") if a.strip()])
    base = Path(cfg.run_dir).resolve()
    results: dict[str, list[dict]] = {}
    for name, c in configs.items():
        finished = (Path(c.run_dir) / "results.json").exists()
        print(f"{PROG}: {name}: {c.iterations} iteration(s) in {Path(c.run_dir).resolve()}"
              + (" (finished earlier: replayed from its manifest)" if finished else ""), flush=True)
        driver = Driver(c, progress=not args.no_progress, out=(lambda s: None) if finished else
                        (lambda s: print(s, flush=True)))
        try:
            results[name] = driver.run()
        except StageError as e:
            print(f"{PROG}: {name}: {e}\nrerun the same command to resume", file=sys.stderr)
            return 1
    text = format_comparison(results)
    atomic_write_text(base / "compare.txt", text + "\n")
    atomic_write_json(base / "compare.json", {"algorithms": list(results), "runs": {n: str(Path(c.run_dir).resolve())
                                              for n, c in configs.items()}, "table": comparison_rows(results)})
    png = plot_comparison(results, base / "compare.png")
    print("\n" + text)
    print(f"\ncomparison: {base}  (compare.txt, compare.json{', ' + png.name if png else ''})")
    return 0


def _series(rows: list[dict], key: str, ref_key: str | None) -> list[tuple[int, float]]:
    out = []
    if ref_key and rows and ref_key in rows[0]:
        out.append((0, rows[0][ref_key]))
    out += [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
    return out


def comparison_rows(results: dict[str, list[dict]]) -> list[dict]:
    """One record per (algorithm, iteration) with every metric present (iteration 0 = pi_ref)."""
    out: dict[tuple[str, int], dict] = {}
    for name, rows in results.items():
        for key, _, ref_key in METRICS:
            for it, v in _series(rows, key, ref_key):
                out.setdefault((name, it), {"algorithm": name, "iteration": it})[key] = v
        for r in rows:
            if "stderr" in r:
                out[(name, r["iteration"])]["win_rate_stderr"] = r["stderr"]
    return list(out.values())


def format_comparison(results: dict[str, list[dict]]) -> str:
    names = list(results)
    blocks = []
    for key, title, ref_key in METRICS:
        series = {n: dict(_series(results[n], key, ref_key)) for n in names}
        its = sorted({i for s in series.values() for i in s})
        if not its:
            continue
        head = f"{'iter':>8} | " + " | ".join(f"{n:>12}" for n in names)
        lines = [title, head, "-" * len(head)]
        for i in its:
            label = "0 pi_ref" if i == 0 else str(i)
            cells = []
            for n in names:
                v = series[n].get(i)
                cells.append(f"{v:>12.4f}" if v is not None else f"{'-':>12}")
            lines.append(f"{label:>8} | " + " | ".join(cells))
        blocks.append("\n".join(lines))
    first = next(iter(results.values()), [])
    if first and "nash_residual" in first[0]:
        r0 = first[0]
        blocks.append(f"pi*: tau={r0['nash_tau']:.4g}, {r0['nash_games']} games; certificate (first run): max "
                      f"fixed-point residual {r0['nash_residual']:.1e}, max duality gap {r0['nash_gap']:.1e}")
    return "\n\n".join(blocks)


def plot_comparison(results: dict[str, list[dict]], path: Path) -> Path | None:
    """One panel per metric present, one line per algorithm (as driver/report.py's plot: matplotlib, Agg)."""
    panels = [(k, t, r) for k, t, r in METRICS if any(_series(rows, k, r) for rows in results.values())]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, title, ref_key) in zip(axes[0], panels):
        for name, rows in results.items():
            s = _series(rows, key, ref_key)
            if s:
                ax.plot([i for i, _ in s], [v for _, v in s], marker="o", label=name)
        if key == "win_rate":
            ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_title(title.split(",")[0].split(" (")[0], fontsize="medium")
        ax.set_xlabel("iteration t (0 = pi_ref)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
