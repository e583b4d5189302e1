"""The persistent stage worker (launch.stage_runner 'persistent', driver/worker.py) against one subprocess per
stage: the same table and final weights bit for bit; a worker SIGKILLed mid-stage is restarted and the stage
resumes; a SIGKILLed driver takes the worker with it and the rerun ends where an uninterrupted run does; a failed
stage takes the worker down and the next stage starts a new one; a leftover worker is reaped."""
import json
import signal
import time

import pytest

from megatron_inpo.driver.stages import missing_megatron_parts
from tests.helpers.driver import PORTS, run_cli, stage_processes_left, tensors, tiny_overrides

pytestmark = [pytest.mark.megatron,
              pytest.mark.skipif(bool(missing_megatron_parts()),
                                 reason="trainer=megatron needs: " + ", ".join(missing_megatron_parts()))]


def _run(run_dir, runner, env=None):
    return run_cli(["run", "--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(run_dir, trainer="megatron"),
                    f"--launch.stage_runner={runner}"], env=env, timeout=900)


@pytest.fixture(scope="module")
def persistent_run(tmp_path_factory):
    """Two iterations of the tiny run, every Megatron stage in one stage worker."""
    run = tmp_path_factory.mktemp("persistent")
    r = _run(run, "persistent")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return run, r.stdout


def _assert_same_results(a, b):
    import torch

    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["table"] == rb["table"] and 0.0 < ra["table"][0]["win_rate"] < 1.0
    ta, tb = tensors(ra["final_hf"]), tensors(rb["final_hf"])
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    for t in (1, 2):  # the stored log-probs too (the pass of iteration 2 reads pi_2 beside pi_ref)
        p = f"iter_{t:02d}/pairs.logp.jsonl"
        assert (a / p).read_bytes() == (b / p).read_bytes(), p


@pytest.mark.slow
def test_persistent_worker_gives_the_subprocess_runners_results(persistent_run, tmp_path):
    run, out = persistent_run
    assert "one persistent stage worker" in out
    # one worker for the whole run: every stage's log names the same pid, and each stage reported what it held
    pids = {line.split("pid ")[1].split(",")[0] for f in (run / "logs").glob("*.log") if f.name != "stage_worker.log"
            for line in f.read_text().splitlines() if "[stage worker, pid" in line}
    assert len(pids) == 1
    stage_logs = [f for f in (run / "logs").glob("*.log") if f.name != "stage_worker.log"]
    assert len(stage_logs) == 9  # import, sft, 3 exports, 2 x (logprobs, train)
    assert out.count("the stage worker holds RSS") == len(stage_logs)
    assert not (run / "worker").exists() and not (run / "stage_worker.json").exists()
    sub = tmp_path / "subprocess"
    r = _run(sub, "subprocess")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Megatron-Core subprocesses" in r.stdout
    _assert_same_results(run, sub)
    assert stage_processes_left() == []


@pytest.mark.slow
def test_worker_or_driver_killed_mid_stage_resumes_to_the_same_result(persistent_run, tmp_path):
    """SIGKILL of the worker while the SFT, the first log-prob pass and the second training stage run (after their
    first step checkpoint / chunk: the driver restarts the worker and sends the stage again, which resumes), and
    of the driver during the first training stage (the worker dies with it; the rerun starts a new one)."""
    run, _ = persistent_run
    b = tmp_path / "killed"
    worker_kills = ["sft@checkpoint:kill-worker", "iter1/logprobs@running:kill-worker",
                    "iter2/train@checkpoint:kill-worker"]
    env = {"MEGATRON_INPO_FAULT": ",".join(worker_kills + ["iter1/train@checkpoint"])}
    r = _run(b, "persistent", env)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-3000:]
    first = r.stdout + r.stderr
    r = _run(b, "persistent", env)
    out = first + "\n--- resumed ---\n" + r.stdout + r.stderr
    assert r.returncode == 0, out
    assert out.count("starting a new stage worker") == len(worker_kills), out
    for p in worker_kills + ["iter1/train@checkpoint"]:
        assert (b / ".faults" / p.replace("/", "_")).exists(), (p, out)
    man = json.loads((b / "manifest.json").read_text())
    assert man["stages"]["iter1/train"]["attempts"] == 2, man
    for log in ("sft", "train_iter_01", "train_iter_02"):
        assert "resuming from" in (b / "logs" / f"{log}.log").read_text(), (log, out)
    _assert_same_results(run, b)
    assert stage_processes_left() == [], out


@pytest.mark.slow
def test_failed_stage_takes_the_worker_down_and_the_next_stage_starts_a_new_one(tmp_path):
    from megatron_inpo.cli.run import resolve_config
    from megatron_inpo.driver.launcher import StageCall, StageError
    from megatron_inpo.driver.stages import MegatronStages
    from megatron_inpo.engine.config import TrainStageConfig
    from tests.helpers.engine import tiny_hf_model

    cfg = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "m", trainer="megatron", iterations=1) +
                         ["--launch.stage_runner=persistent"])
    lines = []
    st = MegatronStages(cfg, tmp_path / "m", notify=lines.append)
    try:
        tiny_hf_model().save_pretrained(tmp_path / "hf")
        st.import_hf(tmp_path / "hf", tmp_path / "a")
        first = st.launcher.worker.pid
        assert (tmp_path / "a" / "megatron_inpo.json").exists() and st.launcher.worker.alive()
        broken = TrainStageConfig(data=str(tmp_path / "missing.jsonl"), init_checkpoint=str(tmp_path / "a"),
                                  output_dir=str(tmp_path / "out"))
        with pytest.raises(StageError, match=r"stage broken failed \(exit 2\)"):
            st.run("broken", StageCall("train", broken, []))
        assert st.launcher.worker is None  # gone, its group killed
        log = (tmp_path / "m" / "logs" / "broken.log").read_text()
        assert "megatron-inpo train: error: " in log and "missing.jsonl" in log  # its one line, in its log
        st.import_hf(tmp_path / "hf", tmp_path / "b")
        assert st.launcher.worker.pid != first
        # the same tensors from the fresh worker (.metadata differs anyway: torch records the path and a save id)
        a, b = ({k: v for k, v in json.loads((tmp_path / f / "megatron_inpo.json").read_text())["files"].items()
                 if k != ".metadata"} for f in ("a", "b"))
        assert a == b and len(a) >= 1
    finally:
        st.close()
    assert stage_processes_left() == []
    assert len([line for line in lines if "the stage worker holds" in line]) == 2


@pytest.mark.slow
def test_leftover_worker_is_reaped(tmp_path):
    """A worker whose driver could not stop it (here: still running) is killed by reap_orphan_stage, as a stage
    subprocess is."""
    from megatron_inpo.cli.run import resolve_config
    from megatron_inpo.driver.launcher import WORKER_FILE, StageLauncher, reap_orphan_stage

    cfg = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path, trainer="megatron", iterations=1))
    launcher = StageLauncher(cfg.launch, tmp_path)
    launcher._start_worker()
    proc = launcher.worker.proc
    deadline = time.monotonic() + 120
    while "ready" not in (tmp_path / "logs" / "stage_worker.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (tmp_path / WORKER_FILE).exists() and proc.poll() is None
    assert reap_orphan_stage(tmp_path) == "stage worker"
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / WORKER_FILE).exists()
    assert stage_processes_left() == []


def test_each_stage_starts_from_a_fresh_process_state(monkeypatch):
    """What a stage may change in the worker's process and a fresh process would not have: put back before the
    next stage (torch's RNG seed and state, default dtype, deterministic flags, threads, environment, warning
    filters, working directory)."""
    import os
    import warnings

    import torch

    from megatron_inpo.driver.worker import _FreshState

    monkeypatch.setenv("MEGATRON_INPO_TEST_KEEP", "1")
    fresh = _FreshState()
    want = torch.rand(3)
    torch.set_rng_state(fresh.rng)
    cwd, threads = os.getcwd(), torch.get_num_threads()
    try:
        torch.manual_seed(7)
        torch.set_default_dtype(torch.float64)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
        os.environ["MEGATRON_INPO_NO_VERIFY"] = "1"
        del os.environ["MEGATRON_INPO_TEST_KEEP"]
        warnings.simplefilter("ignore")
        os.chdir("/")
        fresh.restore()
        assert torch.equal(torch.rand(3), want) and torch.initial_seed() == fresh.seed
        assert torch.get_default_dtype() == torch.float32 and not torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == threads and os.getcwd() == cwd
        assert "MEGATRON_INPO_NO_VERIFY" not in os.environ and os.environ["MEGATRON_INPO_TEST_KEEP"] == "1"
        assert list(warnings.filters) == fresh.warnings
    finally:
        fresh.restore()


def test_stage_past_its_timeout_kills_the_worker(tmp_path):
    """stage_timeout_s with the worker: the stage's whole process group goes, as a stage subprocess's does (the
    clock starts at the request, so here the worker's own start-up already exceeds it)."""
    from megatron_inpo.convert.stage import ConvertStageConfig
    from megatron_inpo.driver.config import LaunchConfig
    from megatron_inpo.driver.launcher import WORKER_FILE, StageCall, StageError, StageLauncher

    launcher = StageLauncher(LaunchConfig(stage_runner="persistent", master_port=next(PORTS)), tmp_path,
                             timeout_s=0.5)
    call = StageCall("convert", ConvertStageConfig(hf_dir=str(tmp_path / "hf"), mcore_dir=str(tmp_path / "mc")), [])
    with pytest.raises(StageError, match="exceeded stage_timeout_s=0.5"):
        launcher.run("slow", call)
    assert launcher.worker is None and not (tmp_path / WORKER_FILE).exists()
    assert stage_processes_left() == []
