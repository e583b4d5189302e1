"""The SGLang rollout client against an in-process server that follows SGLang's HTTP API, with faults."""
import logging
import time

import pytest

from megatron_inpo.data.prompts import PromptRecord
from megatron_inpo.rollout import RolloutConfig, SamplingConfig, make_engine
from megatron_inpo.rollout.sglang import SGLangEngine
from megatron_inpo.serving.pool import SGLangError, SGLangPool
from tests.helpers.rollout import EOS, FakeSGLang, free_url, require_sglang_contract

PROMPTS = [PromptRecord(id=f"s{i}", prompt="x", prompt_ids=[1, 5 + i, 6, 7]) for i in range(6)]


def sg_engine(urls, n=4, seed=11, **kw):
    base = dict(backend="sglang", server_urls=list(urls), backoff_s=0.01, backoff_max_s=0.05, max_retries=3,
                timeout_s=5.0, concurrency=4, sampling=SamplingConfig(n=n, max_new_tokens=8, seed=seed))
    base.update(kw)
    return make_engine(RolloutConfig(**base))


def ids(rs):
    return [[c.token_ids for c in r.completions] for r in rs]


def test_generate_follows_the_api_and_is_seeded():
    with FakeSGLang() as srv:
        eng = sg_engine([srv.url])
        rs = eng.rollout(PROMPTS)
        assert [len(r.completions) for r in rs] == [4] * 6
        # the servers' determinism is asked once, then one request per prompt (request_prompts=1)
        assert [p for p, _ in srv.requests] == ["/server_info"] + ["/generate"] * 6
        assert eng.nondeterministic == []
        body = next(b for p, b in srv.requests if p == "/generate" and b["input_ids"][0] == PROMPTS[0].prompt_ids)
        assert body["input_ids"] == [PROMPTS[0].prompt_ids] * 4
        sp = body["sampling_params"]
        assert isinstance(sp, list) and len({p["sampling_seed"] for p in sp}) == 4
        assert {"max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": -1}.items() <= sp[0].items()
        assert "n" not in sp[0]
        for r in rs:
            for c in r.completions:
                assert 1 <= len(c.token_ids) <= 8
                assert c.finish_reason == ("stop" if c.token_ids[-1] == EOS else "length")
        # same seeds -> same samples, whatever the request grouping
        assert ids(sg_engine([srv.url], request_prompts=4).rollout(PROMPTS)) == ids(rs)
        assert ids(sg_engine([srv.url], seed=12).rollout(PROMPTS)) != ids(rs)


def test_seeded_rollout_on_a_server_without_deterministic_inference_says_so(caplog):
    """SGLang ignores sampling_seed unless started with --enable-deterministic-inference (the fake does too): the
    samples then differ between two runs with the same seeds, and the client says plainly that they will."""
    with FakeSGLang(deterministic=False) as srv, FakeSGLang() as good:
        eng = sg_engine([srv.url, good.url])
        with caplog.at_level(logging.WARNING, logger="megatron_inpo.rollout.sglang"):
            eng.rollout(PROMPTS)
            eng.rollout(PROMPTS)  # checked once per engine
        warned = [r.getMessage() for r in caplog.records if "NOT be reproducible" in r.getMessage()]
        assert len(warned) == 1 and srv.url in warned[0] and good.url not in warned[0]
        assert eng.nondeterministic == [srv.url]
        assert ids(sg_engine([srv.url]).rollout(PROMPTS)) != ids(sg_engine([srv.url]).rollout(PROMPTS))
        assert ids(sg_engine([good.url]).rollout(PROMPTS)) == ids(sg_engine([good.url]).rollout(PROMPTS))
        # unseeded rollouts make no reproducibility claim: the server's mode is asked (to know whether it needs
        # seeds drawn for it), but nothing is warned
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megatron_inpo.rollout.sglang"):
            sg_engine([srv.url], seed=None).rollout(PROMPTS)
        assert not [r for r in caplog.records if "NOT be reproducible" in r.getMessage()]


def test_unseeded_uses_n_and_parses_prompt_major_lists():
    # a server that ignores seeds (no --enable-deterministic-inference) samples the n copies independently
    with FakeSGLang(deterministic=False) as srv:
        eng = sg_engine([srv.url], seed=None, request_prompts=3)
        rs = eng.rollout(PROMPTS)
        assert eng.honours_seeds == [False]
        assert all(c.seed is None for r in rs for c in r.completions)  # the server's own randomness
        assert [len(r.completions) for r in rs] == [4] * 6
        bodies = [b for p, b in srv.requests if p == "/generate"]
        assert len(bodies) == 2 and all(b["sampling_params"]["n"] == 4 for b in bodies)
        assert sorted(b["input_ids"] for b in bodies) == [[p.prompt_ids for p in PROMPTS[:3]],
                                                         [p.prompt_ids for p in PROMPTS[3:]]]
        # a single prompt with n=1 gets a dict back (not a list): still parsed
        one = sg_engine([srv.url], n=1, seed=None).generate([[1, 2, 3]])
        assert len(one) == 1 and len(one[0]) == 1


def _samples(r):
    return [tuple(c.token_ids) for c in r.completions]


def test_unseeded_rollout_on_deterministic_servers_draws_distinct_seeds():
    """A server started with --enable-deterministic-inference seeds every request without sampling_seed with 42
    (SGLang 0.5.23 sampling/sampling_batch_info.py; multinomial_with_seed draws from the seed and the positions
    only), so the n=K samples of one unseeded request are identical, every tournament a tie. The client draws K
    distinct seeds per prompt from the OS instead and records each with its sample."""
    prompts = PROMPTS[:3]
    # deterministic, as the launch scripts start them; no early EOS, so distinct seeds give distinct samples (two
    # one-token EOS answers would be equal whatever their seeds)
    with FakeSGLang(eos_prob=0.0) as srv:
        # the failure being avoided: n=K on such a server gives K copies of one sample
        pool = SGLangPool([srv.url])
        same = pool.request("/generate", {"input_ids": [1, 5, 6, 7], "sampling_params": {"n": 8,
                                                                                         "max_new_tokens": 8}})
        assert len(same) == 8 and len({tuple(x["output_ids"]) for x in same}) == 1

        eng = sg_engine([srv.url], n=8, seed=None)
        rs = eng.rollout(prompts)
        assert eng.honours_seeds == [True]
        for r in rs:
            assert len(set(_samples(r))) == 8  # K different samples
            seeds = [c.seed for c in r.completions]
            assert len(set(seeds)) == 8 and all(isinstance(x, int) and 0 <= x < 2 ** 63 for x in seeds)
        bodies = [b for p, b in srv.requests if p == "/generate" and isinstance(b["sampling_params"], list)]
        sent = [sp["sampling_seed"] for b in bodies for sp in b["sampling_params"]]
        assert sorted(sent) == sorted(c.seed for r in rs for c in r.completions)  # what was sent is recorded
        assert all("n" not in sp for b in bodies for sp in b["sampling_params"])
        # from the OS: another rollout of the same prompts draws other seeds, hence other samples
        again = sg_engine([srv.url], n=8, seed=None).rollout(prompts)
        assert {c.seed for r in again for c in r.completions}.isdisjoint(sent)
        # ... and a recorded seed reproduces its sample on a deterministic server
        first = rs[0].completions[0]
        redo = pool.request("/generate", {"input_ids": rs[0].prompt_ids, "sampling_params": {
            "max_new_tokens": 8, "sampling_seed": first.seed}})
        assert redo["output_ids"] == first.token_ids


def test_drawn_seeds_are_written_to_the_rollout_file(tmp_path):
    import contextlib
    import json

    from megatron_inpo.rollout.pipeline import rollout_stage

    with FakeSGLang() as srv:
        eng = sg_engine([srv.url], n=4, seed=None)
        rollout_stage(PROMPTS[:2], lambda: contextlib.nullcontext(eng), tmp_path / "rollouts.jsonl", iteration=1)
        rows = [json.loads(x) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
        assert len(rows) == 2
        for row in rows:
            seeds = [c["seed"] for c in row["completions"]]
            assert len(set(seeds)) == 4 and all(isinstance(x, int) for x in seeds)
        sent = {sp["sampling_seed"] for p, b in srv.requests if p == "/generate" for sp in b["sampling_params"]}
        assert sent == {c["seed"] for row in rows for c in row["completions"]}


def test_unknown_sampling_param_is_a_400_not_retried():
    require_sglang_contract()  # the 400 text is SGLang's own (api_types: unknown keys rejected)
    with FakeSGLang() as srv:
        pool = SGLangPool([srv.url], max_retries=3, backoff_s=0.01)
        with pytest.raises(SGLangError, match=rf"{srv.url}/generate: HTTP 400: .*unknown field `best_of`"):
            pool.request("/generate", {"input_ids": [1, 2], "sampling_params": {"best_of": 2}})
        assert len(srv.requests) == 1 and pool.retries == 0


def test_server_down_names_the_url_after_backoff():
    url = free_url()
    eng = sg_engine([url], max_retries=3, backoff_s=0.02, backoff_max_s=1.0)
    t0 = time.perf_counter()
    with pytest.raises(SGLangError) as e:
        eng.rollout(PROMPTS[:1])
    dt = time.perf_counter() - t0
    msg = str(e.value)
    assert url in msg and "after 4 attempt(s)" in msg and "is the server up?" in msg
    assert msg.count(url) == 4 and eng.pool.retries == 3
    assert dt >= 0.5 * (0.02 + 0.04 + 0.08)  # exponential back-off (jitter scales each delay by 0.5..1)


def test_failover_to_a_live_server_loses_nothing():
    with FakeSGLang() as srv:
        dead = free_url()
        eng = sg_engine([dead, srv.url], max_retries=2)
        rs = eng.rollout(PROMPTS)
        assert [len(r.completions) for r in rs] == [4] * 6
        assert ids(rs) == ids(sg_engine([srv.url]).rollout(PROMPTS))


@pytest.mark.parametrize("fault", ["malformed", "http503", "http500", "http429", "drop", "short", "abort",
                                   "ids_out_of_range", "text_int"])
def test_transient_faults_are_retried(fault, caplog):
    with FakeSGLang() as srv:
        reference = ids(sg_engine([srv.url]).rollout(PROMPTS))
        srv.inject("/generate", fault, count=2)
        eng = sg_engine([srv.url])
        with caplog.at_level(logging.WARNING, logger="megatron_inpo.serving.pool"):
            rs = eng.rollout(PROMPTS)
        assert ids(rs) == reference  # nothing lost, nothing duplicated, same samples
        assert eng.pool.retries == 2 and any("retry" in m for m in caplog.messages)


def test_persistent_malformed_reply_is_a_clear_error():
    with FakeSGLang() as srv:
        srv.inject("/generate", "malformed", count=10)
        with pytest.raises(SGLangError, match="malformed JSON reply"):
            sg_engine([srv.url], max_retries=1).rollout(PROMPTS[:1])


def test_slow_server_times_out_then_succeeds():
    with FakeSGLang() as srv:
        srv.inject("/generate", "slow", count=1, delay=2.0)
        eng = sg_engine([srv.url], timeout_s=0.6, concurrency=1)
        rs = eng.rollout(PROMPTS[:2])
        assert [len(r.completions) for r in rs] == [4, 4] and eng.pool.retries == 1
        srv.inject("/generate", "slow", count=5, delay=1.0)
        with pytest.raises(SGLangError, match="timed out"):
            sg_engine([srv.url], timeout_s=0.2, max_retries=1).rollout(PROMPTS[:1])


def test_concurrency_limit():
    with FakeSGLang() as srv:
        srv.inject("/generate", "slow", count=6, delay=0.15)
        sg_engine([srv.url], concurrency=2).rollout(PROMPTS)
        assert srv.max_inflight == 2
        srv.max_inflight = 0
        srv.inject("/generate", "slow", count=6, delay=0.4)
        sg_engine([srv.url], concurrency=6).rollout(PROMPTS)
        assert srv.max_inflight > 2


def test_health_model_info_and_weight_update(tmp_path):
    with FakeSGLang() as a, FakeSGLang() as b:
        pool = SGLangPool([a.url, b.url], max_retries=0)
        assert pool.health() == [True, True]
        b.healthy = False
        assert pool.health() == [True, False]
        with pytest.raises(TimeoutError, match=b.url):
            pool.wait_healthy(timeout_s=0.2, poll_s=0.05)
        b.healthy = True
        pool.wait_healthy(timeout_s=1.0, poll_s=0.05)
        assert pool.model_info()["is_generation"] is True
        eng = SGLangEngine(RolloutConfig(backend="sglang", server_urls=[a.url, b.url]), pool=pool)
        new = tmp_path / "iter1"
        new.mkdir()
        eng.update_weights(str(new), version="iter1")
        for s in (a, b):
            # the update flushes the radix cache itself (flush_cache: true); no separate /flush_cache, which
            # SGLang refuses while any request runs
            assert s.requests[-1] == ("/update_weights_from_disk",
                                      {"model_path": str(new), "flush_cache": True, "weight_version": "iter1"})
            assert s.model_path == str(new) and s.weight_version == "iter1" and s.flushes == 1
        assert pool.model_info(server=1)["weight_version"] == "iter1"
        with pytest.raises(SGLangError, match=rf"{a.url}.*HTTP 400.*not found"):
            eng.update_weights(str(tmp_path / "missing"))


def test_throughput_reported(caplog):
    with FakeSGLang() as srv:
        eng = sg_engine([srv.url])
        with caplog.at_level(logging.INFO, logger="megatron_inpo.rollout"):
            rs = eng.rollout(PROMPTS)
        s = eng.meter.summary()
        assert s["prompts"] == 6 and s["tokens"] == sum(len(c.token_ids) for r in rs for c in r.completions)
        assert any("rollout[sglang]" in m and "prompts/s" in m and "tokens/s" in m for m in caplog.messages)
