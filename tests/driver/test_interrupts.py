"""Interrupts and one run per directory (issue 21, items 1, 2 and 7).

- SIGINT exits 130 and SIGTERM 143 with "rerun the same command to resume", also when the process was started with
  SIGINT ignored (what a POSIX shell does to `cmd &` in a script: the hostile probe's Ctrl-C was swallowed so).
- `run` interrupted in every stage kind in turn (the Megatron stages in the persistent stage worker or as stage
  subprocesses, the driver's own stages), SIGINT and SIGTERM alternating, stops within 10 s each time with no process
  of the run left, and the last rerun ends bit-identical to an uninterrupted run.
- A second `run` on a live run directory is refused at once, naming the holder; a SIGKILLed holder leaves no lock.
About 6 minutes on 2 CPU cores (two runs interrupted nine times each, one uninterrupted reference).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.driver import PY, REPO, run_cli, stage_processes_left, tensors, tiny_overrides

CHILD = """
import sys, time
from megatron_inpo.cli.loader import guard
def body():
    print("ready", flush=True)
    time.sleep(60)
sys.exit(guard("prog", body))
"""


def _env() -> dict:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    e.pop("MEGATRON_INPO_FAULT", None)
    return e


def _start(argv: list[str], err_path) -> subprocess.Popen:
    # SIGINT ignored from the start, as a script's `cmd &` leaves it: the command must still obey it. stderr goes to
    # a file: an undrained pipe would block the child once its warnings fill the pipe's buffer
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(err_path, "w"), text=True, env=_env(),
                            cwd=str(REPO), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 600) -> str:
    """Read proc's stdout until a line contains `marker`; returns what was read."""
    seen, t0 = [], time.monotonic()
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        assert time.monotonic() - t0 < timeout, "".join(seen)[-2000:]
    raise AssertionError(f"{marker!r} never printed; rc {proc.wait()}: {''.join(seen)[-2000:]}")


@pytest.mark.parametrize("sig, rc, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signals_exit_130_and_143_even_when_inherited_ignored(sig, rc, word, tmp_path):
    proc = _start([PY, "-c", CHILD], tmp_path / "err")
    _wait_for(proc, "ready", timeout=60)
    proc.send_signal(sig)
    proc.communicate(timeout=10)
    assert proc.returncode == rc
    assert (tmp_path / "err").read_text().strip() == f"prog: {word}; rerun the same command to resume"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(run, trainer="megatron",
                                                                                  iterations=1)], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((run / "results.json").read_text())


STAGE_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] (?:iter\d+/)?(\w+) \.\.\.")
STAGE_KINDS = {"prepare", "sft", "export", "rollout", "judge", "logprobs", "train", "checkpoint", "eval"}
"""Every stage kind of a synthetic one-iteration run (driver/loop.py): the Megatron stages (sft, export, logprobs,
train, checkpoint) and the driver's own (prepare, rollout, judge, eval)."""


def _next_new_stage(proc: subprocess.Popen, hit: set[str], timeout: float = 600) -> str | None:
    """Read proc's stdout until a stage of a kind not in `hit` starts; its kind, or None if the run ended first."""
    t0 = time.monotonic()
    for line in proc.stdout:
        m = STAGE_LINE.match(line)
        if m and m.group(1) not in hit:
            return m.group(1)
        assert time.monotonic() - t0 < timeout, line
    return None


@pytest.mark.slow
@pytest.mark.one_stack
@pytest.mark.megatron
@pytest.mark.parametrize("runner, first", [("persistent", signal.SIGINT), ("subprocess", signal.SIGTERM)])
def test_run_interrupted_in_every_stage_kind_stops_and_resumes_bit_identically(reference, tmp_path, runner, first):
    """One run, interrupted once in each stage kind in turn (SIGINT and SIGTERM alternating) and rerun each time:
    every interrupt stops it within 10 s with 130 / 143, the resume line and no process of the run left, and the
    last rerun ends bit-identical to an uninterrupted run."""
    from megatron_inpo.driver.stages import missing_megatron_parts

    if missing_megatron_parts():
        pytest.skip("trainer=megatron needs: " + ", ".join(missing_megatron_parts()))
    args = ["run", "--recipe", "tiny_cpu", "--no-progress", f"--launch.stage_runner={runner}",
            *tiny_overrides(tmp_path / "run", trainer="megatron", iterations=1)]
    other = {signal.SIGINT: signal.SIGTERM, signal.SIGTERM: signal.SIGINT}
    hit: list[str] = []
    sig = first
    while True:
        proc = _start([PY, "-m", "megatron_inpo", *args], tmp_path / "err")
        kind = _next_new_stage(proc, set(hit))
        if kind is None:  # every kind was interrupted once: this rerun ran to the end
            proc.communicate(timeout=60)
            assert proc.returncode == 0, (tmp_path / "err").read_text()[-3000:]
            break
        time.sleep(0.3)  # inside the stage (short ones may be over: the next one is interrupted then)
        t0 = time.monotonic()
        proc.send_signal(sig)
        proc.communicate(timeout=30)
        stopped = time.monotonic() - t0
        err = (tmp_path / "err").read_text()
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), (kind, err[-3000:])
        assert stopped < 10, (kind, stopped)
        assert "rerun the same command to resume" in err.strip().splitlines()[-1], (kind, err[-3000:])
        assert stage_processes_left() == [], kind  # the stage worker / stage subprocess and their helpers are gone
        hit.append(kind)
        sig = other[sig]
    assert set(hit) == STAGE_KINDS, hit
    got = json.loads((tmp_path / "run" / "results.json").read_text())
    ta, tb = tensors(reference["final_hf"]), tensors(got["final_hf"])
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    assert got["table"] == reference["table"]
    assert stage_processes_left() == []


@pytest.mark.slow
@pytest.mark.megatron
def test_sigterm_reaches_torchrun_ranks_of_a_stage_and_the_rerun_completes(tmp_path):
    """A stage launched through torchrun (stage subprocesses, two ranks): SIGTERM to `run` (SLURM's preemption)
    stops the agent and both ranks within 10 s, exit 143, and the rerun resumes to the end. (Two ranks do not
    reduce in the one-rank order, so this run is not compared with the one-rank reference.)"""
    from megatron_inpo.driver.stages import missing_megatron_parts

    if missing_megatron_parts():
        pytest.skip("trainer=megatron needs: " + ", ".join(missing_megatron_parts()))
    args = ["run", "--recipe", "tiny_cpu", "--no-progress", "--launch.stage_runner=subprocess",
            "--launch.nproc_per_node=2", *tiny_overrides(tmp_path / "run", trainer="megatron", iterations=1),
            "--sft.micro_batch_size=16", "--train.micro_batch_size=4"]  # global batches split over two ranks
    proc = _start([PY, "-m", "megatron_inpo", *args], tmp_path / "err")
    _wait_for(proc, "] iter1/train ...")
    deadline = time.monotonic() + 120
    while len(stage_processes_left()) < 3 and time.monotonic() < deadline:  # the agent and its two ranks
        time.sleep(0.2)
    assert len(stage_processes_left()) >= 3
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    err = (tmp_path / "err").read_text()
    assert proc.returncode == 143 and time.monotonic() - t0 < 10, err[-3000:]
    assert stage_processes_left() == []
    r = run_cli(args, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "iter1/train ... (resuming, attempt 2)" in r.stdout
    assert stage_processes_left() == []


@pytest.mark.slow
@pytest.mark.megatron
def test_second_run_on_a_live_directory_is_refused_naming_the_holder(tmp_path):
    args = ["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(tmp_path / "run", iterations=1)]
    first = _start([PY, "-m", "megatron_inpo", *args], tmp_path / "err")
    try:
        _wait_for(first, "] prepare ...", timeout=300)
        t0 = time.monotonic()
        r = run_cli(args, timeout=120)
        assert r.returncode == 2 and time.monotonic() - t0 < 60
        line = r.stderr.strip().splitlines()[-1]
        assert "in use by" in line and f"pid {first.pid}" in line and "megatron_inpo run" in line, line
    finally:
        first.kill()  # SIGKILL: the kernel drops its lock
        first.communicate()
    r = run_cli(args, timeout=600)  # the rerun takes the lock over and resumes
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def test_lock_refuses_while_held_and_is_free_after_its_holder_is_killed(tmp_path):
    from megatron_inpo.files import DirectoryBusy, exclusive

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom megatron_inpo.files import exclusive\n"
                               f"with exclusive({str(tmp_path)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(60)\n"], stdout=subprocess.PIPE, text=True, env=_env(),
                              cwd=str(REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy, match=f"in use by pid {holder.pid}, `python[0-9.]* -c"):
            with exclusive(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path, "the run directory"):  # no stale lock after SIGKILL
        rec = json.loads((tmp_path / ".lock").read_text())
        assert rec["pid"] == os.getpid()


@pytest.mark.parametrize("argv, out", [
    (["train", "--data={t}/pairs.jsonl", "--init_checkpoint={t}/ckpt", "--output_dir={t}/out"], "out"),
    (["logprobs", "--data={t}/pairs.jsonl", "--ref_checkpoint={t}/ckpt", "--output={t}/scored.jsonl"], "scored.jsonl"),
    (["convert", "mcore-to-hf", "--mcore-dir", "{t}/ckpt", "--hf-dir", "{t}/hf"], "hf"),
    (["convert", "hf-to-mcore", "--hf-dir", "{t}/hf_in", "--mcore-dir", "{t}/mc"], "mc"),
])
def test_a_second_command_on_a_held_output_is_refused_at_once_naming_the_holder(tmp_path, argv, out):
    """train, logprobs and convert hold their output (`<output>.lock`, files.exclusive_output) like run and
    rollout: a second command on it exits 2 before reading anything, naming the holder, and writes nothing."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom megatron_inpo.files import "
                               f"exclusive_output\nwith exclusive_output({str(tmp_path / out)!r}, 'x'):\n"
                               "    print('held', flush=True)\n    time.sleep(120)\n"],
                              stdout=subprocess.PIPE, text=True, env=_env(), cwd=str(REPO))
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli([a.format(t=tmp_path) for a in argv], timeout=120)
        line = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and f"is in use by pid {holder.pid}" in line, r.stderr[-2000:]
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{out}.lock"]  # the holder's alone
    finally:
        holder.kill()
        holder.wait()
