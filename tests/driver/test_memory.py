"""server_memory_saver: the SGLang servers' released / resumed state is recorded in the run directory, so a driver
killed at any moment of a release or resume, then rerun, never sends a resume to a server that was not released
nor a second release (either kills a real SGLang server; the stateful fake dies the same way and records it).

The fast tests drive Driver.server_memory in-process, "killing" it with an exception at each event of a memory call
(megatron_inpo/events.py); the slow test SIGKILLs the real driver (trainer=torch, rollout on the fake server) at every transition and reruns it."""
import json
import signal

import pytest

from megatron_inpo import events
from tests.helpers.driver import run_cli, sglang_overrides, task_server, tiny_overrides
from megatron_inpo.cli.run import resolve_config
from megatron_inpo.driver.loop import Driver
from megatron_inpo.serving.memory import MEMORY_FILE
from megatron_inpo.serving.pool import SGLangError
from tests.helpers.rollout import FakeSGLang

PHASES = ["sending", "sent", "recorded"]
IN_DOUBT = {"sending", "sent"}  # between the 'releasing'/'resuming' record and the final one
STEPS = [("s1", "release"), ("s2", "resume"), ("s3", "release"), ("s4", "resume")]


class Killed(BaseException):
    pass


def _cfg(tmp_path, policy, judge):
    return resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "run") + [
        "server_memory_saver=true", "rollout.backend=sglang", f"rollout.server_urls=[{policy.url}]",
        "judge.kind=pairwise", "judge.backend=sglang", f"judge.server_urls=[{judge.url}]", "judge.model_path=pm"])


def _step(cfg, key, action):
    d = Driver(cfg, progress=False, out=lambda s: None)
    with events.scope(key):
        d.server_memory(action)


def _memory_calls(srv):
    return [(p.split("_")[0].lstrip("/"), b["tags"]) for p, b in srv.requests if p.endswith("_memory_occupation")]


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("at", range(len(STEPS)))
def test_killed_at_every_memory_transition_never_makes_an_invalid_call(tmp_path, monkeypatch, at, phase):
    key, action = STEPS[at]
    point = f"{key}@{action}:{phase}"
    def fault(name):
        if name == point and not fault.fired:
            fault.fired = True
            raise Killed(name)

    fault.fired = False
    monkeypatch.setattr(events, "_listeners", [])  # this test's listener alone, gone when it ends
    events.subscribe(fault)
    with FakeSGLang() as policy, FakeSGLang() as judge:
        cfg = _cfg(tmp_path, policy, judge)
        i, refusals = 0, 0
        while i < len(STEPS):
            try:
                _step(cfg, *STEPS[i])
                i += 1
            except Killed:
                continue  # the "restarted driver" reruns the interrupted stage
            except RuntimeError as e:
                # in doubt: the rerun stops, names the server and the way out; the operator restarts the servers
                assert phase in IN_DOUBT and "unknown" in str(e) and "Restart that SGLang server" in str(e)
                refusals += 1
                assert refusals == 1
                policy.restart()
                judge.restart()
        assert fault.fired
        for srv in (policy, judge):
            assert srv.fatal is None and srv.refused == []
            assert srv.released == set()  # the last step resumed everything
        assert refusals == (1 if phase in IN_DOUBT else 0)
        # the policy servers' weights and KV cache, the judge's KV cache only
        assert {tuple(t) for _, t in _memory_calls(policy)} == {("weights", "kv_cache")}
        assert {tuple(t) for _, t in _memory_calls(judge)} == {("kv_cache",)}
        if phase == "recorded":  # no doubt: every transition sent exactly once
            assert [a for a, _ in _memory_calls(policy)] == [a for _, a in STEPS]
        rec = json.loads((tmp_path / "run" / MEMORY_FILE).read_text())
        assert {v["state"] for v in rec["servers"].values()} == {"resumed"}


def test_state_survives_the_driver_and_a_server_restart_is_noticed(tmp_path):
    with FakeSGLang() as policy, FakeSGLang() as judge:
        cfg = _cfg(tmp_path, policy, judge)
        _step(cfg, "a", "release")
        _step(cfg, "b", "release")  # a new driver: the record says released, nothing is sent
        assert len(_memory_calls(policy)) == 1 and policy.released == {"weights", "kv_cache"}
        policy.restart()  # e.g. the operator restarted it: a fresh server holds its memory
        _step(cfg, "c", "resume")  # so no resume is sent to it (that would kill it); the judge is resumed
        assert len(_memory_calls(policy)) == 1 and _memory_calls(judge)[-1] == ("resume", ["kv_cache"])
        _step(cfg, "d", "release")
        assert policy.released == {"weights", "kv_cache"} and policy.fatal is None and judge.fatal is None


def test_a_server_listed_for_rollout_and_judge_is_released_once(tmp_path):
    with FakeSGLang() as srv:
        cfg = _cfg(tmp_path, srv, srv)
        _step(cfg, "a", "release")
        _step(cfg, "b", "resume")
        assert _memory_calls(srv) == [("release", ["weights", "kv_cache"]), ("resume", ["weights", "kv_cache"])]
        assert srv.fatal is None


def test_memory_calls_are_never_retried_and_a_lost_answer_stays_in_doubt(tmp_path):
    with FakeSGLang() as policy, FakeSGLang() as judge:
        cfg = _cfg(tmp_path, policy, judge)
        policy.inject("/release_memory_occupation", "http503", count=1)
        with pytest.raises(SGLangError, match="1 attempt"):
            _step(cfg, "a", "release")
        assert len(_memory_calls(policy)) == 1  # sent once, not retried
        rec = json.loads((tmp_path / "run" / MEMORY_FILE).read_text())
        assert rec["servers"][policy.url]["state"] == "releasing"  # no answer: whether it acted is unknown
        with pytest.raises(RuntimeError, match="unknown"):
            _step(cfg, "a", "release")
        assert len(_memory_calls(policy)) == 1
        policy.restart()  # the way out the message names
        _step(cfg, "b", "release")
        assert policy.released == {"weights", "kv_cache"} and policy.fatal is None
        # a refusal (HTTP 4xx) is an answer: the server did nothing, the previous state is restored, no doubt
        judge.inject("/resume_memory_occupation", "http400", count=1)
        with pytest.raises(SGLangError, match="HTTP 400"):
            _step(cfg, "c", "resume")
        rec = json.loads((tmp_path / "run" / MEMORY_FILE).read_text())
        assert rec["servers"][judge.url]["state"] == "released"
        _step(cfg, "c", "resume")
        assert policy.released == judge.released == set() and policy.fatal is None and judge.fatal is None


def test_switching_the_saver_off_on_resumption_still_resumes_released_servers(tmp_path):
    with FakeSGLang() as policy, FakeSGLang() as judge:
        _step(_cfg(tmp_path, policy, judge), "a", "release")
        off = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "run") + [
            "server_memory_saver=false", "rollout.backend=sglang", f"rollout.server_urls=[{policy.url}]",
            "judge.kind=pairwise", "judge.backend=sglang", f"judge.server_urls=[{judge.url}]", "judge.model_path=pm"])
        _step(off, "b", "release")  # off: no new release
        _step(off, "c", "resume")  # but memory this run released comes back before rollout
        assert policy.released == judge.released == set()
        assert [a for a, _ in _memory_calls(policy)] == ["release", "resume"]


def test_servers_without_the_memory_saver_are_refused(tmp_path):
    from megatron_inpo.config import ConfigError

    with FakeSGLang(memory_saver=False) as policy, FakeSGLang() as judge:
        with pytest.raises(ConfigError, match="--enable-memory-saver"):
            _step(_cfg(tmp_path, policy, judge), "a", "release")
        assert _memory_calls(policy) == []


# ---------------------------------------------------------------------------------------------------------------
# The real driver, SIGKILLed

# Where the memory changes in a one-iteration run without eval: before SFT, before rollout, before the log-prob
# pass (the judge, the training stage and the exports find the state they need already recorded).
# A Latin square over (transition, phase): each run kills the driver once at each transition, each pair is covered
# by one run. (A restart of a server after an in-doubt kill leaves nothing to do at that transition, so one run
# cannot reach every phase of it.)
KILL_PLANS = [["sft@release:sending", "iter1/rollout@resume:sent", "iter1/logprobs@release:recorded"],
              ["sft@release:sent", "iter1/rollout@resume:recorded", "iter1/logprobs@release:sending"],
              ["sft@release:recorded", "iter1/rollout@resume:sending", "iter1/logprobs@release:sent"]]


@pytest.mark.slow
@pytest.mark.parametrize("points", KILL_PLANS, ids=["plan0", "plan1", "plan2"])
def test_sigkilled_driver_at_every_memory_transition_reruns_to_completion(tmp_path, points):
    with task_server() as srv:
        args = ["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(tmp_path / "run", iterations=1),
                "--eval.enabled=false", *sglang_overrides(srv.url)]
        env = {"MEGATRON_INPO_FAULT": ",".join(points)}
        kills = refusals = 0
        for _ in range(3 * len(points)):
            r = run_cli(args, env=env)
            if r.returncode == -signal.SIGKILL:
                kills += 1
                continue
            if r.returncode != 0 and "Restart that SGLang server" in r.stderr:
                refusals += 1
                srv.restart()  # what the message asks for
                continue
            break
        assert r.returncode == 0, r.stderr[-3000:]
        assert kills == len(points)
        assert refusals == sum(p.split(":")[1] in IN_DOUBT for p in points)
        assert srv.fatal is None and srv.refused == []  # no invalid call ever reached the server
        fired = sorted(p.name for p in (tmp_path / "run" / ".faults").iterdir())
        assert fired == sorted(p.replace("/", "_") for p in points)
        rec = json.loads((tmp_path / "run" / MEMORY_FILE).read_text())
        assert rec["servers"][srv.url]["state"] == "released"  # after the log-prob pass and training
        assert srv.released == {"weights", "kv_cache"}
        rows = [json.loads(x) for x in (tmp_path / "run" / "iter_01" / "rollouts.jsonl").read_text().splitlines()]
        assert len(rows) == len({r["prompt_id"] for r in rows}) == 32
        # rollout ran on resumed memory (the fake dies on generation over released memory) with pi_1 loaded
        man = json.loads((tmp_path / "run" / "manifest.json").read_text())
        paths = [p for p, _ in srv.requests]
        update = srv.requests[max(i for i, p in enumerate(paths[:paths.index("/generate")])
                                  if p == "/update_weights_from_disk")][1]
        assert update["model_path"] == man["stages"]["iter1/export"]["outputs"]["hf"]
        assert update["weight_version"] == "pi_1"
