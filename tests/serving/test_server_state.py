"""The fake SGLang server fails where the real one fails (sglang 0.5.23: http_server.py, scheduler.py,
tokenizer_manager.py, weight_updater.py), and the client copes with those failures."""
import threading
import time

import pytest

from megatron_inpo.rollout import RolloutConfig, SamplingConfig, make_engine
from megatron_inpo.serving.pool import SGLangError, SGLangPool
from tests.helpers.rollout import FakeSGLang


def _in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _slow_generate(srv, delay):
    srv.inject("/generate", "slow", count=1, delay=delay)
    pool = SGLangPool([srv.url], max_retries=0)
    return _in_thread(lambda: pool.request("/generate", {"input_ids": [1, 2],
                                                         "sampling_params": {"max_new_tokens": 2}}))


def _wait_busy(srv, n=1):
    deadline = time.time() + 5
    while srv.busy < n:
        assert time.time() < deadline
        time.sleep(0.01)


def test_flush_cache_is_refused_while_a_request_runs():
    with FakeSGLang() as srv:
        pool = SGLangPool([srv.url], max_retries=3, backoff_s=0.01)
        t, box = _slow_generate(srv, 0.5)
        _wait_busy(srv)
        with pytest.raises(SGLangError, match=r"/flush_cache: HTTP 400: Flush cache failed"):
            pool.request("/flush_cache", {}, parse_json=False)
        assert pool.retries == 0 and srv.flushes == 0
        t.join(5)
        assert "value" in box
        assert "Cache flushed" in pool.request("/flush_cache", {}, parse_json=False) and srv.flushes == 1


def test_weight_update_waits_for_running_requests_and_needs_no_separate_flush(tmp_path):
    """A request running when the update starts, and one arriving during it: SGLang's update holds the model
    lock (the first finishes, the second waits), flushes by itself, and the second runs right after. A /flush_cache
    sent after the update (the old client did) would meet that second request and be refused."""
    new = tmp_path / "pi_2"
    new.mkdir()
    with FakeSGLang() as srv:
        t1, b1 = _slow_generate(srv, 0.6)
        _wait_busy(srv)
        pool = SGLangPool([srv.url], max_retries=0)
        t_up, b_up = _in_thread(lambda: pool.update_weights_from_disk(str(new), version="pi_2"))
        deadline = time.time() + 5
        while not srv.updating:  # the update is waiting for the running request
            assert time.time() < deadline
            time.sleep(0.01)
        t2, b2 = _slow_generate(srv, 0.6)  # waits behind the update's lock
        t_up.join(10)
        assert "error" not in b_up, b_up.get("error")
        t1.join(5)  # its reply was sent before the update returned; the client thread may still be reading it
        # the running request finished on the old weights, before the new ones came in
        assert b1["value"]["meta_info"]["weight_version"] == "default"
        _wait_busy(srv)  # the second request now runs: a flush here is what SGLang refuses
        with pytest.raises(SGLangError, match="HTTP 400"):
            pool.request("/flush_cache", {}, parse_json=False)
        t2.join(5)
        assert b2["value"]["meta_info"]["weight_version"] == "pi_2"
        assert [p for p, _ in srv.requests].count("/update_weights_from_disk") == 1
        assert srv.flushes == 1 and srv.model_path == str(new)
        assert [r[0] for r in srv.refused] == ["/flush_cache"]  # only the test's own probe


@pytest.mark.parametrize("body,needle", [
    ({"input_ids": [[1, 2], [3]], "sampling_params": [{"n": 2}, {"n": 1}]}, "parallel_sample_num should be the same"),
    ({"input_ids": list(range(3, 35)), "sampling_params": {"max_new_tokens": 1}}, "longer than the model's context"),
    ({"input_ids": list(range(3, 23)), "sampling_params": {"max_new_tokens": 13}},
     "You requested a total of 33 tokens"),
])
def test_batch_and_context_length_errors_are_400(body, needle):
    with FakeSGLang(context_len=32) as srv:
        pool = SGLangPool([srv.url], max_retries=3, backoff_s=0.01)
        with pytest.raises(SGLangError, match="HTTP 400") as e:
            pool.request("/generate", body)
        assert needle in str(e.value) and pool.retries == 0
        # exactly at the limit is fine: 20 prompt tokens + 12 new = 32
        ok = pool.request("/generate", {"input_ids": list(range(3, 23)), "sampling_params": {"max_new_tokens": 12}})
        assert len(ok["output_ids"]) <= 12


def test_rollout_over_the_context_length_fails_with_the_servers_reason():
    with FakeSGLang(context_len=16) as srv:
        eng = make_engine(RolloutConfig(backend="sglang", server_urls=[srv.url], max_retries=2, backoff_s=0.01,
                                        sampling=SamplingConfig(n=2, max_new_tokens=16)))
        with pytest.raises(SGLangError, match="maximum context length of 16"):
            eng.generate([[1, 2, 3]])
        assert eng.pool.retries == 0


def _mem(pool, action, tags):
    return pool.request(f"/{action}_memory_occupation", {"tags": tags}, parse_json=False, max_retries=0)


def test_memory_release_and_resume_keep_state_per_tag_and_return_null():
    with FakeSGLang() as srv:
        pool = SGLangPool([srv.url], max_retries=0)
        assert _mem(pool, "release", ["weights", "kv_cache"]) == "null"
        assert srv.released == {"weights", "kv_cache"}
        assert _mem(pool, "resume", ["kv_cache"]) == "null" and srv.released == {"weights"}
        assert _mem(pool, "resume", ["weights"]) == "null" and srv.released == set()
        assert pool.request("/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}})
        assert _mem(pool, "release", None) == "null"  # no tags: every memory type (GPU_MEMORY_ALL_TYPES)
        assert srv.released == {"kv_cache", "weights", "cuda_graph"} and srv.fatal is None


@pytest.mark.parametrize("calls,reason", [
    ([("resume", ["weights"])], "not released"),
    ([("release", ["kv_cache"]), ("resume", ["weights", "kv_cache"])], "not released"),
    ([("release", ["weights"]), ("release", ["weights"])], "second release"),
])
def test_an_invalid_memory_call_kills_the_server(calls, reason):
    """SGLang's scheduler raises (offload_tags.remove of an unreleased tag) and the server exits: the fake dies
    too, and every later request finds nothing, /health included."""
    with FakeSGLang() as srv:
        pool = SGLangPool([srv.url], max_retries=0)
        for action, tags in calls[:-1]:
            _mem(pool, action, tags)
        with pytest.raises(SGLangError, match="1 attempt"):  # no retry of a call that is not idempotent
            _mem(pool, *calls[-1])
        assert reason in srv.fatal
        assert pool.health() == [False]
        with pytest.raises(SGLangError):
            pool.request("/model_info")
        srv.restart()  # a fresh process holds its memory again
        assert pool.health() == [True] and srv.released == set() and srv.fatal is None


def test_release_while_busy_and_generation_on_released_memory_are_fatal():
    with FakeSGLang() as srv:
        t, _ = _slow_generate(srv, 0.5)
        _wait_busy(srv)
        with pytest.raises(SGLangError):
            _mem(SGLangPool([srv.url], max_retries=0), "release", ["kv_cache"])
        assert "idle" in srv.fatal
        t.join(5)
    with FakeSGLang() as srv:
        pool = SGLangPool([srv.url], max_retries=0)
        _mem(pool, "release", ["weights", "kv_cache"])
        with pytest.raises(SGLangError):
            pool.request("/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 1}})
        assert "released memory" in srv.fatal
