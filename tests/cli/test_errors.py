"""Messages, not tracebacks: a broken environment or bad input is one line on stderr and exit 2, Ctrl-C exit 130
(megatron_inpo.cli.loader.guard, the one place every command goes through); `rollout` refuses to resume an output
made by another config."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_inpo.cli import main as top_main
from megatron_inpo.cli.loader import EXIT_BAD_INPUT, EXIT_INTERRUPTED, guard
from tests.helpers.driver import REPO
from tests.helpers.rollout import free_url, make_tiny_llama, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


def _one_error_line(err: str, prog: str = "megatron-inpo rollout") -> str:
    lines = [x for x in err.strip().splitlines() if x.startswith(prog)]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# The guard


@pytest.mark.parametrize("exc,needle", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device (No space left on device); rerun"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out.jsonl"), "no space left on device: /data/out.jsonl"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/run"), "read-only file system: /ro/run"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "permission denied: /root/x"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "p.jsonl"), "no such file or directory: p.jsonl"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "Connection refused"),
    (TimeoutError("server not healthy after 5 s"), "server not healthy after 5 s"),
])
def test_environment_errors_are_one_line_exit_2(capsys, exc, needle):
    def fail():
        raise exc

    assert guard("megatron-inpo x", fail) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err, "megatron-inpo x")
    assert line.startswith("megatron-inpo x: error: ") and needle in line


def test_project_errors_ctrl_c_and_bugs(capsys):
    from megatron_inpo.config import ConfigError
    from megatron_inpo.data.preferences import DataError
    from megatron_inpo.serving.pool import SGLangError

    for exc in (ConfigError("train.lr: must be > 0"), DataError("p.jsonl:3: field 'prompt' is not a string"),
                SGLangError("SGLang request /generate failed after 1 attempt(s) (is the server up?):\n"
                            "  http://h:1/generate: URLError: refused")):
        def fail(exc=exc):
            raise exc
        assert guard("megatron-inpo x", fail) == EXIT_BAD_INPUT
        line = _one_error_line(capsys.readouterr().err, "megatron-inpo x")
        assert str(exc).splitlines()[0] in line
    assert "(is the server up?): http://h:1/generate: URLError: refused" in line  # joined onto one line

    def interrupted():
        raise KeyboardInterrupt

    assert guard("megatron-inpo x", interrupted) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "megatron-inpo x: interrupted; rerun the same command to resume\n"

    def bug():
        raise ValueError("a bug keeps its traceback")

    with pytest.raises(ValueError):
        guard("megatron-inpo x", bug)

    def exits():
        raise SystemExit(3)

    with pytest.raises(SystemExit):
        guard("megatron-inpo x", exits)
    assert guard("megatron-inpo x", lambda: None) == 0 and guard("megatron-inpo x", lambda: 5) == 5


def test_torch_checkpoint_exception_is_a_message(capsys):
    """torch's CheckpointException is a BaseException: the guard still turns it into one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    def fail():
        raise CheckpointException("load failed", {0: (EOFError(), None), 1: (FileNotFoundError("x.distcp"), None)})

    assert guard("megatron-inpo train", fail) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err, "megatron-inpo train")
    assert "rank 0: EOFError: the file ends early (truncated?) (and 1 more rank(s))" in line


# ---------------------------------------------------------------------------------------------------------------
# The rollout command


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    d = tmp_path_factory.mktemp("policy")
    make_tiny_llama(d, seed=0)
    return d


def _argv(tmp_path, policy, *extra):
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"id": f"x{i}", "prompt": f"q {i}?"}) + "\n" for i in range(4)))
    return ["rollout", "--prompts", str(prompts), "--out", str(tmp_path / "prefs.jsonl"), "--no-progress",
            f"rollout.model_path={policy}", "rollout.sampling.n=2", "rollout.sampling.max_new_tokens=4",
            "judge.kind=programmatic", "judge.function=tests.helpers.rollout:first_token_pref",
            "judge.function_inputs=ids", "batch_size=2", *extra]


def test_rollout_resume_refuses_another_config(tmp_path, policy, capsys):
    out = tmp_path / "prefs.jsonl"
    assert top_main(_argv(tmp_path, policy, "limit=2")) == 0

    def records():
        d = tmp_path / "prefs.jsonl.dropped.jsonl"
        return out.read_bytes() + (d.read_bytes() if d.exists() else b"")

    before = records()
    assert before and json.loads((tmp_path / "prefs.jsonl.identity.json").read_text())["fields"][
        "rollout.sampling.max_new_tokens"] == 4
    capsys.readouterr()

    def refused(*extra):
        assert top_main(_argv(tmp_path, policy, *extra)) == EXIT_BAD_INPUT
        assert records() == before  # nothing mixed
        return _one_error_line(capsys.readouterr().err)

    line = refused("rollout.sampling.temperature=0.5", "rollout.sampling.seed=7")
    assert "prefs.jsonl holds output of a different config" in line
    assert "rollout.sampling.temperature: saved 1.0, now 0.5" in line and "rollout.sampling.seed: saved 0, now 7" in line
    assert "rollout.sampling.max_new_tokens: saved 4, now 8" in refused("rollout.sampling.max_new_tokens=8")
    assert "iteration: saved 1, now 2" in refused("iteration=2")
    # without the YAML the sidecar still lists the fields
    (tmp_path / "prefs.jsonl.config.yaml").unlink()
    assert "rollout.sampling.temperature: saved 1.0, now 0.7" in refused("rollout.sampling.temperature=0.7")
    # an output from before the sidecar: its YAML is compared; neither file: refused
    assert top_main(_argv(tmp_path, policy, "limit=2")) == 0  # same config: accepted, both files written again
    capsys.readouterr()
    (tmp_path / "prefs.jsonl.identity.json").unlink()
    assert "rollout.sampling.top_k: saved -1, now 5" in refused("rollout.sampling.top_k=5")
    (tmp_path / "prefs.jsonl.config.yaml").unlink()
    assert "neither prefs.jsonl.identity.json nor prefs.jsonl.config.yaml" in refused()
    # where the servers are, how long to wait, how many prompts: not part of the identity
    from megatron_inpo.cli.rollout import RESUME_MUTABLE, command
    from megatron_inpo.cli.loader import resolve_config
    from megatron_inpo.rollout.pipeline import claim_output

    cfg = resolve_config(command(), None, None, _argv(tmp_path, policy)[6:])
    out2 = tmp_path / "o2.jsonl"
    claim_output(out2, cfg, RESUME_MUTABLE)
    out2.write_text('{"prompt_id": "x0"}\n')
    cfg.limit, cfg.wait_healthy_s, cfg.rollout.timeout_s, cfg.judge.max_retries = 3, 1.0, 5.0, 0
    cfg.rollout.server_urls = ["http://elsewhere:1"]
    claim_output(out2, cfg, RESUME_MUTABLE)
    cfg.batch_size = 3
    from megatron_inpo.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size: saved 2, now 3"):
        claim_output(out2, cfg, RESUME_MUTABLE)


def test_rollout_resumes_with_more_prompts(tmp_path, policy):
    assert top_main(_argv(tmp_path, policy, "limit=2")) == 0
    assert top_main(_argv(tmp_path, policy)) == 0
    stats = json.loads((tmp_path / "prefs.jsonl.stats.json").read_text())
    assert stats["skipped"] == 2 and stats["pairs"] + stats["dropped"] == 2


def test_rollout_disk_full_and_read_only(tmp_path, policy, capsys, monkeypatch):
    """ENOSPC while appending pairs and EROFS while recording the config: one line, exit 2 (root ignores chmod,
    so the failures are injected)."""
    real_write = os.write

    def full(fd, data):  # the appends of pairs use os.write
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    assert top_main(_argv(tmp_path, policy)) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert "error: no space left on device" in line and "rerun the same command to resume" in line
    monkeypatch.setattr(os, "write", real_write)
    assert top_main(_argv(tmp_path, policy)) == 0  # space again: the rerun completes
    capsys.readouterr()

    import tempfile

    def read_only(*a, dir=None, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    (tmp_path / "ro").mkdir()
    assert top_main(_argv(tmp_path / "ro", policy)) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert f"error: read-only file system: {tmp_path / 'ro'}" in line


def test_rollout_unreachable_server(tmp_path, policy, capsys):
    url = free_url()
    sglang = ["rollout.backend=sglang", f"rollout.server_urls=[{url}]", "rollout.max_retries=0"]
    assert top_main(_argv(tmp_path, policy, *sglang, "wait_healthy_s=0.5")) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert "rollout.server_urls: SGLang server(s) not healthy" in line and url in line and "unreachable?" in line
    # a refused command writes nothing: no output, no config / identity records beside it (issue 21)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]
    assert top_main(_argv(tmp_path, policy, *sglang, "wait_healthy_s=0")) == EXIT_BAD_INPUT
    line = _one_error_line(capsys.readouterr().err)
    assert "failed after 1 attempt(s)" in line and url in line


def test_ctrl_c_exits_130_with_one_line(tmp_path, policy):
    """SIGINT while the rollout command waits for its servers: exit 130, the one-line message, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MEGATRON_INPO_TRACEBACK", None)
    argv = _argv(tmp_path, policy, "rollout.backend=sglang", f"rollout.server_urls=[{free_url()}]",
                 "wait_healthy_s=120")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_inpo", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = ""
    deadline = time.time() + 120
    while "waiting up to" not in err and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        err += line
    assert "waiting up to" in err, err
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert rest.strip().splitlines()[-1] == "megatron-inpo rollout: interrupted; rerun the same command to resume"
    assert "Traceback" not in rest


@pytest.mark.megatron
def test_missing_or_truncated_shard_is_named(tmp_path):
    """A missing or truncated .distcp: the digest check (engine/trust.py) names the shard before anything loads;
    with the check skipped (MEGATRON_INPO_NO_VERIFY=1), torch's CheckpointException (a BaseException) is what
    reports it, and engine/checkpoint.py turns it into a CheckpointError naming the directory. Either way the
    command prints one line and exits 2."""
    import shutil

    from tests.helpers.engine import PORTS, convert_to_mcore, make_pairs, tiny_hf_model, write_pairs

    tiny_hf_model().save_pretrained(tmp_path / "hf")
    good = tmp_path / "mc"
    convert_to_mcore(tmp_path / "hf", good)
    data = write_pairs(tmp_path / "pairs.jsonl", make_pairs(4, with_logps=False))
    for case in ("missing", "truncated"):
        bad = tmp_path / case
        shutil.copytree(good, bad)
        shard = next(bad.glob("*.distcp"))
        if case == "missing":
            shard.unlink()
        else:
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        for verify in (True, False):
            env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(next(PORTS)), "PYTHONWARNINGS": "ignore"}
            if not verify:
                env["MEGATRON_INPO_NO_VERIFY"] = "1"
            r = subprocess.run([sys.executable, "-m", "megatron_inpo", "logprobs", "--data", str(data), "--output",
                                str(tmp_path / f"{case}.logp.jsonl"), "--ref-checkpoint", str(bad)],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert r.returncode == EXIT_BAD_INPUT, r.stderr[-3000:]
            line = _one_error_line(r.stderr, "megatron-inpo logprobs")
            if verify:
                want = "missing checkpoint file" if case == "missing" else "sha256 differs"
                assert f"error: {shard}: {want}" in line, line
            elif case == "missing":  # the .metadata check (always on) finds no file for its storage entries
                assert f"error: {bad / '.metadata'}: refused: " in line and f"names '{shard.name}'" in line, line
            else:
                assert f"error: {bad}: cannot load (rank 0: " in line and "EOFError" in line, line
            assert not (tmp_path / f"{case}.logp.jsonl").exists()
