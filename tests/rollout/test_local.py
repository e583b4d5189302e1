"""The in-process transformers engine on a tiny random Llama: seeds, batch independence, KV-cache decoding against
a full recompute, stop handling, the sampling filters and distribution, weight updates, throughput logging."""
import logging

import pytest
import torch

from megatron_inpo.config import ConfigError
from megatron_inpo.data.prompts import PromptRecord
from megatron_inpo.rollout import RolloutConfig, SamplingConfig, make_engine, prompt_seed
from megatron_inpo.rollout.local import filter_logits, row_uniforms
from tests.helpers.rollout import EOS, make_tiny_llama, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # tiny models: see one_torch_thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(d, seed=0)
    return d


def engine(path, **sampling):
    base = dict(n=4, max_new_tokens=10, seed=7)
    base.update(sampling)
    return make_engine(RolloutConfig(backend="local", model_path=str(path), sampling=SamplingConfig(**base)))


PROMPTS = [PromptRecord(id=f"q{i}", prompt="hello " * (i + 1) + "?") for i in range(4)]


def as_ids(rollouts):
    return [[c.token_ids for c in r.completions] for r in rollouts]


def test_same_seeds_same_samples_and_batch_independent(tiny):
    eng = engine(tiny)
    a = eng.rollout(PROMPTS, iteration=1)
    b = eng.rollout(PROMPTS, iteration=1)
    assert as_ids(a) == as_ids(b)
    # each sample draws from its own seed: one prompt at a time, reversed order, or tiny micro-batches agree
    single = [eng.rollout([p], iteration=1)[0] for p in reversed(PROMPTS)][::-1]
    assert as_ids(single) == as_ids(a)
    eng.cfg.max_batch_sequences = 3
    assert as_ids(eng.rollout(PROMPTS, iteration=1)) == as_ids(a)
    # another iteration (or base seed) gives other samples; the K samples of a prompt differ from each other
    assert as_ids(eng.rollout(PROMPTS, iteration=2)) != as_ids(a)
    assert all(len({tuple(t) for t in r}) > 1 for r in as_ids(a))
    assert a[0].prompt_ids[0] == 1 and eng.tokenizer.decode(a[0].prompt_ids).startswith("<s>user: hello")


def test_k_samples_from_one_prompt_pass_equal_k_separate_decodes(tiny):
    """The engine runs a prompt once and repeats its KV cache for the K samples, and sorts prompts of several
    lengths into batches: sample j must still be exactly what decoding that prompt alone with n = 1 and sample j's
    seed gives (a cache row repeated out of order would hand one sample another's context)."""
    import dataclasses

    eng = engine(tiny, n=4, max_new_tokens=12)
    prompt_ids = [eng.tokenizer.encode(p.prompt) for p in PROMPTS][::-1]  # longest first: the engine re-sorts
    seeds = [[prompt_seed(7, 1, p.id, j) for j in range(4)] for p in PROMPTS[::-1]]
    together = eng.generate(prompt_ids, eng.cfg.sampling, seeds)
    one = dataclasses.replace(eng.cfg.sampling, n=1)
    for ids, ss, comps in zip(prompt_ids, seeds, together):
        assert [c.token_ids for c in comps] == [eng.generate([ids], one, [[s]])[0][0].token_ids for s in ss]
    assert len({tuple(c.token_ids) for comps in together for c in comps}) > 4  # samples differ


def test_completion_fields_and_stops(tiny):
    eng = engine(tiny, n=8, max_new_tokens=12)
    rs = eng.rollout(PROMPTS)
    for r in rs:
        for c in r.completions:
            assert 1 <= len(c.token_ids) <= 12
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == EOS and EOS not in c.token_ids[:-1]
            else:
                assert c.finish_reason == "length" and len(c.token_ids) == 12 and EOS not in c.token_ids
            assert c.text == eng.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # a stop token id ends a response where it first appears (and is kept, like SGLang's output_ids)
    first = rs[0].completions[0].token_ids
    stop = first[2]
    eng2 = engine(tiny, n=8, max_new_tokens=12, stop_token_ids=[stop])
    c0 = eng2.rollout(PROMPTS)[0].completions[0]
    assert c0.token_ids == first[:first.index(stop) + 1] and c0.finish_reason == "stop"
    # ignore_eos: every response runs to max_new_tokens
    assert all(len(c.token_ids) == 12 for r in engine(tiny, ignore_eos=True, max_new_tokens=12).rollout(PROMPTS)
               for c in r.completions)


def test_greedy_kv_cache_matches_full_recompute(tiny):
    eng = engine(tiny, n=1, temperature=0.0, max_new_tokens=8, ignore_eos=True)
    rs = eng.rollout(PROMPTS)  # batched with left padding + KV cache
    model = eng.model
    for r in rs:
        ids = list(r.prompt_ids)
        want = []
        with torch.no_grad():
            for _ in range(8):  # no padding, no cache: the reference
                t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                want.append(t)
                ids.append(t)
        assert r.completions[0].token_ids == want


def test_filters_against_hand_computation():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    inf = float("-inf")
    s = SamplingConfig(temperature=1.0, top_k=2)
    assert filter_logits(logits, s)[0, 2:].tolist() == [inf, inf]
    s = SamplingConfig(temperature=1.0, top_p=0.7)  # 0.5 < 0.7, 0.5+0.25 >= 0.7 -> keep the first two
    kept = torch.isfinite(filter_logits(logits, s))[0].tolist()
    assert kept == [True, True, False, False]
    s = SamplingConfig(temperature=1.0, top_p=0.75)  # exactly reached after two
    assert torch.isfinite(filter_logits(logits, s))[0].tolist() == [True, True, False, False]
    s = SamplingConfig(temperature=1.0, min_p=0.4)  # drop p < 0.4 * 0.5
    assert torch.isfinite(filter_logits(logits, s))[0].tolist() == [True, True, False, False]
    s = SamplingConfig(temperature=2.0)
    assert torch.allclose(filter_logits(logits, s), logits / 2)


def test_row_uniforms_are_uniform_and_independent():
    seeds = torch.tensor([prompt_seed(0, 1, f"p{i}", j) for i in range(500) for j in range(8)])
    across = torch.stack([row_uniforms(seeds, t) for t in range(25)])  # [steps, rows]
    assert torch.equal(across, torch.stack([row_uniforms(seeds, t) for t in range(25)]))  # a pure function
    assert torch.equal(row_uniforms(seeds[7:9], 3), across[3, 7:9])  # batch-independent
    assert float(across.min()) >= 0 and float(across.max()) < 1
    for sample in (across.flatten(), across[:, 0], across[0, :]):  # pooled, along steps, along seeds
        counts = torch.histc(sample, bins=10, min=0, max=1)
        expect = sample.numel() / 10
        # chi-square with 9 dof: the 0.999 quantile is 27.9
        assert float(((counts - expect) ** 2 / expect).sum()) < 27.9
    x, y = across[:-1].flatten() - 0.5, across[1:].flatten() - 0.5  # consecutive steps of the same rows
    assert abs(float((x * y).mean() / (x * x).mean())) < 0.02


def test_sampling_distribution_matches_softmax(tiny):
    n = 2000
    eng = engine(tiny, n=n, max_new_tokens=1, ignore_eos=True, top_k=4, temperature=0.8)
    eng.cfg.max_batch_sequences = n
    (r,) = eng.rollout(PROMPTS[:1])
    with torch.no_grad():
        logits = eng.model(input_ids=torch.tensor([r.prompt_ids])).logits[0, -1] / 0.8
    top = torch.topk(logits, 4)
    p = torch.softmax(top.values, -1)
    counts = torch.zeros(4)
    for c in r.completions:
        (t,) = c.token_ids
        assert t in top.indices.tolist()
        counts[top.indices.tolist().index(t)] += 1
    # 2000 draws: the standard error of each frequency is <= 0.012; allow 4 of them
    assert torch.allclose(counts / n, p, atol=0.045), (counts / n, p)


def test_update_weights_and_throughput_log(tiny, tmp_path, caplog):
    other = tmp_path / "other"
    make_tiny_llama(other, seed=1)
    eng = engine(tiny)
    before = as_ids(eng.rollout(PROMPTS))
    with caplog.at_level(logging.INFO, logger="megatron_inpo.rollout"):
        eng.update_weights(str(other), version="it1")
        after = as_ids(eng.rollout(PROMPTS))
    assert after != before and after == as_ids(engine(other).rollout(PROMPTS))
    assert any("prompts/s" in m and "tokens/s" in m for m in caplog.messages)
    s = eng.meter.summary()
    assert s["prompts"] == 8 and s["sequences"] == 32 and s["tokens"] > 0 and s["tokens_per_s"] > 0


def test_prompt_seed_and_config_errors(tiny):
    assert prompt_seed(1, 1, "a", 0) == prompt_seed(1, 1, "a", 0) != prompt_seed(1, 1, "a", 1)
    assert prompt_seed(1, 1, "a", 0) != prompt_seed(1, 2, "a", 0) != prompt_seed(2, 1, "a", 0)
    with pytest.raises(ConfigError, match="sampling.top_p"):
        engine(tiny, top_p=0.0)
    with pytest.raises(ConfigError, match="rollout.model_path"):
        make_engine(RolloutConfig(backend="local"))
    with pytest.raises(ConfigError, match="rollout.server_urls"):
        make_engine(RolloutConfig(backend="sglang"))
    eng = engine(tiny)
    with pytest.raises(ValueError, match="seeds must be"):
        eng.generate([[1, 2]], eng.cfg.sampling, seeds=[[1]])
    # prompts may carry their own token ids (the synthetic task tokenizes itself)
    r = eng.rollout([PromptRecord(id="t", prompt="", prompt_ids=[1, 5, 6])])[0]
    assert r.prompt_ids == [1, 5, 6] and len(r.completions) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_matches_cpu_greedy_and_is_seeded(tiny):
    cpu = engine(tiny, n=1, temperature=0.0, max_new_tokens=8, ignore_eos=True)
    gpu = make_engine(RolloutConfig(backend="local", model_path=str(tiny), device="cuda",
                                    sampling=SamplingConfig(n=1, temperature=0.0, max_new_tokens=8, ignore_eos=True)))
    assert as_ids(gpu.rollout(PROMPTS)) == as_ids(cpu.rollout(PROMPTS))
    sampled = make_engine(RolloutConfig(backend="local", model_path=str(tiny), device="cuda", dtype="bfloat16",
                                        sampling=SamplingConfig(n=4, max_new_tokens=8, seed=3)))
    assert as_ids(sampled.rollout(PROMPTS)) == as_ids(sampled.rollout(PROMPTS))
