"""The INPO iteration loop (Algorithm 1 of arXiv 2407.00617), resumable stage by stage.

    pi_1 = pi_ref (SFT)
    for t in 1..T:
        export   pi_t -> HF                       (the rollout engine loads HF weights)
        rollout  K responses per prompt of D_t    (SGLang servers or the in-process engine)
        judge    tournament / best-worst -> (y_w, y_l) pairs        (the preference oracle)
        logprobs log pi_ref and log pi_t of every y_w, y_l          (forward-only, stored with the pairs)
        train    pi_{t+1} = argmin of the INPO loss over the pairs  (Megatron-Core)
        checkpoint  publish pi_{t+1}
        eval     win rate of pi_{t+1} against pi_ref on held-out prompts

Every stage is recorded in the manifest (driver/manifest.py) once its outputs are complete; a rerun of the same
command skips recorded stages and continues an interrupted one where it stopped. Each stage is timed, printed and
logged to tensorboard (<run_dir>/tensorboard).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from megatron_inpo.config import ConfigError, validate_all
from megatron_inpo.driver.config import RunConfig
from megatron_inpo.driver.manifest import Manifest
from megatron_inpo.driver.stages import (StageFault, fault_point, make_stages, missing_megatron_parts, reap_orphan_stage,
                                         resolve_engine)
from megatron_inpo.files import atomic_write_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Checks before any work


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before any stage runs: bad values, missing files, an unloadable judge, unreachable servers."""
    validate_all(cfg)
    if cfg.model.source == "hf":
        hf = Path(cfg.model.hf_path)
        if not (hf / "config.json").exists():
            raise ConfigError(f"model.hf_path: {hf} is not an HF model directory (no config.json)")
        from megatron_inpo.data.prompts import read_prompts

        for i, p in enumerate(cfg.prompts):
            if not Path(p).exists():
                raise ConfigError(f"prompts[{i}]: file {p} not found")
            read_prompts(p, limit=1)  # a malformed first line fails now, naming file:line
        if cfg.eval.enabled and not Path(cfg.eval.prompts).exists():
            raise ConfigError(f"eval.prompts: file {cfg.eval.prompts} not found")
    if cfg.judge.kind == "programmatic" or (cfg.eval.judge and cfg.eval.judge.kind == "programmatic"):
        from megatron_inpo.judge.base import make_judge

        for jc in (cfg.judge, cfg.eval.judge):
            if jc is not None and jc.kind == "programmatic":
                make_judge(jc)  # imports the function: a typo fails here
    if cfg.engine == "megatron":
        missing = missing_megatron_parts()
        if missing:
            raise ConfigError(f"engine: 'megatron' needs {', '.join(missing)}: not found; install them or run with "
                              "engine=torch (or auto)")
    _check_servers(cfg)


def _check_servers(cfg: RunConfig) -> None:
    from megatron_inpo.rollout.sglang import SGLangError, SGLangPool

    groups = []
    if cfg.rollout.backend == "sglang":
        groups.append(("rollout.server_urls", cfg.rollout.server_urls))
    for name, jc in (("judge", cfg.judge), ("eval.judge", cfg.eval.judge)):
        if jc is not None and jc.kind != "programmatic" and jc.backend == "sglang":
            groups.append((f"{name}.server_urls", jc.server_urls))
    for field_name, urls in groups:
        pool = SGLangPool(urls, timeout_s=10.0, max_retries=1, backoff_s=0.5, backoff_max_s=1.0)
        try:
            ok = pool.health()
        except SGLangError as e:
            raise ConfigError(f"{field_name}: {e}") from None
        bad = [u for u, good in zip(urls, ok) if not good]
        if bad:
            raise ConfigError(f"{field_name}: server(s) {bad} unreachable or unhealthy (GET /health failed); start "
                              "them first (launch/sglang_servers.py) or fix the URLs")


# ---------------------------------------------------------------------------------------------------------------
# The driver


class Driver:
    def __init__(self, cfg: RunConfig, progress: bool = True, out: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.progress = progress
        self.out = out
        self.manifest: Manifest | None = None
        self.engine = ""
        self.stages: Any = None
        self._tb = None
        self._judge = None

    # -- plumbing ---------------------------------------------------------------------------------------------
    @property
    def tb(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb

    def stage(self, key: str, fn: Callable[[Callable[[str], None]], dict], step: int = 0) -> dict:
        """Run stage `key` unless the manifest has it; fn(fault) returns the outputs to record."""
        m = self.manifest
        assert m is not None
        if m.done(key):
            return m.outputs(key)
        attempt = m.start(key)
        self._stage_key = key  # names the fault points of the server-memory calls made inside the stage
        self.out(f"[{time.strftime('%H:%M:%S')}] {key} ..." + (f" (resuming, attempt {attempt})" if attempt > 1 else ""))
        t0 = time.perf_counter()
        outputs = fn(StageFault(self.run_dir, key))
        dt = time.perf_counter() - t0
        fault_point(self.run_dir, f"{key}@end")  # the worst moment: outputs complete, not yet recorded
        m.finish(key, outputs, dt)
        self.tb.add_scalar(f"stage_seconds/{key.split('/')[-1]}", dt, step)
        self.tb.flush()
        self.out(f"[{time.strftime('%H:%M:%S')}] {key} done in {dt:.1f} s")
        return outputs

    # -- GPU sharing with SGLang servers ------------------------------------------------------------------------
    def _memory_servers(self) -> dict[str, list[str]]:
        """{server URL: memory tags}: weights + KV cache of policy servers, the KV cache only of judge servers
        (their weights never change). A server listed twice gets the union, released once."""
        out: dict[str, list[str]] = {}
        groups = []
        if self.cfg.rollout.backend == "sglang":
            groups.append((self.cfg.rollout.server_urls, ["weights", "kv_cache"]))
        for jc in (self.cfg.judge, self.cfg.eval.judge):
            if jc is not None and jc.kind != "programmatic" and jc.backend == "sglang":
                groups.append((jc.server_urls, ["kv_cache"]))
        for urls, tags in groups:
            for u in urls:
                have = out.setdefault(u.rstrip("/"), [])
                have += [t for t in tags if t not in have]
        return out

    def server_memory(self, action: str) -> None:
        """'release' before a Megatron stage, 'resume' before rollout / judging (server_memory_saver only).

        Neither call is idempotent (SGLang exits on a resume of memory that was not released; a second release
        pauses twice), so each server's state is recorded in the run directory (ServerMemoryRecord) around the
        call, which is sent once (no retry; a connection error surfaces):
          1. record '<action>ing' (in flight), 2. send, 3. record 'released' / 'resumed'.
        A driver killed before 1 or after 3 resumes knowing the state. Killed between 1 and 3, it cannot know
        whether the server acted: SGLang 0.5.23 has no endpoint reporting released memory (its offload tags stay
        inside the scheduler), and both guesses can break the server. The rerun therefore stops and asks for a
        restart of that server: a fresh server holds its memory, and its new startup_time in /server_info
        (recorded with each state) tells the driver that the record no longer applies. A 4xx answer is certain
        (refused, nothing done): the previous state is restored. Fault points `<stage>@<action>:sending` (after
        1), `:sent` (after 2) and `:recorded` (after the last server) let the tests kill the driver there.
        """
        from megatron_inpo.driver.manifest import MEMORY_FILE, MEMORY_IN_FLIGHT, MEMORY_STABLE, ServerMemoryRecord

        if not self.cfg.server_memory_saver:
            # server_memory_saver may be switched off on resumption (RESUME_MUTABLE): servers this run released
            # must still get their memory back before they generate
            if action != "resume" or not (self.run_dir / MEMORY_FILE).exists():
                return
        from megatron_inpo.rollout.sglang import SGLangError, SGLangPool

        servers = self._memory_servers()
        if not servers:
            return
        record = ServerMemoryRecord(self.run_dir)
        target, in_flight = MEMORY_STABLE[action], MEMORY_IN_FLIGHT[action]
        other = MEMORY_STABLE["resume" if action == "release" else "release"]
        key = getattr(self, "_stage_key", "driver")
        pool = SGLangPool(list(servers), timeout_s=600.0, max_retries=0, backoff_s=0.25, backoff_max_s=1.0)
        for i, (url, tags) in enumerate(servers.items()):
            started = self._server_startup_time(pool, i, url)
            rec = record.get(url)
            if rec is None or (started is not None and rec.get("startup_time") != started):
                state = "resumed"  # never touched by this run, or restarted since: a fresh server holds its memory
                record.set(url, state, tags, started)
            else:
                state = rec["state"]
            if state == target:
                continue
            if state != other:
                raise RuntimeError(
                    f"{url}: this run was stopped during the {'release' if state == 'releasing' else 'resume'} of "
                    f"its memory (/..._memory_occupation; recorded "
                    f"{rec['state']!r} in {record.path} at {rec.get('since')}), so whether the server acted on it is "
                    "unknown, and SGLang has no endpoint that says. Sending the call again could release twice, "
                    "skipping it could later resume memory that was never released (the server then exits). "
                    "Restart that SGLang server (a fresh one holds its memory; the driver tells it by the new "
                    "startup_time of /server_info) and rerun the same command.")
            record.set(url, in_flight, tags, started)
            fault_point(self.run_dir, f"{key}@{action}:sending")
            try:
                pool.request(f"/{action}_memory_occupation", {"tags": tags}, server=i, parse_json=False,
                             max_retries=0)
            except SGLangError as e:
                if e.status is not None and 400 <= e.status < 500:  # refused before acting: nothing changed
                    record.set(url, state, tags, started)
                raise SGLangError(f"/{action}_memory_occupation on {url} failed; the server's memory state is "
                                  f"recorded in {record.path}: {e}", status=e.status) from None
            fault_point(self.run_dir, f"{key}@{action}:sent")
            record.set(url, target, tags, started)
        fault_point(self.run_dir, f"{key}@{action}:recorded")

    @staticmethod
    def _server_startup_time(pool: Any, i: int, url: str) -> str | None:
        """A fingerprint of the server process (GET /server_info, idempotent and retried); None where not reported.

        SGLang 0.5.23's `startup_time` is a dict of that process's measured start-up durations (weight load, KV
        allocation, scheduler start; observability/startup_time.py), not a clock time: a restarted server measures
        new ones, so its canonical JSON tells a new process from the one a memory state was recorded for.
        """
        from megatron_inpo.rollout.sglang import SGLangError

        try:
            info = pool.server_info(i, max_retries=2, timeout_s=30.0)
        except SGLangError as e:
            if e.status is None:
                raise
            return None  # an older server without /server_info: the record alone decides
        if isinstance(info, dict) and info.get("enable_memory_saver") is False:
            # without it a release frees nothing, and training would run out of GPU memory next to the server
            raise ConfigError(f"server_memory_saver: {url} was started without --enable-memory-saver "
                              "(/server_info); restart it with that flag or run without server_memory_saver")
        t = info.get("startup_time") if isinstance(info, dict) else None
        if t is None or isinstance(t, bool):
            return None
        return json.dumps(t, sort_keys=True)

    def judge(self):
        if self._judge is None:
            from megatron_inpo.judge.base import make_judge

            self._judge = make_judge(self.cfg.judge)
        return self._judge

    def eval_judge(self):
        if self.cfg.eval.judge is None:
            return self.judge()
        from megatron_inpo.judge.base import make_judge

        return make_judge(self.cfg.eval.judge)

    # -- Algorithm 1 ------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        cfg = self.cfg
        preflight(cfg)
        self.manifest = Manifest.open(self.run_dir, cfg)
        orphan = reap_orphan_stage(self.run_dir)
        if orphan:
            self.out(f"killed the leftover processes of stage {orphan} of the interrupted run")
        self.engine = self.manifest.data.get("engine") or resolve_engine(cfg.engine)
        if cfg.engine == "auto" and "engine" not in self.manifest.data and self.engine == "torch":
            self.out("engine auto: Megatron stages unavailable (" + ", ".join(missing_megatron_parts()) +
                     "); using the in-process torch reference stages")
        self.manifest.set_engine(self.engine)
        self.out(f"policy stages: {self.engine}" + (" (Megatron-Core subprocesses)" if self.engine == "megatron"
                                                     else " (in-process transformers reference)"))
        self.stages = make_stages(self.engine, cfg, self.run_dir)
        T = cfg.iterations
        files = self.stage("prepare", self._prepare)
        ref = Path(self.stage("sft" if cfg.model.source == "synthetic" else "import", self._make_ref)["policy"])
        policy = ref
        rows = []
        for t in range(1, T + 1):
            it = self.run_dir / f"iter_{t:02d}"
            hf_t = self._export(t, policy)
            hf_ref = self._export(1, ref)
            roll = self.stage(f"iter{t}/rollout", lambda f: self._rollout(f, t, hf_t, files, it), t)
            jud = self.stage(f"iter{t}/judge", lambda f: self._judge_stage(f, t, hf_t, roll, it), t)
            lp = self.stage(f"iter{t}/logprobs", lambda f: self._logprobs(f, jud, it, ref, policy, t), t)
            tr = self.stage(f"iter{t}/train", lambda f: self._train(f, lp, policy, it), t)
            ck = self.stage(f"iter{t}/checkpoint", lambda f: self._checkpoint(t, tr), t)
            policy = Path(ck["policy"])
            hf_next = self._export(t + 1, policy)
            row = {"iteration": t, "pairs": jud["pairs"], "dropped": jud["dropped"],
                   "loss": tr["metrics"].get("loss"), "rollout_mean_tokens": roll["mean_tokens"]}
            if cfg.eval.enabled:
                ev = self.stage(f"iter{t}/eval", lambda f: self._eval(t, hf_next, hf_ref, files), t)
                row.update(win_rate=ev["win_rate"], stderr=ev["stderr"], n=ev["n"],
                           mean_tokens=ev["policy_length"]["mean_tokens"],
                           ref_mean_tokens=ev["baseline_length"]["mean_tokens"])
                self.tb.add_scalar("eval/win_rate_vs_ref", ev["win_rate"], t)
                self.tb.add_scalar("eval/mean_response_tokens", row["mean_tokens"], t)
            if row["loss"] is not None:
                self.tb.add_scalar("train/final_loss", row["loss"], t)
            rows.append(row)
        final = {"final_policy": str(policy), "final_hf": str(self._export(T + 1, policy)), "table": rows,
                 "stage_seconds": self.manifest.stage_seconds()}
        atomic_write_json(self.run_dir / "results.json", final)
        if self._tb is not None:
            self._tb.close()
        return rows

    # -- stages -----------------------------------------------------------------------------------------------
    def _prepare(self, fault) -> dict:
        cfg = self.cfg
        if cfg.model.source == "synthetic":
            from megatron_inpo.task.synthetic import prepare_task

            paths = prepare_task(self.run_dir / "task", cfg.task, cfg.iterations)
            return {"prompts": [paths[f"prompts_iter{t}"] for t in range(1, cfg.iterations + 1)],
                    "eval_prompts": paths["eval_prompts"], "sft": paths["sft"], "model_init": paths["model_init"],
                    "tokenizer": paths["tokenizer"]}
        return {"prompts": [str(Path(p).resolve()) for p in cfg.prompts],
                "eval_prompts": str(Path(cfg.eval.prompts).resolve()) if cfg.eval.enabled else "",
                "hf": str(Path(cfg.model.hf_path).resolve())}

    def _make_ref(self, fault) -> dict:
        self.server_memory("release")
        files = self.manifest.outputs("prepare")
        pol = self.run_dir / "policies"
        if self.cfg.model.source == "synthetic":
            init = self.stages.import_hf(Path(files["model_init"]), pol / "init")
            ref = self.stages.sft(init, Path(files["sft"]), self.run_dir / "sft", fault)
        else:
            ref = self.stages.import_hf(Path(files["hf"]), pol / "pi_ref")
        return {"policy": str(ref)}

    def _export(self, n: int, policy: Path) -> str:
        key = f"iter{n}/export"
        if n == 1 and self.cfg.model.source == "hf":
            return self.stage(key, lambda f: {"hf": self.manifest.outputs("prepare")["hf"]}, n)["hf"]

        def run(fault):
            self.server_memory("release")
            return {"hf": str(self.stages.export_hf(policy, self.run_dir / "hf" / f"pi_{n}", self.cfg.model.export_dtype))}

        return self.stage(key, run, n)["hf"]

    def _rollout(self, fault, t: int, hf_t: str, files: dict, it: Path) -> dict:
        from megatron_inpo.data.preferences import append_jsonl, read_done_ids
        from megatron_inpo.data.prompts import read_prompts
        from megatron_inpo.rollout.engine import make_engine

        prompts = read_prompts(files["prompts"][t - 1])
        out = it / "rollouts.jsonl"
        done = read_done_ids(out)
        todo = [p for p in prompts if p.id not in done]
        cfg = dataclasses.replace(self.cfg.rollout, model_path=hf_t,
                                  tokenizer_path=self.cfg.rollout.tokenizer_path or hf_t)
        if todo:
            self.server_memory("resume")
            engine = make_engine(cfg)
            try:
                if cfg.backend == "sglang":  # servers hold the previous policy: load pi_t from disk, flush caches
                    engine.update_weights(hf_t, version=f"pi_{t}")
                bar = _bar(self.progress, len(prompts), len(prompts) - len(todo), f"rollout it{t}", "prompt")
                B = self.cfg.rollout_batch_size
                for k, s in enumerate(range(0, len(todo), B)):
                    rolls = engine.rollout(todo[s:s + B], iteration=t)
                    append_jsonl(out, [json.dumps({
                        "prompt_id": r.prompt.id, "prompt": r.prompt.prompt, "prompt_ids": r.prompt_ids,
                        "extra": r.prompt.extra,
                        "completions": [dataclasses.asdict(c) for c in r.completions]}) for r in rolls])
                    if bar is not None:
                        bar.update(len(rolls))
                    fault(f"batch{k + 1}")
                if bar is not None:
                    bar.close()
            finally:
                engine.close()
        rows = _read_jsonl(out)
        toks = [len(c["token_ids"]) for r in rows for c in r["completions"]]
        return {"rollouts": str(out), "prompts": len(rows), "sequences": len(toks),
                "mean_tokens": sum(toks) / max(1, len(toks))}

    def _judge_stage(self, fault, t: int, hf_t: str, roll: dict, it: Path) -> dict:
        from megatron_inpo.data.preferences import append_jsonl, read_done_ids
        from megatron_inpo.data.prompts import PromptRecord
        from megatron_inpo.judge.tournament import build_preferences
        from megatron_inpo.rollout.engine import Completion, Rollout
        from megatron_inpo.rollout.pipeline import dropped_path

        self.server_memory("resume")
        judge = self.judge()
        method = self.cfg.algorithm.resolved_selection(judge.kind)
        out = it / "pairs.jsonl"
        drop = dropped_path(out)
        done = read_done_ids(out) | read_done_ids(drop)
        rows = [r for r in _read_jsonl(Path(roll["rollouts"])) if r["prompt_id"] not in done]
        bar = _bar(self.progress, roll["prompts"], roll["prompts"] - len(rows), f"judge it{t}", "prompt")
        B = self.cfg.rollout_batch_size
        comparisons = 0
        for k, s in enumerate(range(0, len(rows), B)):
            rolls = [Rollout(PromptRecord(r["prompt_id"], r["prompt"], r["prompt_ids"], r.get("extra") or {}),
                             r["prompt_ids"], [Completion(**c) for c in r["completions"]]) for r in rows[s:s + B]]
            pairs, dropped, stats = build_preferences(rolls, judge, method, t, f"pi_{t}")
            comparisons += stats["comparisons"]
            append_jsonl(out, [p.to_json() for p in pairs])
            append_jsonl(drop, [json.dumps({"prompt_id": d, "iteration": t}) for d in dropped])
            if bar is not None:
                bar.update(len(rolls))
            fault(f"batch{k + 1}")
        if bar is not None:
            bar.close()
        n_pairs = len(read_done_ids(out))
        if n_pairs == 0:
            raise RuntimeError(f"iteration {t}: the judge kept no pair ({out}); nothing to train on")
        return {"pairs_file": str(out), "pairs": n_pairs, "dropped": len(read_done_ids(drop)), "method": method,
                "comparisons_this_attempt": comparisons}

    def _logprobs(self, fault, jud: dict, it: Path, ref: Path, last: Path, t: int) -> dict:
        out = it / "pairs.logp.jsonl"
        self.server_memory("release")
        self.stages.logprobs(Path(jud["pairs_file"]), out, ref, None if t == 1 else last, fault)
        return {"data": str(out)}

    def _train(self, fault, lp: dict, init: Path, it: Path) -> dict:
        self.server_memory("release")
        ckpt, metrics = self.stages.train(Path(lp["data"]), init, it / "train", fault)
        return {"checkpoint": str(ckpt), "metrics": metrics}

    def _checkpoint(self, t: int, tr: dict) -> dict:
        # pi_{t+1} is the training stage's final checkpoint (already written atomically); record it under a stable
        # name so that later stages, `evaluate` and users find it without knowing the engine's layout.
        link = self.run_dir / "policies" / f"pi_{t + 1}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(tr["checkpoint"]))
        return {"policy": str(tr["checkpoint"]), "link": str(link)}

    def _eval(self, t: int, hf_policy: str, hf_ref: str, files: dict) -> dict:
        from megatron_inpo.data.prompts import read_prompts
        from megatron_inpo.evaluate import evaluate_pair

        self.server_memory("resume")
        ev = self.cfg.eval
        prompts = read_prompts(files["eval_prompts"], limit=ev.num_prompts or None)
        rcfg = dataclasses.replace(self.cfg.rollout, tokenizer_path=self.cfg.rollout.tokenizer_path or hf_ref)
        return evaluate_pair(rcfg, self.eval_judge(), hf_policy, hf_ref, prompts, ev.samples_per_prompt,
                             ev.sampling, self.run_dir / "eval" / f"pi_{t + 1}", policy_name=f"pi_{t + 1}",
                             baseline_name="pi_ref", baseline_cache=self.run_dir / "eval" / "pi_ref.generations.jsonl")


def _read_jsonl(path: Path) -> list[dict]:
    from megatron_inpo.data.preferences import iter_jsonl, repair_torn_tail

    repair_torn_tail(path)
    return [obj for _, obj in iter_jsonl(path)]


def _bar(enabled: bool, total: int, initial: int, desc: str, unit: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False)


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def format_table(rows: list[dict]) -> str:
    head = f"{'iter':>4} | {'win rate vs pi_ref':>20} | {'mean len (tok)':>14} | {'loss':>9} | {'pairs':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        wr = f"{r['win_rate']:.3f} +- {r['stderr']:.3f}" if "win_rate" in r else "-"
        ln = f"{r['mean_tokens']:.2f}" if "mean_tokens" in r else "-"
        loss = f"{r['loss']:.4g}" if r.get("loss") is not None else "-"
        lines.append(f"{r['iteration']:>4} | {wr:>20} | {ln:>14} | {loss:>9} | {r['pairs']:>5}")
    if rows and "ref_mean_tokens" in rows[0]:
        lines.append(f"pi_ref mean length: {rows[0]['ref_mean_tokens']:.2f} tokens; win rate = mean oracle "
                     "P(pi_t beats pi_ref) over held-out prompts, +- binomial standard error")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    if not rows or "win_rate" not in rows[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(its, [r["win_rate"] for r in rows], yerr=[r["stderr"] for r in rows], marker="o", capsize=4,
                label="win rate vs pi_ref")
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("iteration t")
    ax.set_ylabel("win rate of pi_{t+1} vs pi_ref")
    ax.set_xticks(its)
    ax2 = ax.twinx()
    ax2.plot(its, [r["mean_tokens"] for r in rows], color="tab:orange", marker="s", label="mean length")
    ax2.set_ylabel("mean response length (tokens)")
    fig.legend(loc="upper center", ncol=2, fontsize="small")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
