"""The SGLang client against hostile or broken servers: 429 / 503 retried after Retry-After, every reply validated
(a wrong-typed or out-of-range reply is a failed attempt, never written), and SGLang's --api-key (the key sent,
refused without it). The fake server answers as SGLang does (tests/helpers/rollout.py)."""
import json
import sys
import time

import pytest

from megatron_inpo.config import ConfigError
from megatron_inpo.data.preferences import read_preferences
from megatron_inpo.data.prompts import PromptRecord
from megatron_inpo.judge import Comparison, JudgeConfig
from megatron_inpo.judge.pairwise import PairwiseJudge, SGLangPairwiseBackend
from megatron_inpo.judge.reward import SGLangRewardJudge
from megatron_inpo.rollout import RolloutConfig, SamplingConfig, generate_preferences
from megatron_inpo.rollout.sglang import SGLangEngine, parse_completion
from megatron_inpo.serving.memory import ServerMemory, ServerMemoryRecord, memory_servers
from megatron_inpo.serving.pool import SGLangError, SGLangPool, _retry_after, resolve_api_key
from megatron_inpo.serving.servers import REDACTED, ServerLaunchConfig, read_state, start_servers, stop_servers
from tests.helpers.rollout import (CORRUPT_GENERATE, CORRUPT_LOGPROB, CORRUPT_REWARD, REPO, FakeSGLang, SGLangAuth,
                                   free_port_pair, make_tokenizer, require_sglang_contract)

PROMPTS = [PromptRecord(id=f"h{i}", prompt="say " + "abc"[i % 3] * (i % 4 + 1)) for i in range(8)]
FAST = dict(backoff_s=0.001, backoff_max_s=0.01, timeout_s=10.0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def engine(url, tok, max_retries=3, **kw):
    cfg = RolloutConfig(backend="sglang", server_urls=[url], max_retries=max_retries, concurrency=4,
                        sampling=SamplingConfig(n=4, max_new_tokens=6, seed=3), **FAST, **kw)
    return SGLangEngine(cfg, tokenizer=tok)


def pm_judge(url, tok, max_retries=3, api_key=""):
    cfg = JudgeConfig(kind="pairwise", backend="sglang", model_path="unused", server_urls=[url], batch_size=8,
                      max_retries=max_retries, api_key=api_key, **FAST)
    pool = SGLangPool.from_config(cfg, "judge.api_key")
    return PairwiseJudge(SGLangPairwiseBackend(pool, cfg.batch_size), tok, cfg, name="pm")


def ids(rs):
    return [[c.token_ids for c in r.completions] for r in rs]


# ---- retries: 429 / 503 and Retry-After ------------------------------------------------------------------------
def test_retry_after_header_parsing():
    assert _retry_after("2") == 2.0 and _retry_after(" 0.5 ") == 0.5 and _retry_after("-3") == 0.0
    assert _retry_after(None) is None and _retry_after("soon") is None and _retry_after("nan") is None
    http_date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= _retry_after(http_date) <= 31


@pytest.mark.parametrize("fault", ["http429", "http503"])
def test_overload_is_retried_after_retry_after(fault):
    with FakeSGLang() as srv:
        pool = SGLangPool([srv.url], max_retries=3, backoff_s=0.001, backoff_max_s=5.0)
        srv.inject("/generate", fault, count=1, delay=0.4)  # Retry-After: 0.4
        t0 = time.perf_counter()
        reply = pool.request("/generate", {"input_ids": [1, 5], "sampling_params": {"max_new_tokens": 2}})
        assert time.perf_counter() - t0 >= 0.4  # not before the server said
        assert reply["output_ids"] and pool.retries == 1
        # the wait is capped by backoff_max_s whatever the server asks
        pool = SGLangPool([srv.url], max_retries=3, backoff_s=0.001, backoff_max_s=0.05)
        srv.inject("/generate", fault, count=1, delay=3600)
        t0 = time.perf_counter()
        pool.request("/generate", {"input_ids": [1, 5], "sampling_params": {"max_new_tokens": 2}})
        assert time.perf_counter() - t0 < 5


def test_persistent_429_names_the_status_and_other_4xx_are_not_retried():
    with FakeSGLang() as srv:
        srv.inject("/generate", "http429", count=10)
        pool = SGLangPool([srv.url], max_retries=2, backoff_s=0.001, backoff_max_s=0.01)
        with pytest.raises(SGLangError, match=rf"after 3 attempt\(s\):\n  {srv.url}/generate: HTTP 429") as e:
            pool.request("/generate", {"input_ids": [1, 5]})
        assert e.value.status == 429 and "is the server up?" not in str(e.value)
        n = len(srv.requests)
        srv.faults.clear()
        srv.inject("/generate", "http400", count=1)
        with pytest.raises(SGLangError, match="HTTP 400") as e:
            pool.request("/generate", {"input_ids": [1, 5]})
        assert e.value.status == 400 and len(srv.requests) == n + 1  # sent once


def test_memory_calls_are_not_idempotent_so_a_429_is_not_resent(tmp_path):
    """release / resume are sent once (max_retries=0): a 429 surfaces; being a refusal (nothing done), the record
    keeps the state it had, and the next release is sent normally."""
    with FakeSGLang() as srv:
        mem = ServerMemory(tmp_path, {srv.url: ["kv_cache"]})
        srv.inject("/release_memory_occupation", "http429", count=1, delay=0.01)
        with pytest.raises(SGLangError, match="HTTP 429") as e:
            mem.release()
        assert e.value.status == 429
        assert [p for p, _ in srv.requests].count("/release_memory_occupation") == 1
        assert ServerMemoryRecord(tmp_path).get(srv.url)["state"] == "resumed" and not srv.released
        mem.release()
        assert srv.released == {"kv_cache"} and ServerMemoryRecord(tmp_path).get(srv.url)["state"] == "released"


def test_overloaded_stage_completes_with_every_pair(tok, tmp_path):
    """25% of the policy's and the judge's replies are 429s or wrong-typed / out-of-range: the stage writes exactly
    what a clean run writes (every pair, no poisoned one), each fault costing one retry."""
    with FakeSGLang() as policy, FakeSGLang() as judge:
        clean = tmp_path / "clean.jsonl"
        s0 = generate_preferences(PROMPTS, engine(policy.url, tok), pm_judge(judge.url, tok), clean, iteration=1,
                                  model_version="it1", batch_size=3, progress=False)
        policy.inject_rate("/generate", ["http429"] * len(CORRUPT_GENERATE) + CORRUPT_GENERATE, 0.25, delay=0.001,
                           seed=1)
        judge.inject_rate("/generate", ["http429"] * len(CORRUPT_LOGPROB) + CORRUPT_LOGPROB, 0.25, delay=0.001,
                          seed=2)
        eng, pm = engine(policy.url, tok, max_retries=10), pm_judge(judge.url, tok, max_retries=10)
        hostile = tmp_path / "hostile.jsonl"
        s1 = generate_preferences(PROMPTS, eng, pm, hostile, iteration=1, model_version="it1", batch_size=3,
                                  progress=False)
        kinds = {k for _, k in policy.injected + judge.injected}
        assert "http429" in kinds and kinds - {"http429"}  # both overloads and bad replies were served
        assert eng.pool.retries == len(policy.injected) and pm.backend.pool.retries == len(judge.injected)
    assert hostile.read_bytes() == clean.read_bytes()
    assert s1["pairs"] == s0["pairs"] == len(read_preferences(hostile)) > 0


# ---- every reply validated -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", CORRUPT_GENERATE)
def test_bad_rollout_reply_is_retried_then_refused_with_a_clear_error(kind, tok):
    with FakeSGLang() as srv:
        reference = ids(engine(srv.url, tok).rollout(PROMPTS[:2]))
        srv.inject("/generate", kind, count=1)
        eng = engine(srv.url, tok)
        assert ids(eng.rollout(PROMPTS[:2])) == reference and eng.pool.retries == 1  # retried, nothing kept
        srv.inject("/generate", kind, count=2)
        with pytest.raises(SGLangError, match=rf"after 2 attempt\(s\):\n  {srv.url}/generate: invalid reply: "
                                              r"completion 0: ") as e:
            engine(srv.url, tok, max_retries=1).rollout(PROMPTS[:1])
        assert e.value.status is None


def test_out_of_range_ids_and_integer_text_are_named():
    good = {"text": "ab", "output_ids": [5, 2], "meta_info": {"finish_reason": {"type": "stop", "matched": 2}}}
    assert parse_completion(good, vocab_size=6).token_ids == [5, 2]
    for bad, msg in (({"output_ids": [-7, 10 ** 12]}, r"output_ids\[0\] = -7 is not a token id >= 0"),
                     ({"output_ids": [5, 10 ** 12]}, r"output_ids\[1\] = 1000000000000 is not a token id \[0, 6\)"),
                     ({"output_ids": [5, 6]}, r"output_ids\[1\] = 6 is not a token id \[0, 6\)"),
                     ({"output_ids": [True]}, r"output_ids\[0\] = True is bool, not an int"),
                     ({"output_ids": [1, 2, 3, 4]}, "more than max_new_tokens=3"),
                     ({"text": 12345}, "text is int, not a string"),
                     ({"meta_info": None}, "meta_info is null"),
                     ({"meta_info": {"finish_reason": "exploded"}}, "finish_reason = 'exploded'")):
        with pytest.raises((ValueError, TypeError), match=msg):
            parse_completion({**good, **bad}, vocab_size=None if "-7" in msg else 6, max_new_tokens=3)


def test_vocab_bound_is_the_tokenizer_or_the_models_padded_vocab(tok, tmp_path):
    eng = engine("http://127.0.0.1:9", tok)
    assert eng.output_vocab_size == len(tok)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": len(tok) + 64}))
    assert engine("http://127.0.0.1:9", tok, model_path=str(tmp_path)).output_vocab_size == len(tok) + 64
    assert SGLangEngine(RolloutConfig(backend="sglang", server_urls=["http://127.0.0.1:9"])).output_vocab_size is None


@pytest.mark.parametrize("kind", CORRUPT_LOGPROB)
def test_bad_judge_logprobs_are_retried_then_refused(kind, tok):
    items = [Comparison("q", "a", "bb"), Comparison("q2", "ccc", "d")]
    with FakeSGLang() as srv:
        reference = pm_judge(srv.url, tok).compare(items)
        srv.inject("/generate", kind, count=1)
        j = pm_judge(srv.url, tok)
        assert j.compare(items) == reference and j.backend.pool.retries == 1
        srv.inject("/generate", kind, count=2)
        with pytest.raises(SGLangError, match=rf"{srv.url}/generate: invalid reply: result 0: .*output_token_ids"):
            pm_judge(srv.url, tok, max_retries=1).compare(items)


@pytest.mark.parametrize("kind", CORRUPT_REWARD)
def test_bad_rewards_are_retried_then_refused(kind, tok):
    pairs = [("q", "a"), ("q", "bb"), ("q2", "ccc")]

    def rm(max_retries=3):
        return SGLangRewardJudge(SGLangPool([srv.url], max_retries=max_retries, **FAST), tok, batch_size=2)

    with FakeSGLang(is_embedding=True) as srv:
        reference = rm().score(pairs)
        srv.inject("/classify", kind, count=1)
        j = rm()
        assert j.score(pairs) == reference and j.pool.retries == 1
        srv.inject("/classify", kind, count=4)  # two requests (batch_size 2), two attempts each
        with pytest.raises(SGLangError, match=rf"{srv.url}/classify: invalid reply: result 0: (embedding|a result)"):
            rm(max_retries=1).score(pairs)


# ---- API key ---------------------------------------------------------------------------------------------------
def test_fake_checks_the_key_with_sglangs_own_rules():
    require_sglang_contract()
    auth = SGLangAuth()
    assert auth.from_wheel and auth.levels["/release_memory_occupation"] == "ADMIN_OPTIONAL"
    assert auth.decide("GET", "/health", None, "k") == 200
    for path in ("/generate", "/classify", "/server_info", "/update_weights_from_disk", "/resume_memory_occupation"):
        assert auth.decide("POST", path, None, "k") == 401
        assert auth.decide("POST", path, "Bearer nope", "k") == 401
        assert auth.decide("POST", path, "Bearer k", "k") == 200 and auth.decide("POST", path, "bearer k", "k") == 200


def test_api_key_sent_and_refused_without_it(tok, tmp_path, monkeypatch):
    with FakeSGLang(api_key="s3cret") as srv:
        # without a key: 401 at once (a refusal, not retried), the message says what to set
        eng = engine(srv.url, tok)
        with pytest.raises(SGLangError, match=r"HTTP 401.*requires an API key.*rollout.api_key") as e:
            eng.generate([[1, 5]], seeds=None)
        assert e.value.status == 401 and eng.pool.retries == 0
        with pytest.raises(SGLangError, match=r"HTTP 401.*API key sent was refused"):
            engine(srv.url, tok, api_key="wrong").generate([[1, 5]])
        assert SGLangPool([srv.url]).health() == [True]  # /health needs no key (probes)
        # with it, as a literal or from the environment (env:VAR, kept out of config.yaml)
        assert len(engine(srv.url, tok, api_key="s3cret").rollout(PROMPTS[:2])) == 2
        monkeypatch.setenv("INPO_TEST_KEY", "s3cret")
        refused = len(srv.refused)
        eng = engine(srv.url, tok, api_key="env:INPO_TEST_KEY")
        assert len(eng.rollout(PROMPTS[:2])) == 2 and len(srv.refused) == refused
        assert len(pm_judge(srv.url, tok, api_key="env:INPO_TEST_KEY").compare([Comparison("q", "a", "b")])) == 1
        monkeypatch.delenv("INPO_TEST_KEY")
        with pytest.raises(ConfigError, match="rollout.api_key: the environment variable INPO_TEST_KEY"):
            engine(srv.url, tok, api_key="env:INPO_TEST_KEY")
    assert resolve_api_key("") is None and resolve_api_key("k") == "k"


def test_memory_release_and_resume_send_each_servers_key(tmp_path):
    with FakeSGLang(api_key="pk") as policy, FakeSGLang(api_key="jk") as judge:
        servers = memory_servers(RolloutConfig(backend="sglang", server_urls=[policy.url], api_key="pk"),
                                 [JudgeConfig(backend="sglang", server_urls=[judge.url], api_key="jk")])
        mem = ServerMemory(tmp_path, servers)
        mem.release()
        assert policy.released == {"weights", "kv_cache"} and judge.released == {"kv_cache"}
        mem.resume()
        assert not policy.released and not judge.released and not policy.refused and not judge.refused
        # without the keys: refused (401) before acting, state unchanged
        with pytest.raises(SGLangError, match="HTTP 401"):
            ServerMemory(tmp_path / "other", {policy.url: ["kv_cache"]}).release()
        assert not policy.released


def test_launcher_passes_the_key_and_keeps_it_out_of_the_state_file(tmp_path, monkeypatch):
    monkeypatch.setenv("INPO_TEST_KEY", "launch-key")
    state = tmp_path / "servers.json"
    cfg = ServerLaunchConfig(model_path=str(tmp_path), base_port=free_port_pair(), log_dir=str(tmp_path / "logs"),
                             command=[sys.executable, str(REPO / "tests" / "helpers" / "rollout.py")],
                             api_key="env:INPO_TEST_KEY")
    (url,) = start_servers(cfg, state, wait_timeout_s=60, poll_s=0.1)
    try:
        argv = read_state(state)[0]["argv"]
        assert argv[argv.index("--api-key") + 1] == REDACTED and "launch-key" not in state.read_text()
        with pytest.raises(SGLangError, match="HTTP 401"):
            SGLangPool([url], max_retries=0).model_info()
        assert SGLangPool([url], max_retries=0, api_key="launch-key").model_info()["is_generation"] is True
    finally:
        assert stop_servers(state) == 1  # the live command line is matched with its key redacted too
