"""launch/slurm_inpo.sbatch under a real single-node SLURM (Debian's slurm-wlm 22.05 + munge), started by this test
as root in a temporary directory: the batch script runs the driver, whose Megatron stages go through its
multi-node launch (srun --overlap --ntasks-per-node=1 ... torchrun --rdzv-backend c10d), to the end of a tiny CPU
run (the tiny_cpu recipe, one smaller iteration, 2 ranks per node, SGLANG_SERVERS=0: rollout and judge
in-process).

No GPU, no cgroups: proctrack/linuxproc, task/none, no accounting; the node declares 16 CPUs on a 2-core machine
(SlurmdParameters=config_overrides) so the 96-CPU / exclusive directives of the script can be overridden to fit.
Only 127.0.0.1 is used (SlurmctldHost / NodeAddr, munge's origin, the rendezvous on the node 'localhost').
Skipped when slurm-wlm / munge are not installed or not root, except under CI=true, where that is a failure
(.ci/run installs them)."""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.megatron]

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(os.sys.executable).parent
TOOLS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "scontrol", "srun")
JOB_TIMEOUT_S = 900  # the run takes ~2.5 min on 2 cores; a hung rendezvous or stage is cut here


def _unavailable() -> str | None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge (.ci/run does)"
    if os.geteuid() != 0:
        return "the test cluster's slurmd runs jobs as root (SlurmUser=root): run as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"({path} missing)"


SLURM_CONF = """\
ClusterName=inpotest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
# no cgroups needed: processes tracked by parent id, no task binding, no accounting daemon
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# trust the CPUs below rather than the hardware (2 cores): the driver's job steps overlap the batch step
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=16 RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd in the foreground, as this test's own children; stopped (jobs cancelled first)
    at the end."""
    reason = _unavailable()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {reason}")
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    d.chmod(0o700)  # munged refuses key / socket directories others can write
    for sub in ("munge", "state", "spool", "log"):
        (d / sub).mkdir(mode=0o700)
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    ctld_port, slurmd_port = _free_ports(2)
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(d=d, ctld_port=ctld_port, slurmd_port=slurmd_port))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    sock = d / "munge" / "munge.socket"
    procs: list[subprocess.Popen] = []

    def start(argv, log):
        procs.append(subprocess.Popen(argv, env=env, stdout=open(d / "log" / log, "ab"), stderr=subprocess.STDOUT,
                                      start_new_session=True))

    try:
        start(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
               f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log",
               f"--seed-file={d}/munge/munged.seed"], "munged.out")
        _wait(lambda: sock.exists(), 30, "munged socket", d)
        start(["slurmctld", "-D", "-f", str(conf)], "slurmctld.out")
        _wait(lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True,
                                     timeout=30).stdout.count("UP") > 0, 60, "slurmctld", d)
        start(["slurmd", "-D", "-f", str(conf), "-N", "localhost"], "slurmd.out")
        _wait(lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True,
                                     timeout=30).stdout.strip() == "idle", 90, "slurmd (node idle)", d)
        yield env, d
    finally:
        if procs and procs[0].poll() is None and len(procs) >= 2:
            subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                q = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, timeout=30)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(1)
        for p in reversed(procs):  # slurmd, slurmctld, munged
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def _wait(ok, timeout_s: float, what: str, d: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ok():
                return
        except (subprocess.SubprocessError, OSError):
            pass
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{_tail(p, 1500)}" for p in sorted((d / "log").iterdir()))
    raise AssertionError(f"{what} not up after {timeout_s:.0f} s\n{logs}")


def test_sbatch_script_runs_a_tiny_inpo_run_to_the_end(slurm, tmp_path):
    env, d = slurm
    port, = _free_ports(1)
    run_dir = tmp_path / "run"
    job_env = {**env, "PATH": f"{VENV_BIN}:{env['PATH']}", "SGLANG_SERVERS": "0", "RECIPE": "tiny_cpu",
               "NPROC_PER_NODE": "2", "RUN_DIR": str(run_dir), "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "job.out"
    # the script's directives are for 4 GPU nodes: the command line overrides them for this one CPU node
    cmd = ["sbatch", "--wait", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=20",
           f"--output={out}", str(REPO / "launch/slurm_inpo.sbatch"),
           "--iterations=1", "--task.prompts_per_iteration=32", "--task.eval_prompts=32",
           "--task.sft_examples=256", "--sft.epochs=1", "--sft.micro_batch_size=32", "--rollout_batch_size=32"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
        raise AssertionError(f"the job did not finish in {JOB_TIMEOUT_S} s\n{_tail(out)}") from None
    took = time.perf_counter() - t0
    print(f"\nsbatch job finished in {took:.0f} s (exit {proc.returncode})")
    assert proc.returncode == 0, f"{proc.stderr}\n{_tail(out)}\n--- slurmd\n{_tail(d / 'log' / 'slurmd.log')}"
    text = out.read_text()
    assert "run directory:" in text and "win rate vs pi_ref" in text, text[-3000:]
    import json

    row, = json.loads((run_dir / "results.json").read_text())["table"]
    assert row["iteration"] == 1 and row["pairs"] > 0 and 0 <= row["win_rate"] <= 1, row
    assert (run_dir / "hf" / "pi_2" / "config.json").exists()  # the final policy, exported
    # every Megatron stage of the iteration went through the driver's multi-node launch inside the job
    job_id = proc.stdout.strip().split(";")[0]
    # (the persistent stage worker, launch.stage_runner's CPU default, was started by that launch: each stage's log
    # names the request, then the worker's launch command)
    for stage in ("sft", "logprobs_iter_01", "train_iter_01"):
        lines = (run_dir / "logs" / f"{stage}.log").read_text().splitlines()
        assert lines[1].startswith(f"$ megatron-inpo {stage.split('_')[0] if stage != 'sft' else 'train'} ") \
            and "[stage worker, pid" in lines[1], lines[1]
        prefix = "# the stage worker was started as: "
        assert lines[2].startswith(prefix), lines[2]
        first = "$ " + lines[2][len(prefix):]
        assert first.startswith("$ srun --overlap --ntasks-per-node=1 --kill-on-bad-exit=1 "), first
        assert f"--nnodes 1 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint localhost:{port} " \
               f"--rdzv-id {job_id} -m megatron_inpo" in first, first
    # the saved config keeps the launch variables unexpanded (a resubmitted job resumes with the same config)
    saved = (run_dir / "config.yaml").read_text()
    assert "${MASTER_ADDR}:${MASTER_PORT}" in saved and "${SLURM_JOB_ID}" in saved


def test_sbatch_script_keeps_planned_servers_up_for_the_driver(slurm, tmp_path):
    """SGLANG_SERVERS=1 path of the script with an API-compatible stand-in for sglang.launch_server and for the
    driver: the memory plan picks the fractions (policy TP8 on all GPUs of the node, then the judge on GPU 0),
    every server is started as a held job step with --enable-deterministic-inference, still healthy while the
    driver runs (a `start` step that returned would have taken its servers with it), and stopped at the end."""
    import json
    import stat
    import sys

    from megatron_inpo.serving.memory_plan import ModelMemory, ServerSlot, plan_server_memory
    from tests.helpers.rollout import LLAMA3_8B, free_port_pair

    env, _ = slurm
    models = {}
    for name in ("sft", "pm"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(LLAMA3_8B))
        models[name] = tmp_path / name
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_driver = bin_dir / "megatron-inpo"
    fake_driver.write_text(f"""#!{sys.executable}
import json, sys, urllib.request
urls = [u for a in sys.argv[1:] for k in ("--rollout.server_urls=", "--judge.server_urls=") if a.startswith(k)
        for u in a[len(k):].strip("[]").split(",")]
health = {{u: urllib.request.urlopen(u + "/health", timeout=10).status for u in urls}}
json.dump({{"args": sys.argv[1:], "health": health}}, open({str(tmp_path / 'driver.json')!r}, "w"))
""")
    fake_server = bin_dir / "fake-sglang"
    fake_server.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'server_argv.txt'}\n"
                           f"{sys.executable} {REPO / 'tests' / 'helpers' / 'rollout.py'} \"$@\"\n")
    for f in (fake_driver, fake_server):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    policy_port, judge_port = free_port_pair(), free_port_pair()
    job_env = {**env, "PATH": f"{bin_dir}:{VENV_BIN}:{env['PATH']}", "RUN_DIR": str(tmp_path / "run"),
               "SFT_MODEL": str(models["sft"]), "PM_MODEL": str(models["pm"]), "GPU_MEMORY_GIB": "79",
               "SGLANG_SERVER_CMD": str(fake_server), "LAUNCH_DIR": str(REPO / "launch"),
               "POLICY_PORT": str(policy_port), "JUDGE_PORT": str(judge_port), "MASTER_PORT": str(_free_ports(1)[0])}
    out = tmp_path / "job.out"
    cmd = ["sbatch", "--wait", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
           f"--output={out}", str(REPO / "launch/slurm_inpo.sbatch"), "--iterations=1"]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=job_env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
        raise AssertionError(f"the job did not finish in 300 s\n{_tail(out)}") from None
    assert proc.returncode == 0, f"{proc.stderr}\n{_tail(out)}"
    driver = json.loads((tmp_path / "driver.json").read_text())
    assert driver["health"] == {f"http://localhost:{policy_port}": 200, f"http://localhost:{judge_port}": 200}
    assert "--server_memory_saver=true" in driver["args"] and "--launch.launcher=rdzv" in driver["args"]
    argv = [line.split() for line in (tmp_path / "server_argv.txt").read_text().splitlines()]
    m = ModelMemory.from_hf_config(LLAMA3_8B, tp=8)
    want = plan_server_memory([ServerSlot("policy", m, tuple(range(8)), 8 * 4096),
                               ServerSlot("judge", ModelMemory.from_hf_config(LLAMA3_8B), (0,), 4 * 4096)], 79.0)
    assert [float(a[a.index("--mem-fraction-static") + 1]) for a in argv] == [p.mem_fraction for p in want]
    assert [a[a.index("--tp") + 1] for a in argv] == ["8", "1"]  # the policy first: the plan's order
    assert all("--enable-deterministic-inference" in a for a in argv)
    text = _tail(out, 20000)
    assert text.count("stopped 1 server(s)") == 2 and text.count("servers stopped by `stop`") == 2, text
    time.sleep(1)
    assert not _processes_with(f"--model-path {models['sft']}") and not _processes_with(f"--model-path {models['pm']}")


def _processes_with(text: str) -> list[int]:
    """Live processes whose command line contains `text` (arguments joined by spaces)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(p.name))
            except OSError:
                pass
    return found
