"""Runs side by side (issue 20): launch.master_port 0 (the default) picks a free port for each start, a configured
port is checked before anything starts, and a clash, checked or met in a stage's log, is one clear error naming
launch.master_port (not EADDRINUSE followed by 'rerun the same command to resume'). Ports 31000-31999."""
import shlex
import socket
import sys

import pytest

from megatron_inpo.config import ConfigError
from megatron_inpo.driver.config import LaunchConfig
from megatron_inpo.driver.launcher import StageLauncher

PORTS = iter(range(31400, 31500))


def held_port():
    """A listening socket on a port of our block: another run's stage worker holding its store."""
    for port in PORTS:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        s.listen()
        return s, port
    raise RuntimeError("no free port in 31400-31499")


def prefix(code):
    """A launcher prefix that runs `code` instead of megatron_inpo (the stage's argv follows, unused)."""
    return shlex.join([sys.executable, "-c", code])


def test_default_picks_a_free_port_per_start():
    from megatron_inpo.driver.launcher import master_port

    assert LaunchConfig().master_port == 0
    sock, port = held_port()
    with sock:
        picked = {master_port(0) for _ in range(3)}
        assert port not in picked and all(p > 0 for p in picked)


def test_configured_port_in_use_is_refused_before_the_stage_starts(tmp_path):
    sock, port = held_port()
    with sock:
        launcher = StageLauncher(LaunchConfig(stage_runner="subprocess", master_port=port), tmp_path)
        with pytest.raises(ConfigError, match=rf"^launch.master_port: port {port} is in use on this machine"):
            launcher.run("convert", ["--version"])
    assert not (tmp_path / "logs" / "convert.log").exists()  # nothing started
    launcher.run("convert", ["--version"])  # free again: it runs


def test_stage_gets_the_picked_port(tmp_path):
    sock, port = held_port()
    with sock:
        code = "import os; print('MASTER_PORT=' + os.environ['MASTER_PORT'])"
        launcher = StageLauncher(LaunchConfig(stage_runner="subprocess", launcher=prefix(code)), tmp_path)
        launcher.run("s", ["x"])
        line = [x for x in (tmp_path / "logs" / "s.log").read_text().splitlines() if x.startswith("MASTER_PORT=")]
        got = int(line[0].split("=")[1])
        assert got != port and got > 0
    torchrun = StageLauncher(LaunchConfig(nproc_per_node=2), tmp_path).command(["train"], True, 31999)
    assert torchrun[torchrun.index("--master-port") + 1] == "31999"


def test_port_taken_as_the_stage_starts_names_the_field(tmp_path):
    code = ("import sys; print('torch.distributed.DistNetworkError: The server socket has failed to listen on any "
            "local network address. port: 31001, useIpv6: false, code: -98, name: EADDRINUSE, message: address "
            "already in use'); sys.exit(1)")
    launcher = StageLauncher(LaunchConfig(stage_runner="subprocess", launcher=prefix(code)), tmp_path)
    with pytest.raises(ConfigError, match=r"^launch.master_port: port \d+ was taken by another process"):
        launcher.run("train", ["x"])


@pytest.mark.parametrize("value, ok", [(0, True), (31000, True), (1, False), (70000, False)])
def test_master_port_values(value, ok):
    cfg = LaunchConfig(master_port=value)
    if ok:
        cfg.validate()
    else:
        with pytest.raises(ConfigError, match="master_port"):
            cfg.validate()
