"""Every request the project's SGLang clients send passes SGLang's own request types, and every reply the fake server
sends passes SGLang's own response types (the sglang 0.5.23 wheel's api/v1/api_types.py, loaded by file path, and
the io_struct field declarations for the endpoints api_types does not cover). The fake answers a violation with
HTTP 400 as the server does, so every other test that drives a client through the fake is checked the same way."""
import json

import pytest

import tests.helpers.rollout as rollout_helpers
from megatron_inpo.data.prompts import PromptRecord
from megatron_inpo.judge import Comparison, JudgeConfig, make_judge
from megatron_inpo.rollout import RolloutConfig, SamplingConfig, make_engine
from megatron_inpo.serving.pool import SGLangError, SGLangPool
from tests.helpers.rollout import (ContractUnavailable, FakeSGLang, SGLangContract, make_tiny_llama, one_torch_thread,
                                   require_sglang_contract)

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

PROMPTS = [PromptRecord(id=f"c{i}", prompt="x", prompt_ids=[1, 5 + i, 6]) for i in range(3)]


@pytest.fixture(scope="module")
def contract():
    return require_sglang_contract()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(d, seed=5)
    return d


def _engine(url, **sampling):
    return make_engine(RolloutConfig(backend="sglang", server_urls=[url], request_prompts=2, max_retries=0,
                                     sampling=SamplingConfig(max_new_tokens=4, **sampling)))


def _recheck(contract, srv, type_by_path):
    """Every request the fake received, checked again against SGLang's types directly; returns the paths seen."""
    seen = set()
    for path, body in srv.requests:
        if path in type_by_path:
            assert contract.check(type_by_path[path], body) is None, (path, body)
            seen.add(path)
    assert srv.refused == [] and srv.fatal is None
    return seen


def test_the_upstream_module_is_the_wheels_own(contract):
    # loaded from the installed wheel by path, never as the package `sglang` (whose import needs torch / CUDA)
    assert contract.api.__file__.endswith("sglang/api/v1/api_types.py")
    assert str(rollout_helpers.SGLANG_TEST_DEPS) in contract.api.__file__
    assert "sglang" not in __import__("sys").modules
    assert issubclass(contract.api.JsonContractError, ValueError)
    # the io_struct declarations were read, with their required field
    assert contract.io["UpdateWeightFromDiskReqInput"]["model_path"][1] is True
    assert {"tags", "rid"} <= set(contract.io["ReleaseMemoryOccupationReqInput"])


def test_rollout_requests_seeded_unseeded_n_and_batches_pass_the_contract(contract):
    # a server that ignores seeds: unseeded rollouts send n=K (on one that honours them, drawn seeds: a list)
    with FakeSGLang(deterministic=False) as srv:
        assert srv.contract is not None
        seeded = _engine(srv.url, n=4, seed=3).rollout(PROMPTS)  # per-sample seeds: a list of sampling_params
        unseeded = _engine(srv.url, n=4, seed=None).rollout(PROMPTS)  # n=4 in one dict for a batch
        single = _engine(srv.url, n=1, seed=None).generate([[1, 2, 3]])
        assert [len(r.completions) for r in seeded + unseeded] == [4] * 6 and len(single[0]) == 1
        bodies = [b for p, b in srv.requests if p == "/generate"]
        assert any(isinstance(b["sampling_params"], list) for b in bodies)
        assert any(isinstance(b["sampling_params"], dict) and b["sampling_params"].get("n") == 4 for b in bodies)
        assert _recheck(contract, srv, {"/generate": "GenerateRequest"}) == {"/generate"}
    with FakeSGLang() as srv:  # honours seeds: unseeded rollouts send seeds drawn from the OS (int64 range)
        unseeded = _engine(srv.url, n=4, seed=None).rollout(PROMPTS)
        single = _engine(srv.url, n=1, seed=None).generate([[1, 2, 3]])
        assert [len(r.completions) for r in unseeded] == [4] * 3 and len(single[0]) == 1
        assert all(isinstance(b["sampling_params"], list) for p, b in srv.requests if p == "/generate")
        assert _recheck(contract, srv, {"/generate": "GenerateRequest"}) == {"/generate"}


def test_judge_and_weight_update_requests_pass_the_contract(contract, tiny, tmp_path):
    with FakeSGLang() as gen, FakeSGLang(is_embedding=True) as rm:
        pm = make_judge(JudgeConfig(kind="pairwise", backend="sglang", model_path=str(tiny), server_urls=[gen.url],
                                    both_orders=True, batch_size=2))
        probs = pm.compare([Comparison("q", "a", "b"), Comparison("r", "c", "d")])
        assert all(0 < p < 1 for p in probs)
        body = next(b for p, b in gen.requests if p == "/generate")
        assert body["token_ids_logprob"] == [pm.id_a, pm.id_b] and body["return_logprob"] is True
        rj = make_judge(JudgeConfig(kind="reward", backend="sglang", model_path=str(tiny), server_urls=[rm.url]))
        assert len(rj.score([("q", "a"), ("q", "b")], None)) == 2
        new = tmp_path / "pi_2"
        new.mkdir()
        SGLangPool([gen.url]).update_weights_from_disk(str(new), version="pi_2")
        seen = _recheck(contract, gen, {"/generate": "GenerateRequest",
                                        "/update_weights_from_disk": "UpdateWeightFromDiskReqInput"})
        assert seen == {"/generate", "/update_weights_from_disk"}
        assert _recheck(contract, rm, {"/classify": "EmbeddingReqInput"}) == {"/classify"}


@pytest.mark.parametrize("path,body,needle", [
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"temperature": "1.0"}},
     'string \\"1.0\\", expected f64'),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 8.0}},
     "invalid type: floating point `8.0`, expected i64"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"sampling_seed": 1.5}}, "expected i64"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"n": "4"}}, "expected i64"),
    ("/generate", {"input_ids": [[1, 2.5]]}, "expected i64"),
    ("/generate", {"input_ids": [1, 2], "token_ids_logprob": ["A"]}, "expected"),
    ("/update_weights_from_disk", {"flush_cache": True}, "missing required field `model_path`"),
    ("/update_weights_from_disk", {"model_path": "/m", "flush_cache": "yes"}, "flush_cache"),
    ("/release_memory_occupation", {"tags": "weights"}, "tags"),
    ("/resume_memory_occupation", {"tags": [1]}, "tags"),
])
def test_a_contract_violation_is_a_400_like_the_server(contract, path, body, needle):
    with FakeSGLang() as srv:
        pool = SGLangPool([srv.url], max_retries=3, backoff_s=0.01)
        with pytest.raises(SGLangError, match="HTTP 400") as e:
            pool.request(path, body, parse_json=False)
        assert needle in str(e.value)
        assert pool.retries == 0 and len(srv.requests) == 1  # a 400 is final: never retried
        assert srv.fatal is None and srv.released == set()  # refused before any effect


def test_classify_violation_is_a_400(contract):
    with FakeSGLang(is_embedding=True) as srv:
        with pytest.raises(SGLangError, match=r"HTTP 400.*input_ids"):
            SGLangPool([srv.url], max_retries=2).request("/classify", {"input_ids": [["a"]]})


def test_fake_replies_are_decoded_by_sglangs_response_types(contract):
    """A fake that drifts from the server (here: a non-string text) fails the test instead of fooling the client."""
    srv = FakeSGLang(decode=lambda ids: ids)
    try:
        with pytest.raises(AssertionError, match="violates SGLang's GenerateResponse"):
            srv.handle("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
    finally:
        srv.httpd.server_close()
    good = FakeSGLang()
    try:
        status, items = good.handle("/generate", {"input_ids": [[1, 2]], "return_logprob": True,
                                                  "token_ids_logprob": [5, 6],
                                                  "sampling_params": {"max_new_tokens": 3, "n": 2}})
        assert status == 200 and len(items) == 2
        for it in items:  # what the client parses, decoded by SGLang's own type
            r = contract.api.GenerateResponse.from_json_value(json.loads(json.dumps(it)))
            assert r.output_ids == it["output_ids"] and r.meta_info.completion_tokens == len(it["output_ids"])
            assert [e.token_id for e in r.meta_info.output_token_ids_logprobs[0]] == [5, 6]
    finally:
        good.httpd.server_close()


def test_absent_wheel_skips_locally_and_fails_under_ci(tmp_path, monkeypatch):
    with pytest.raises(ContractUnavailable, match="tools/setup.sh"):
        SGLangContract(root=tmp_path)
    monkeypatch.setattr(rollout_helpers, "SGLANG_TEST_DEPS", tmp_path)
    monkeypatch.setattr(rollout_helpers, "_CONTRACT", None)
    monkeypatch.delenv("CI", raising=False)
    assert rollout_helpers.sglang_contract() is None
    with pytest.raises(pytest.skip.Exception, match="unavailable"):
        require_sglang_contract()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ContractUnavailable):
        rollout_helpers.sglang_contract()  # the fake refuses to run unchecked in CI
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_sglang_contract()
