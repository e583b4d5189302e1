"""Interrupts and one run per directory (issue 21, items 1, 2 and 7).

- SIGINT exits 130 and SIGTERM 143 with "rerun the same command to resume", also when the process was started with
  SIGINT ignored (what a POSIX shell does to `cmd &` in a script: the hostile probe's Ctrl-C was swallowed so).
- `run` interrupted inside a Megatron stage (the persistent stage worker, a stage subprocess) or inside the
  driver's own rollout stops within 10 s with no process of the run left, and the rerun ends bit-identical to an
  uninterrupted run.
- A second `run` on a live run directory is refused at once, naming the holder; a SIGKILLed holder leaves no lock.
About 4 minutes on 2 CPU cores (three interrupted runs and their reruns, one uninterrupted reference).
"""
import json
import os
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


def _start(argv: list[str]) -> subprocess.Popen:
    # SIGINT ignored from the start, as a script's `cmd &` leaves it: the command must still obey it
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=str(REPO), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 600) -> str:
    """Read proc's stdout until a line contains `marker`; returns what was read."""
    seen, t0 = [], time.monotonic()
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return "".join(seen)
        assert time.monotonic() - t0 < timeout, "".join(seen)[-2000:]
    raise AssertionError(f"{marker!r} never printed; rc {proc.wait()}: {''.join(seen)[-2000:]} {proc.stderr.read()}")


@pytest.mark.parametrize("sig, rc, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signals_exit_130_and_143_even_when_inherited_ignored(sig, rc, word):
    proc = _start([PY, "-c", CHILD])
    _wait_for(proc, "ready", timeout=60)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == rc
    assert err.strip() == f"prog: {word}; rerun the same command to resume"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    r = run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(run, engine="megatron",
                                                                                  iterations=1)], timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return json.loads((run / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.megatron
@pytest.mark.parametrize("sig, runner, stage", [(signal.SIGINT, "persistent", "iter1/train"),
                                                (signal.SIGTERM, "subprocess", "iter1/logprobs"),
                                                (signal.SIGINT, "persistent", "iter1/rollout")])
def test_run_interrupted_in_a_stage_stops_and_resumes_bit_identically(reference, tmp_path, sig, runner, stage):
    from megatron_inpo.driver.stages import missing_megatron_parts

    if missing_megatron_parts():
        pytest.skip("engine=megatron needs: " + ", ".join(missing_megatron_parts()))
    args = ["run", "--recipe", "tiny_cpu", "--no-progress", f"--launch.stage_runner={runner}",
            *tiny_overrides(tmp_path / "run", engine="megatron", iterations=1)]
    proc = _start([PY, "-m", "megatron_inpo", *args])
    _wait_for(proc, f"] {stage} ...")
    time.sleep(0.7)  # inside the stage (the probe's timing)
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    stopped = time.monotonic() - t0
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err[-3000:]
    assert stopped < 10, stopped
    assert "rerun the same command to resume" in err.strip().splitlines()[-1]
    assert stage_processes_left() == []  # the stage worker / stage subprocess and their ranks are gone
    r = run_cli(args, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    got = json.loads((tmp_path / "run" / "results.json").read_text())
    ta, tb = tensors(reference["final_hf"]), tensors(got["final_hf"])
    assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    assert got["table"] == reference["table"]
    assert stage_processes_left() == []


@pytest.mark.slow
@pytest.mark.megatron
def test_second_run_on_a_live_directory_is_refused_naming_the_holder(tmp_path):
    args = ["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(tmp_path / "run", iterations=1)]
    first = _start([PY, "-m", "megatron_inpo", *args])
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
