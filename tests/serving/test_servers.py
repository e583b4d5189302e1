"""The SGLang launcher: start N servers (an API-compatible stand-in for sglang.launch_server), wait until healthy,
record them, stop them; a server that dies at start-up is reported with its log."""
import json
import subprocess
import sys

import pytest

from megatron_inpo.serving.servers import ServerLaunchConfig, read_state, start_servers, stop_servers
from megatron_inpo.serving.pool import SGLangPool
from tests.helpers.rollout import REPO, free_port_pair

FAKE = [sys.executable, str(REPO / "tests" / "helpers" / "rollout.py")]


def test_start_status_stop(tmp_path):
    state = tmp_path / "servers.json"
    port = free_port_pair()
    cfg = ServerLaunchConfig(model_path=str(tmp_path), num_servers=2, tp=2, base_port=port, command=FAKE,
                             log_dir=str(tmp_path / "logs"), mem_fraction=0.8, is_embedding=True)
    urls = start_servers(cfg, state, wait_timeout_s=60, poll_s=0.1)
    try:
        assert urls == [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"]
        recorded = read_state(state)
        assert [s["gpus"] for s in recorded] == ["0,1", "2,3"]
        argv = recorded[0]["argv"]
        for flag in ("--model-path", "--tp", "--host", "--port", "--mem-fraction-static", "--is-embedding"):
            assert flag in argv
        pool = SGLangPool(urls, max_retries=0)
        assert pool.health() == [True, True]
        assert pool.model_info(server=1)["is_generation"] is False
        out = subprocess.run([sys.executable, str(REPO / "launch/sglang_servers.py"), "status", "--state",
                              str(state)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and [s["healthy"] for s in json.loads(out.stdout)] == [True, True]
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is already in use"):
            start_servers(cfg, tmp_path / "other.json", wait_timeout_s=5)
    finally:
        n = stop_servers(state)
    assert n == 2 and not state.exists()
    assert SGLangPool(urls, max_retries=0).health() == [False, False]


def test_server_that_dies_is_reported(tmp_path):
    cfg = ServerLaunchConfig(model_path="m", base_port=free_port_pair(), log_dir=str(tmp_path),
                             command=[sys.executable, "-c", "import sys; print('CUDA error: no GPU'); sys.exit(3)"])
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*CUDA error: no GPU"):
        start_servers(cfg, tmp_path / "s.json", wait_timeout_s=30, poll_s=0.1)


def test_per_server_fractions_and_deterministic_flag(tmp_path):
    """A server sharing its GPU gets its own --mem-fraction-static (launch/sglang_servers.py plan); seeded rollouts
    need --enable-deterministic-inference (SGLang ignores sampling_seed without it)."""
    from megatron_inpo.config import ConfigError

    state = tmp_path / "servers.json"
    cfg = ServerLaunchConfig(model_path=str(tmp_path), num_servers=2, base_port=free_port_pair(), command=FAKE,
                             log_dir=str(tmp_path / "logs"), mem_fractions=[0.373, 0.873], deterministic=True)
    start_servers(cfg, state, wait_timeout_s=60, poll_s=0.1)
    try:
        argv = [s["argv"] for s in read_state(state)]
    finally:
        assert stop_servers(state) == 2
    assert [a[a.index("--mem-fraction-static") + 1] for a in argv] == ["0.373", "0.873"]
    assert all("--enable-deterministic-inference" in a for a in argv)
    for bad, field in ((dict(mem_fractions=[0.5]), "servers.mem_fractions: 1 values for 2 servers"),
                       (dict(mem_fractions=[0.5, 1.0]), "servers.mem_fractions: each must be in")):
        with pytest.raises(ConfigError, match=field):
            ServerLaunchConfig(model_path="m", num_servers=2, **bad).validate()
