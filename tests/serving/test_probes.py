"""Probes of SGLang servers never generate where the memory may be released (server_memory_saver).

SGLang 0.5.23 answers GET /health with a one-token generation unless the server runs with
SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0 (srt/entrypoints/http_server.py `health_generate`, srt/environ.py), and
a generation on released weights / KV cache crashes the server; GET /ready is a flag check
(tokenizer_manager.is_ready) that needs no API key (srt/utils/auth.py). The fake server (tests/helpers/rollout.py)
behaves the same. The servers we start get the variable and are proved to generate once, before any release; the
driver's preflight and `launch/sglang_servers.py status` ask /ready only, so a driver restarted against released
servers leaves them alive.
"""
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from megatron_inpo.serving.memory import ServerMemory
from megatron_inpo.serving.pool import SGLangError, SGLangPool
from megatron_inpo.serving.servers import HEALTH_ENV, ServerLaunchConfig, start_servers, stop_servers
from tests.helpers.rollout import REPO, SGLANG_TEST_DEPS, FakeSGLang, free_port_pair

FAKE = [sys.executable, str(REPO / "tests" / "helpers" / "rollout.py")]
HTTP_SERVER = SGLANG_TEST_DEPS / "sglang" / "srt" / "entrypoints" / "http_server.py"
GENERATING = ("/generate", "/health_generate")


def _get(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _released(srv):
    SGLangPool([srv.url], max_retries=0).request("/release_memory_occupation", {"tags": ["weights", "kv_cache"]},
                                                 parse_json=False, max_retries=0)
    assert srv.released == {"weights", "kv_cache"}


def test_the_wheels_health_endpoint_generates_unless_switched_off():
    """What the fake models, read from the wheel's own source."""
    if not HTTP_SERVER.exists():
        pytest.skip(f"the sglang wheel is not unpacked in {SGLANG_TEST_DEPS} (tools/setup.sh)")
    src = HTTP_SERVER.read_text(encoding="utf-8")
    body = src[src.index('@app.get("/health")'):src.index('@app.get("/get_model_info")')]
    assert '@app.get("/health_generate")' in body and "GenerateReqInput(" in body  # both routes generate ...
    switch = body.index("not envs.SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION.get()")
    assert 'request.url.path == "/health"' in body[switch:switch + 200]          # ... /health unless switched off
    assert switch < body.index("GenerateReqInput(")
    assert "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION = EnvBool(True)" in (
        SGLANG_TEST_DEPS / "sglang" / "srt" / "environ.py").read_text(encoding="utf-8")  # on by default
    ready = src[src.index('@app.get("/ready")'):src.index('@app.get("/health")')]
    assert "is_ready()" in ready and "generate" not in ready                      # a flag check
    assert HEALTH_ENV == {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}


def test_a_generating_health_probe_kills_a_released_server_and_ready_does_not():
    with FakeSGLang() as srv:  # SGLang's default: /health generates
        _released(srv)
        assert _get(srv.url, "/ready") == 200 and srv.fatal is None
        assert SGLangPool([srv.url]).health() == [True] and srv.fatal is None
        with pytest.raises(OSError):  # dropped: the server died
            _get(srv.url, "/health")
        assert "/health on released memory" in srv.fatal
        assert SGLangPool([srv.url]).health() == [False]  # dead: answers nothing
    with FakeSGLang(health_generates=False) as srv:  # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0
        _released(srv)
        assert _get(srv.url, "/health") == 200 and srv.fatal is None  # liveness only
        with pytest.raises(OSError):  # dropped: the server died
            _get(srv.url, "/health_generate")  # still a generation
        assert "/health_generate on released memory" in srv.fatal


def test_health_falls_back_to_model_info_where_ready_is_missing():
    """An older server or a router in front may have no /ready: /model_info, a read, answers instead (with the
    pool's API key; /ready needs none)."""
    with FakeSGLang(api_key="k") as srv:
        real = srv.handle
        srv.handle = lambda path, body: (404, {"detail": "Not Found"}) if path == "/ready" else real(path, body)
        assert SGLangPool([srv.url], api_key="k").health() == [True]
        assert SGLangPool([srv.url]).health() == [False]  # /model_info needs the key
        assert [p for p, _ in srv.requests] == ["/ready", "/model_info"] * 2
        srv.handle = real
        assert SGLangPool([srv.url]).health() == [True]  # /ready: no key needed


def _log(tmp_path, url):
    return (tmp_path / f"requests_{url.rsplit(':', 1)[1]}.log").read_text().split()


def test_restarted_driver_and_status_leave_released_servers_alive(tmp_path, monkeypatch):
    """Servers we start: liveness-only /health, one generating probe before any release. Then the driver releases
    their memory (a Megatron stage), crashes, and is restarted: its preflight and `status` find them alive and
    leave them so; the memory is resumed and they generate."""
    from megatron_inpo.cli.run import resolve_config
    from megatron_inpo.driver.loop import preflight
    from tests.helpers.driver import tiny_overrides

    monkeypatch.delenv("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", raising=False)  # SGLang's default: generates
    state = tmp_path / "servers.json"
    cfg = ServerLaunchConfig(model_path=str(tmp_path), num_servers=2, base_port=free_port_pair(), command=FAKE,
                             log_dir=str(tmp_path / "logs"), deterministic=True,
                             extra_args=["--request-log", str(tmp_path / "requests_{port}.log")])
    urls = start_servers(cfg, state, wait_timeout_s=60, poll_s=0.1)
    try:
        for u in urls:  # ready, then one generation each: before anything could release them
            log = _log(tmp_path, u)
            assert [p for p in log if p in GENERATING + ("/health",)] == ["/health_generate"]
            assert log.index("/ready") < log.index("/health_generate")
        run = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "run") + [
            "--server_memory_saver=true", "--rollout.backend=sglang", f"--rollout.server_urls=[{urls[0]}]",
            "--judge.kind=pairwise", "--judge.backend=sglang", f"--judge.server_urls=[{urls[1]}]",
            "--judge.model_path=pm"])
        memory = {urls[0]: ["weights", "kv_cache"], urls[1]: ["kv_cache"]}
        ServerMemory(run.run_dir, memory).release()  # the stage before the crash
        marks = {u: len(_log(tmp_path, u)) for u in urls}

        preflight(run)  # the restarted driver's first act
        out = subprocess.run([sys.executable, str(REPO / "launch/sglang_servers.py"), "status", "--state",
                              str(state)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert [s["healthy"] for s in json.loads(out.stdout)] == [True, True]
        for u in urls:
            assert _get(u, "/health") == 200  # a monitor's or an operator's probe: liveness only
            probes = _log(tmp_path, u)[marks[u]:]
            assert "/ready" in probes and not set(probes) & set(GENERATING)
        assert SGLangPool(urls).health() == [True, True]  # alive: a dead fake answers nothing

        ServerMemory(run.run_dir, memory).resume()  # the next rollout stage
        reply = SGLangPool([urls[0]]).request("/generate", {"input_ids": [1, 5], "sampling_params": {
            "max_new_tokens": 2}})
        assert reply["output_ids"]
    finally:
        assert stop_servers(state) == 2


def test_servers_we_did_not_start_survive_a_restarted_driver_and_status(tmp_path):
    """Servers started by someone else, with SGLang's default (/health generates): the driver releases their memory,
    is restarted, runs its preflight, and `status` is run on them; neither probe generates, so they live on."""
    from megatron_inpo.cli.run import resolve_config
    from megatron_inpo.driver.loop import preflight
    from tests.helpers.driver import tiny_overrides

    with FakeSGLang(api_key="k") as policy, FakeSGLang() as judge:
        run = resolve_config("tiny_cpu", None, tiny_overrides(tmp_path / "run") + [
            "--server_memory_saver=true", "--rollout.backend=sglang", f"--rollout.server_urls=[{policy.url}]",
            "--rollout.api_key=k", "--judge.kind=pairwise", "--judge.backend=sglang",
            f"--judge.server_urls=[{judge.url}]", "--judge.model_path=pm"])
        memory = {policy.url: ["weights", "kv_cache"], judge.url: ["kv_cache"]}
        ServerMemory(run.run_dir, memory, api_keys={policy.url: "k"}).release()
        assert policy.released == {"weights", "kv_cache"} and judge.released == {"kv_cache"}
        preflight(run)
        state = tmp_path / "theirs.json"  # what `start` would have recorded for them
        state.write_text(json.dumps({"servers": [{"url": s.url, "pid": 0} for s in (policy, judge)]}))
        out = subprocess.run([sys.executable, str(REPO / "launch/sglang_servers.py"), "status", "--state",
                              str(state)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and [s["healthy"] for s in json.loads(out.stdout)] == [True, True]
        for srv in (policy, judge):
            assert srv.fatal is None and srv.refused == []
            assert not {p for p, _ in srv.requests} & set(GENERATING + ("/health",))
        ServerMemory(run.run_dir, memory, api_keys={policy.url: "k"}).resume()
        assert policy.released == set() and judge.released == set() and policy.fatal is None


def test_start_fails_naming_a_server_that_cannot_generate(tmp_path):
    """/ready says yes but the one-token generation fails (a 503 from /health_generate): the start stops every
    server it started and names the one."""
    script = tmp_path / "half_server.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.helpers.rollout import FakeSGLang\n"
        "from http.server import ThreadingHTTPServer\n"
        "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
        "srv = FakeSGLang(contract=False)\n"
        "real = srv.handle\n"
        "srv.handle = lambda p, b: (503, b'') if p == '/health_generate' else real(p, b)\n"
        "srv.httpd.server_close()\n"
        "srv.httpd = ThreadingHTTPServer(('127.0.0.1', port), srv._handler())\n"
        "srv.httpd.serve_forever()\n")
    state = tmp_path / "s.json"
    port = free_port_pair()
    cfg = ServerLaunchConfig(model_path="m", base_port=port, log_dir=str(tmp_path / "logs"),
                             command=[sys.executable, str(script)])
    with pytest.raises(RuntimeError, match=rf"(?s)127.0.0.1:{port} is up but cannot generate .*HTTP 503"):
        start_servers(cfg, state, wait_timeout_s=30, poll_s=0.1)
    assert SGLangPool([f"http://127.0.0.1:{port}"], max_retries=0).health() == [False]  # stopped


def test_a_probe_error_is_not_a_crash():
    """A refused probe (HTTP 503 from /ready while the server starts) is 'not ready', not an exception."""
    with FakeSGLang() as srv:
        srv.healthy = False
        assert SGLangPool([srv.url]).health() == [False]
        with pytest.raises(SGLangError, match="HTTP 503"):
            SGLangPool([srv.url], max_retries=0).health_generate(0, timeout_s=5)
        assert srv.fatal is None
