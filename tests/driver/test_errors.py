"""Bad input fails before any stage runs, with a message naming the field or file."""
import json
import os
import socket

from tests.helpers.driver import run_cli, tiny_overrides
from megatron_inpo.config import ConfigError
from megatron_inpo.cli.run import resolve_config
from megatron_inpo.driver.loop import Driver, preflight

import pytest


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_judge_server_fails_before_work(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    cfg = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "run") + [
        "judge.kind=pairwise", "judge.backend=sglang", f"judge.server_urls=[{url}]", "judge.model_path=pm"])
    with pytest.raises(ConfigError, match=r"judge\.server_urls: .*unreachable") as e:
        Driver(cfg, progress=False, out=lambda s: None).run()
    assert url in str(e.value)
    assert not (tmp_path / "run" / "manifest.json").exists()  # nothing started


def test_unreachable_rollout_server(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}"
    cfg = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "run") + [
        "rollout.backend=sglang", f"rollout.server_urls=[{url}]"])
    with pytest.raises(ConfigError, match=r"rollout\.server_urls"):
        preflight(cfg)


def test_missing_files_are_named(tmp_path):
    hf = tmp_path / "sft_model"
    base = tiny_overrides(tmp_path / "run") + ["model.source=hf", f"model.hf_path={hf}", "iterations=1"]
    cfg = resolve_config("tiny_cpu", None, base + [f"prompts=[{tmp_path / 'p1.jsonl'}]",
                                                   f"eval.prompts={tmp_path / 'eval.jsonl'}"])
    with pytest.raises(ConfigError, match="model.hf_path: .*sft_model.*no config.json"):
        preflight(cfg)
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"prompts\[0\]: file .*p1.jsonl not found"):
        preflight(cfg)
    (tmp_path / "p1.jsonl").write_text('{"id": 1, "prompt": "a b"}\n')
    with pytest.raises(ConfigError, match="eval.prompts: file .*eval.jsonl not found"):
        preflight(cfg)
    (tmp_path / "p1.jsonl").write_text('{"id": 1, "promt": "a b"}\n')
    (tmp_path / "eval.jsonl").write_text('{"id": 1, "prompt": "a b"}\n')
    from megatron_inpo.data.preferences import DataError

    with pytest.raises(DataError, match=r"p1.jsonl:1: missing field 'prompt'"):
        preflight(cfg)
    with pytest.raises(ConfigError, match="one prompt file per iteration"):
        resolve_config("tiny_cpu", None, base + ["prompts=[]"])


def test_bad_judge_function_and_missing_megatron_parts(tmp_path, monkeypatch):
    cfg = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "r") + ["judge.function=nope.mod:f"])
    with pytest.raises(ConfigError, match="judge.function: cannot load 'nope.mod:f'"):
        preflight(cfg)
    import megatron_inpo.driver.loop as loop

    monkeypatch.setattr(loop, "missing_megatron_parts", lambda: ["the HF <-> Megatron converter (x)"])
    cfg = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "r", trainer="megatron"))
    with pytest.raises(ConfigError, match="trainer: 'megatron' needs the HF <-> Megatron converter"):
        preflight(cfg)


def test_cli_exit_codes_and_changed_config_refused(tmp_path):
    r = run_cli(["run", "--recipe", "tiny_cpu", "--train.lr=-1"])
    assert r.returncode == 2 and "train.lr: must be > 0" in r.stderr
    run = tmp_path / "run"
    run.mkdir()
    from megatron_inpo.config import save_yaml

    save_yaml(resolve_config("tiny_cpu", None, tiny_overrides(run)), run / "config.yaml")
    r = run_cli(["run", "--recipe", "tiny_cpu", *tiny_overrides(run), "--train.lr=0.002"])
    assert r.returncode == 2
    assert "different config" in r.stderr and "train.lr: saved 0.001, now 0.002" in r.stderr
    assert not (run / "manifest.json").exists() or not json.loads((run / "manifest.json").read_text())["stages"]


def test_orphaned_stage_group_is_reaped(tmp_path):
    """What a SIGKILLed driver's stage left running is killed before the resumed run starts stages: the whole
    process group, including descendants that outlived their leader (dist_checkpointing's spawned helpers);
    a group that does not carry the stage's token (a recycled process-group id) is never signalled."""
    import os
    import subprocess
    import sys
    import time

    from megatron_inpo.driver.launcher import RUNNING_FILE, STAGE_TOKEN_ENV, reap_orphan_stage
    from megatron_inpo.files import atomic_write_json

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init counts as gone
            return f.read().split(")")[-1].split()[0] != "Z"

    # the leader starts a grandchild and exits, like a killed stage whose helper process survived it
    code = "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
           "print(p.pid, flush=True)"
    for token, reaped in (("tok-1", True), (None, False)):
        env = dict(os.environ)
        if token:
            env[STAGE_TOKEN_ENV] = token
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, env=env,
                                stdout=subprocess.PIPE, text=True)
        child = int(proc.stdout.readline())
        proc.wait(timeout=10)
        atomic_write_json(tmp_path / RUNNING_FILE, {"pid": proc.pid, "pgid": proc.pid, "stage": "train_iter_01",
                                                    "token": "tok-1"})
        assert reap_orphan_stage(tmp_path) == ("train_iter_01" if reaped else None)
        assert not (tmp_path / RUNNING_FILE).exists()
        deadline = time.time() + 10
        while reaped and alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert alive(child) != reaped
        if not reaped:
            os.kill(child, 9)


def test_server_memory_release_and_resume(tmp_path):
    """server_memory_saver: release before Megatron stages, resume before rollout, each sent once, against the
    stateful fake (which dies, as SGLang does, on a second release or a resume of unreleased memory)."""
    from tests.helpers.rollout import FakeSGLang

    with FakeSGLang() as srv:
        cfg = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "r") + [
            "server_memory_saver=true", "rollout.backend=sglang", f"rollout.server_urls=[{srv.url}]"])
        d = Driver(cfg, progress=False, out=lambda s: None)
        d.server_memory("release")
        d.server_memory("release")  # already released: no second request
        d.server_memory("resume")
    memory_calls = [(p, b) for p, b in srv.requests if p.endswith("_memory_occupation")]
    assert memory_calls == [("/release_memory_occupation", {"tags": ["weights", "kv_cache"]}),
                            ("/resume_memory_occupation", {"tags": ["weights", "kv_cache"]})]
    assert srv.fatal is None and srv.released == set() and not srv.refused


def test_read_only_run_dir_and_full_disk_are_one_line(tmp_path, monkeypatch, capsys):
    """`run` on a directory it cannot write (EROFS; root ignores chmod, so it is injected) or a full disk: one
    line on stderr, exit 2, no traceback."""
    import errno
    import tempfile

    from megatron_inpo.cli.run import main

    for code, needle in ((errno.EROFS, "read-only file system: "), (errno.ENOSPC, "no space left on device: "),
                         (errno.EACCES, "permission denied: ")):
        def refuse(*a, dir=None, code=code, **k):
            raise OSError(code, os.strerror(code), str(dir))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        assert main(["--recipe", "tiny_cpu", "--no-progress", *tiny_overrides(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("megatron-inpo run:")]
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith("megatron-inpo run: error: " + needle) and str(tmp_path / "run") in lines[0]


def test_ctrl_c_in_a_run_exits_130_and_the_rerun_resumes(tmp_path):
    import signal
    import subprocess

    from tests.helpers.driver import PY, REPO

    run = tmp_path / "run"
    args = [PY, "-m", "megatron_inpo", "run", "--recipe", "tiny_cpu", "--no-progress",
            *tiny_overrides(run, iterations=1)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    env.pop("MEGATRON_INPO_FAULT", None)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "iter1/rollout ..." in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "megatron-inpo run: interrupted; rerun the same command to resume"
    assert "Traceback" not in err
    r = run_cli(args[3:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sft ..." not in r.stdout and "win rate vs pi_ref" in r.stdout
