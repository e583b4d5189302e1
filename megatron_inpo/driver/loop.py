"""The INPO iteration loop (Algorithm 1 of arXiv 2407.00617), resumable stage by stage.

    pi_1 = pi_ref (SFT)
    for t in 1..T:
        export   pi_t -> HF                       (the rollout engine loads HF weights)
        rollout  K responses per prompt of D_t    (SGLang servers or the in-process engine)
        judge    tournament / best-worst -> (y_w, y_l) pairs        (the preference oracle)
        logprobs log pi_ref and log pi_t of every y_w, y_l          (forward-only, stored with the pairs)
        train    pi_{t+1} = argmin of the INPO loss over the pairs  (Megatron-Core; eta_t by algorithm.eta_schedule)
        checkpoint  publish pi_{t+1}
        eval     win rate of pi_{t+1} against pi_ref on held-out prompts

Every stage is recorded in the manifest (driver/manifest.py) once its outputs are complete; a rerun of the same
command skips recorded stages and continues an interrupted one where it stopped. Each stage's outputs are a typed
record below (`to_dict` is exactly what the manifest keeps). Each stage is timed, printed and logged to
tensorboard (<run_dir>/tensorboard).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from megatron_inpo.config import ConfigError, validate_all
from megatron_inpo.driver.config import RunConfig
from megatron_inpo.driver.launcher import reap_orphan_stage
from megatron_inpo.driver.manifest import Manifest
from megatron_inpo.driver.results import (Checkpoint, EvalResult, HFExport, LogprobResult, NashReading, Pairs, Policy,
                                          R, Rollouts, TaskFiles, TrainResult)
from megatron_inpo.driver.stages import make_stages, missing_megatron_parts, resolve_trainer
from megatron_inpo import events
from megatron_inpo.files import atomic_write_json, exclusive
from megatron_inpo.serving.pool import SGLangError, SGLangPool, resolve_api_key

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Checks before any work


def preflight(cfg: RunConfig) -> None:
    """Fail fast, before any stage runs: bad values, missing files, an unloadable judge, unreachable servers."""
    validate_all(cfg)
    if cfg.model.source == "gguf":
        from megatron_inpo.convert import ConvertError
        from megatron_inpo.convert.gguf import check_gguf, find_packaged_gguf

        try:
            check_gguf(Path(cfg.model.gguf_path) if cfg.model.gguf_path else find_packaged_gguf())
        except ConvertError as e:
            raise ConfigError(f"model.gguf_path: {e}") from None
    if cfg.task.kind == "ifbench":
        from megatron_inpo.task.ifbench import load_prompts, scorable, split_prompts

        # the scorer imports (its packages are there) and the split fits the scorable prompts, before any work
        split_prompts(scorable(load_prompts()), cfg.task.seed, cfg.iterations, cfg.task.prompts_per_iteration,
                      cfg.task.eval_prompts)
    if cfg.model.source == "hf":
        hf = Path(cfg.model.hf_path)
        if not (hf / "config.json").exists():
            raise ConfigError(f"model.hf_path: {hf} is not an HF model directory (no config.json)")
    if cfg.model.source == "hf" and cfg.task.kind != "ifbench":
        _check_prompt_files(cfg, hf)
    from megatron_inpo.judge.base import make_judge

    for jc in (cfg.judge, cfg.eval.judge):
        if jc is not None and jc.kind in ("programmatic", "verifiable"):
            make_judge(jc)  # imports the function (a typo fails here) or the verifier (a missing package does)
    if cfg.trainer == "megatron":
        missing = missing_megatron_parts()
        if missing:
            raise ConfigError(f"trainer: 'megatron' needs {', '.join(missing)}: not found; install them or run with "
                              "trainer=torch (or auto)")
    _check_servers(cfg)


def _check_prompt_files(cfg: RunConfig, hf: Path) -> None:
    """Every line of every prompt file against pi_ref's tokenizer and positions."""
    from dataclasses import replace

    from megatron_inpo.data.prompts import read_prompts
    from megatron_inpo.rollout.engine import load_tokenizer, prompt_limits

    # every line of every prompt file against pi_ref's tokenizer and positions (each iterate shares them): a bad
    # line of the last iteration's file fails now, naming file:line, not after hours of training
    rollout = replace(cfg.rollout, model_path=str(hf))
    files = [(f"prompts[{i}]", p, rollout.sampling) for i, p in enumerate(cfg.prompts)]
    files += [("eval.prompts", cfg.eval.prompts, cfg.eval.sampling)] if cfg.eval.enabled else []
    for name, p, _ in files:
        if not Path(p).exists():
            raise ConfigError(f"{name}: file {p} not found")
        read_prompts(p)
    tok_path = rollout.tokenizer_path or str(hf)
    try:
        tokenizer = load_tokenizer(tok_path)
    except ConfigError as e:  # names the directory; the field says where it was configured
        raise ConfigError(f"{'rollout.tokenizer_path' if rollout.tokenizer_path else 'model.hf_path'}: {e}") from None
    for _, p, sampling in files:
        read_prompts(p, **prompt_limits(replace(rollout, sampling=sampling), tokenizer))


def _check_servers(cfg: RunConfig) -> None:
    """Every configured SGLang server is up and ready. Asked without generating (SGLangPool.health: GET /ready):
    a driver restarted after a crash finds servers that the stage before the crash released (server_memory_saver),
    and a generation on released memory crashes an SGLang server."""
    groups = []
    if cfg.rollout.backend == "sglang":
        groups.append(("rollout", cfg.rollout))
    for name, jc in (("judge", cfg.judge), ("eval.judge", cfg.eval.judge)):
        if jc is not None and jc.kind in ("pairwise", "reward") and jc.backend == "sglang":
            groups.append((name, jc))
    for name, section in groups:
        field_name, urls = f"{name}.server_urls", section.server_urls
        # the key is needed only where /ready is missing (the /model_info fallback); a key that cannot be read
        # would fail every stage later, so it is named now
        key = resolve_api_key(getattr(section, "api_key", ""), f"{name}.api_key")
        try:
            pool = SGLangPool(urls, timeout_s=10.0, max_retries=1, backoff_s=0.5, backoff_max_s=1.0, api_key=key)
            ok = pool.health()
        except SGLangError as e:
            raise ConfigError(f"{field_name}: {e}") from None
        bad = [u for u, good in zip(urls, ok) if not good]
        if bad:
            raise ConfigError(f"{field_name}: server(s) {bad} unreachable or not ready (GET /ready failed); start "
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
        self.trainer = ""
        self.stages: Any = None
        self._tb = None
        self._judge = None
        self._held: contextlib.ExitStack | None = None

    # -- Algorithm 1 ------------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        with contextlib.ExitStack() as self._held:  # the run directory's lock, taken by _start
            try:
                with events.scope("driver"):  # events outside any stage
                    return self._run()
            finally:
                if self.stages is not None:
                    self.stages.close()  # the persistent stage worker, if one runs

    def _run(self) -> list[dict]:
        cfg = self.cfg
        self._start()
        files = self.stage("prepare", TaskFiles, self._prepare)
        ref = Path(self.stage("sft" if cfg.model.source == "synthetic" else "import", Policy, self._make_ref).policy)
        policy = ref  # pi_1 = pi_ref
        hf_ref = self._export(1, ref)
        rows = []
        for t in range(1, cfg.iterations + 1):
            it = self.run_dir / f"iter_{t:02d}"
            hf_t = self._export(t, policy)
            rollouts = self.stage(f"iter{t}/rollout", Rollouts, lambda: self._rollout(t, hf_t, files, it), t)
            pairs = self.stage(f"iter{t}/judge", Pairs, lambda: self._judge_pairs(t, rollouts, it), t)
            scored = self.stage(f"iter{t}/logprobs", LogprobResult,
                                lambda: self._logprobs(t, pairs, ref, policy, it), t)
            trained = self.stage(f"iter{t}/train", TrainResult, lambda: self._train(t, scored, policy, it), t)
            checkpoint = self.stage(f"iter{t}/checkpoint", Checkpoint, lambda: self._checkpoint(t, trained), t)
            policy = Path(checkpoint.policy)  # pi_{t+1}
            hf_next = self._export(t + 1, policy)
            evaluation = (self.stage(f"iter{t}/eval", EvalResult, lambda: self._eval(t, hf_next, hf_ref, files), t)
                          if cfg.eval.enabled else None)
            rows.append(self._report(t, rollouts, pairs, trained, evaluation))
            rows[-1].update(self._nash_meter(t, hf_next, hf_ref, files) if evaluation is not None else {})
            rows[-1].update(self._ifbench_meter(t, files) if evaluation is not None else {})
        final = {"final_policy": str(policy), "final_hf": self._export(cfg.iterations + 1, policy), "table": rows,
                 "stage_seconds": self.manifest.stage_seconds()}
        atomic_write_json(self.run_dir / "results.json", final)
        if self._tb is not None:
            self._tb.close()
        return rows

    def _start(self) -> None:
        """Checks, the manifest (a new run or the one to resume), leftovers of a killed run, the policy engine."""
        cfg = self.cfg
        preflight(cfg)
        # one driver per run directory: a second one would resume the stage this one is running, into the same files
        # (taken after the checks, so that a refused command leaves nothing behind)
        self._held.enter_context(exclusive(self.run_dir, "the run directory"))
        self.manifest = Manifest.open(self.run_dir, cfg)
        orphan = reap_orphan_stage(self.run_dir)
        if orphan:
            self.out(f"killed the leftover processes of stage {orphan} of the interrupted run")
        self.trainer = self.manifest.data.get("trainer") or resolve_trainer(cfg.trainer)
        if cfg.trainer == "auto" and "trainer" not in self.manifest.data and self.trainer == "torch":
            self.out("trainer auto: Megatron stages unavailable (" + ", ".join(missing_megatron_parts()) +
                     "); using the in-process torch reference stages")
        self.manifest.set_trainer(self.trainer)
        if self.trainer == "megatron":
            how = {"persistent": "Megatron-Core, in one persistent stage worker",
                   "subprocess": "Megatron-Core subprocesses"}[cfg.launch.resolved_stage_runner()]
        else:
            how = "in-process transformers reference"
        self.out(f"policy stages: {self.trainer} ({how})")
        self.stages = make_stages(self.trainer, cfg, self.run_dir, self.progress, notify=self.out)

    def _report(self, t: int, rollouts: Rollouts, pairs: Pairs, trained: TrainResult,
                evaluation: EvalResult | None) -> dict:
        """The row of iteration t in the table and results.json; its numbers also go to tensorboard."""
        row = {"iteration": t, "pairs": pairs.pairs, "dropped": pairs.dropped, "loss": trained.metrics.get("loss"),
               "rollout_mean_tokens": rollouts.mean_tokens, "eta": trained.eta}
        if trained.eta is not None:
            self.tb.add_scalar("train/eta", trained.eta, t)
        if evaluation is not None:
            row.update(win_rate=evaluation.win_rate, stderr=evaluation.stderr, n=evaluation.n,
                       mean_tokens=evaluation.policy_length["mean_tokens"],
                       ref_mean_tokens=evaluation.baseline_length["mean_tokens"])
            self.tb.add_scalar("eval/win_rate_vs_ref", evaluation.win_rate, t)
            self.tb.add_scalar("eval/mean_response_tokens", row["mean_tokens"], t)
        if row["loss"] is not None:
            self.tb.add_scalar("train/final_loss", row["loss"], t)
        return row

    # -- plumbing ---------------------------------------------------------------------------------------------
    @property
    def tb(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._tb

    def stage(self, key: str, result: type[R], fn: Callable[[], R], step: int = 0) -> R:
        """Run stage `key` unless the manifest has it; fn() returns the outputs to record. Its events are
        `<key>@<point>` (megatron_inpo/events.py)."""
        m = self.manifest
        assert m is not None
        if m.done(key):
            return result.from_dict(m.outputs(key))
        attempt = m.start(key)
        self.out(f"[{time.strftime('%H:%M:%S')}] {key} ..." + (f" (resuming, attempt {attempt})" if attempt > 1 else ""))
        t0 = time.perf_counter()
        with events.scope(key):
            outputs = fn()
            dt = time.perf_counter() - t0
            events.emit("end")  # the worst moment: outputs complete, not yet recorded
        m.finish(key, outputs.to_dict(), dt)
        self.tb.add_scalar(f"stage_seconds/{key.split('/')[-1]}", dt, step)
        self.tb.flush()
        self.out(f"[{time.strftime('%H:%M:%S')}] {key} done in {dt:.1f} s")
        return outputs

    def server_memory(self, action: str) -> None:
        """'release' before a Megatron stage, 'resume' before rollout / judging (server_memory_saver; the calls, the
        record that survives a killed driver and the events `<stage>@<action>:...` are serving/memory.py's)."""
        from megatron_inpo.serving.memory import ServerMemory, memory_servers

        memory = ServerMemory(self.run_dir, memory_servers(self.cfg.rollout, (self.cfg.judge, self.cfg.eval.judge)),
                              enabled=self.cfg.server_memory_saver)
        {"release": memory.release, "resume": memory.resume}[action]()

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

    # -- stages -----------------------------------------------------------------------------------------------
    def _prepare(self) -> TaskFiles:
        cfg = self.cfg
        if cfg.model.source == "synthetic":
            from megatron_inpo.task.synthetic import prepare_task

            paths = prepare_task(self.run_dir / "task", cfg.task, cfg.iterations)
            return TaskFiles(prompts=[paths[f"prompts_iter{t}"] for t in range(1, cfg.iterations + 1)],
                             eval_prompts=paths["eval_prompts"], sft=paths["sft"], model_init=paths["model_init"],
                             tokenizer=paths["tokenizer"])
        hf = str(Path(cfg.model.hf_path).resolve()) if cfg.model.source == "hf" else self._materialize()
        if cfg.task.kind == "ifbench":
            from megatron_inpo.task.ifbench import load_prompts, scorable, split_prompts, write_prompt_files

            split = split_prompts(self._fitting(scorable(load_prompts()), hf), cfg.task.seed, cfg.iterations,
                                  cfg.task.prompts_per_iteration, cfg.task.eval_prompts)
            paths = write_prompt_files(split, self.run_dir / "task")
            return TaskFiles(prompts=paths["train"], eval_prompts=paths["eval"], hf=hf)
        return TaskFiles(prompts=[str(Path(p).resolve()) for p in cfg.prompts],
                         eval_prompts=str(Path(cfg.eval.prompts).resolve()) if cfg.eval.enabled else "", hf=hf)

    def _fitting(self, prompts: list, hf: str) -> list:
        """The IFBench prompts whose rendered prompt plus rollout.sampling.max_new_tokens response fits
        train.max_seq_len (a longer pair is refused by training); how many were left out is printed."""
        from megatron_inpo.rollout.engine import encode_prompt, load_tokenizer

        cfg = self.cfg
        tok = load_tokenizer(cfg.rollout.tokenizer_path or hf)
        room = cfg.train.max_seq_len + 1 - cfg.rollout.sampling.max_new_tokens
        kept = [p for p in prompts if len(encode_prompt(tok, p.prompt, cfg.rollout.chat_template)) <= room]
        if len(kept) < len(prompts):
            self.out(f"  IFBench: {len(prompts) - len(kept)} of {len(prompts)} scorable prompts left out: longer "
                     f"than {room} tokens (train.max_seq_len + 1 - rollout.sampling.max_new_tokens)")
        return kept

    def _materialize(self) -> str:
        """model.source 'gguf': the GGUF dequantized into <run_dir>/model (atomic; a resumed prepare reuses it)."""
        from megatron_inpo.convert.gguf import find_packaged_gguf, materialize_gguf

        out = self.run_dir / "model"
        if not out.exists():
            gguf = Path(self.cfg.model.gguf_path) if self.cfg.model.gguf_path else find_packaged_gguf()
            summary = materialize_gguf(gguf, out)
            self.out(f"  pi_ref: {gguf.name} dequantized into {out} ({summary['parameters'] / 1e6:.1f} M "
                     "parameters, float32)")
        return str(out)

    def _make_ref(self) -> Policy:
        self.server_memory("release")
        files = TaskFiles.from_dict(self.manifest.outputs("prepare"))
        pol = self.run_dir / "policies"
        if self.cfg.model.source == "synthetic":
            init = self.stages.import_hf(Path(files.model_init), pol / "init")
            ref = self.stages.sft(init, Path(files.sft), self.run_dir / "sft")
        else:
            ref = self.stages.import_hf(Path(files.hf), pol / "pi_ref")
        return Policy(policy=str(ref))

    def _export(self, n: int, policy: Path) -> str:
        key = f"iter{n}/export"
        if n == 1 and self.cfg.model.source != "synthetic":
            return self.stage(key, HFExport, lambda: HFExport(hf=self.manifest.outputs("prepare")["hf"]), n).hf

        def run() -> HFExport:
            self.server_memory("release")
            return HFExport(hf=str(self.stages.export_hf(policy, self.run_dir / "hf" / f"pi_{n}",
                                                         self.cfg.model.export_dtype)))

        return self.stage(key, HFExport, run, n).hf

    def _rollout(self, t: int, hf_t: str, files: TaskFiles, it: Path) -> Rollouts:
        from megatron_inpo.data.prompts import read_prompts
        from megatron_inpo.rollout.engine import make_engine
        from megatron_inpo.rollout.pipeline import rollout_stage

        cfg = dataclasses.replace(self.cfg.rollout, model_path=hf_t,
                                  tokenizer_path=self.cfg.rollout.tokenizer_path or hf_t)

        @contextlib.contextmanager
        def policy_engine() -> Iterator[Any]:  # started only when prompts are left
            self.server_memory("resume")
            engine = make_engine(cfg)
            try:
                if cfg.backend == "sglang":  # servers hold the previous policy: load pi_t from disk, flush caches
                    engine.update_weights(hf_t, version=f"pi_{t}")
                yield engine
            finally:
                engine.close()

        s = rollout_stage(read_prompts(files.prompts[t - 1]), policy_engine, it / "rollouts.jsonl", iteration=t,
                          batch_size=self.cfg.rollout_batch_size, progress=self.progress)
        return Rollouts(rollouts=s["rollouts"], prompts=s["prompts"], sequences=s["sequences"],
                        mean_tokens=s["mean_tokens"])

    def _judge_pairs(self, t: int, rollouts: Rollouts, it: Path) -> Pairs:
        from megatron_inpo.rollout.pipeline import judge_stage

        self.server_memory("resume")
        judge = self.judge()
        out = it / "pairs.jsonl"
        s = judge_stage(rollouts.rollouts, judge, self.cfg.algorithm.resolved_selection(judge.kind), out,
                        iteration=t, model_version=f"pi_{t}", batch_size=self.cfg.rollout_batch_size,
                        progress=self.progress, winrate=self.cfg.algorithm.sppo_winrate)
        if s["pairs"] == 0:
            raise RuntimeError(f"iteration {t}: the judge kept no pair ({out}); nothing to train on")
        return Pairs(pairs_file=s["pairs_file"], pairs=s["pairs"], dropped=s["dropped"], method=s["method"],
                     comparisons_this_attempt=s["comparisons"])

    def _logprobs(self, t: int, pairs: Pairs, ref: Path, last: Path, it: Path) -> LogprobResult:
        out = it / "pairs.logp.jsonl"
        self.server_memory("release")
        self.stages.logprobs(Path(pairs.pairs_file), out, ref, None if t == 1 else last)
        return LogprobResult(data=str(out))

    def _train(self, t: int, scored: LogprobResult, init: Path, it: Path) -> TrainResult:
        self.server_memory("release")
        objective = self.cfg.algorithm.objective_at(t)  # this iteration's eta (algorithm.eta_schedule)
        ckpt, metrics = self.stages.train(Path(scored.data), init, it / "train", objective)
        return TrainResult(checkpoint=str(ckpt), metrics=metrics, eta=objective.eta)

    def _checkpoint(self, t: int, trained: TrainResult) -> Checkpoint:
        # pi_{t+1} is the training stage's final checkpoint (already written atomically); record it under a stable
        # name so that later stages, `evaluate` and users find it without knowing the engine's layout.
        link = self.run_dir / "policies" / f"pi_{t + 1}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path(trained.checkpoint))
        return Checkpoint(policy=str(trained.checkpoint), link=str(link))

    def _eval(self, t: int, hf_policy: str, hf_ref: str, files: TaskFiles) -> EvalResult:
        from megatron_inpo.data.prompts import read_prompts
        from megatron_inpo.evaluate import evaluate_pair

        self.server_memory("resume")
        ev = self.cfg.eval
        prompts = read_prompts(files.eval_prompts, limit=ev.num_prompts or None)
        rcfg = dataclasses.replace(self.cfg.rollout, tokenizer_path=self.cfg.rollout.tokenizer_path or hf_ref)
        return EvalResult.from_dict(evaluate_pair(
            rcfg, self.eval_judge(), hf_policy, hf_ref, prompts, ev.samples_per_prompt, ev.sampling,
            self.run_dir / "eval" / f"pi_{t + 1}", policy_name=f"pi_{t + 1}", baseline_name="pi_ref",
            baseline_cache=self.run_dir / "eval" / "pi_ref.generations.jsonl", progress=self.progress))

    def _ifbench_meter(self, t: int, files: TaskFiles) -> dict:
        """task.kind 'ifbench': IFBench accuracy (strict / loose, prompt / instruction level, with standard errors) of
        pi_{t+1}'s and pi_ref's evaluation generations, by the benchmark's own scorer (task/ifbench.py): the row's
        'ifbench' and 'ref_ifbench'. Cheap (milliseconds per response) and a pure function of the generations
        files, so it is recomputed rather than recorded as a stage."""
        if self.cfg.task.kind != "ifbench":
            return {}
        from megatron_inpo.task.ifbench import evaluate_generations

        ev = self.run_dir / "eval"
        row = {"ifbench": evaluate_generations(files.eval_prompts, ev / f"pi_{t + 1}" / f"pi_{t + 1}.generations.jsonl"),
               "ref_ifbench": evaluate_generations(files.eval_prompts, ev / "pi_ref.generations.jsonl")}
        for mode in ("strict", "loose"):
            for level in ("prompt_level", "instruction_level"):
                if t == 1:
                    self.tb.add_scalar(f"ifbench/{mode}_{level}", row["ref_ifbench"][mode][level], 0)
                self.tb.add_scalar(f"ifbench/{mode}_{level}", row["ifbench"][mode][level], t)
        return row

    def _nash_meter(self, t: int, hf_policy: str, hf_ref: str, files: TaskFiles) -> dict:
        """The Nash meter's columns of iteration t (megatron_inpo/nash_meter.py), pi_ref's as ref_*: exact KL to
        pi* and duality gap on the game task (stages 'meter/pi_ref', 'iter{t}/meter'); on the word task the style
        mix of the eval samples and its exploitability in the style game (an approximation, computed from the
        evaluation's generations)."""
        from megatron_inpo import nash_meter

        cfg = self.cfg
        if cfg.model.source != "synthetic":
            return {}
        if cfg.task.kind != "game":
            ev = self.run_dir / "eval"
            mix, ref_mix = (nash_meter.style_mix(ev / f"pi_{t + 1}" / f"pi_{t + 1}.generations.jsonl"),
                            nash_meter.style_mix(ev / "pi_ref.generations.jsonl"))
            row = {"style_mix": mix, "style_exploitability": nash_meter.style_exploitability(mix),
                   "ref_style_mix": ref_mix, "ref_style_exploitability": nash_meter.style_exploitability(ref_mix)}
            for k in ("rock", "paper", "scissors"):
                self.tb.add_scalar(f"eval/style_{k}", mix[k], t)
            self.tb.add_scalar("eval/style_exploitability_approx", row["style_exploitability"], t)
            return row
        tau = cfg.eval.nash_tau or cfg.algorithm.objective.tau
        ref = self.stage("meter/pi_ref", NashReading, lambda: NashReading(
            nash_meter.reference_reading(hf_ref, files.eval_prompts, tau))).reading
        cur = self.stage(f"iter{t}/meter", NashReading, lambda: NashReading(
            nash_meter.iterate_reading(hf_policy, ref)), t).reading
        row = {k: cur[k] for k in ("kl_to_nash", "duality_gap", "leaked_mass")}
        row.update({f"ref_{k}": ref[k] for k in ("kl_to_nash", "duality_gap", "leaked_mass")})
        row.update(nash_tau=tau, nash_games=ref["games"], nash_residual=ref["nash_residual"],
                   nash_gap=ref["nash_gap"])
        for k in ("kl_to_nash", "duality_gap", "leaked_mass"):
            if t == 1:
                self.tb.add_scalar(f"nash/{k}", ref[k], 0)
            self.tb.add_scalar(f"nash/{k}", cur[k], t)
        return row
