"""Pairwise preference judge: P(A>B) from next-token logits of "A"/"B", both orders, in-process and via SGLang
(the fake server answers with the SAME tiny model, so both paths must agree)."""
import math

import pytest
import torch

from megatron_inpo.config import ConfigError
from megatron_inpo.judge import Comparison, JudgeConfig, make_judge
from megatron_inpo.judge.pairwise import PairwiseJudge, SGLangPairwiseBackend
from megatron_inpo.serving.pool import SGLangError, SGLangPool
from tests.helpers.rollout import CHARS, FakeSGLang, make_tiny_llama, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # tiny models: see one_torch_thread

ITEMS = [Comparison("What is 2+2?", "4", "five"), Comparison("Say hi", "hi there", "go away"),
         Comparison("Name a colour", "blue", "blue")]


@pytest.fixture(scope="module")
def pm(tmp_path_factory):
    d = tmp_path_factory.mktemp("pm")
    make_tiny_llama(d, seed=3)
    return d


@pytest.fixture(scope="module")
def local_judge(pm):
    return make_judge(JudgeConfig(kind="pairwise", backend="local", model_path=str(pm), batch_size=4))


def reference_p(judge, prompt, a, b):
    """Unbatched, unpadded forward: softmax over the logits of 'A' and 'B', averaged over both orders."""
    def first_wins(x, y):
        ids = judge.render(prompt, x, y)
        with torch.no_grad():
            logits = judge.backend.model(input_ids=torch.tensor([ids])).logits[0, -1]
        pa, pb = torch.softmax(logits[[judge.id_a, judge.id_b]].double(), -1).tolist()
        return pa
    return 0.5 * (first_wins(a, b) + (1 - first_wins(b, a)))


def test_local_pm_matches_reference_and_is_order_symmetric(local_judge):
    j = local_judge
    probs = j.compare(ITEMS)
    for c, p in zip(ITEMS, probs):
        assert p == pytest.approx(reference_p(j, c.prompt, c.a, c.b), abs=1e-5)
    swapped = j.compare([Comparison(c.prompt, c.b, c.a) for c in ITEMS])
    for p, q in zip(probs, swapped):
        assert p + q == pytest.approx(1.0, abs=1e-6)
    assert probs[2] == pytest.approx(0.5, abs=1e-6)  # identical responses: exactly a coin flip
    assert len(set(round(p, 6) for p in probs[:2])) == 2 and all(0 < p < 1 for p in probs)
    # the judge input is the RLHFlow instruction inside the chat template, answer position last
    # RLHFlow layout: plain context, no generation prompt; this template writes <s> at every turn, so it stays
    text = j.tokenizer.decode(j.render("Q?", "x", "y"))
    assert text == "<s>user: [CONTEXT] \n\n\n<turn> user\n Q?\n\n\n [RESPONSE A] x [RESPONSE B] y \n\n"
    j2 = make_judge(JudgeConfig(kind="pairwise", model_path=str(j.cfg.model_path), context_format="chat_template",
                                add_generation_prompt=True, strip_bos=False))
    assert j2.tokenizer.decode(j2.render("Q?", "x", "y")) == (
        "<s>user: [CONTEXT] <s>user: Q?\n [RESPONSE A] x [RESPONSE B] y \n\nassistant:")
    assert j.id_a == 3 + CHARS.index("A") and j.id_b == 3 + CHARS.index("B")


def test_one_order_only(pm):
    j = make_judge(JudgeConfig(kind="pairwise", model_path=str(pm), both_orders=False))
    p = j.compare(ITEMS[:1])[0]
    ids = j.render(ITEMS[0].prompt, ITEMS[0].a, ITEMS[0].b)
    with torch.no_grad():
        logits = j.backend.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert p == pytest.approx(float(torch.sigmoid(logits[j.id_a] - logits[j.id_b])), abs=1e-5)
    assert j.forward_passes == 1


def test_sglang_pm_agrees_with_local(pm, local_judge):
    model = local_judge.backend.model

    def pm_logits(ids):
        with torch.no_grad():
            lg = model(input_ids=torch.tensor([ids])).logits[0, -1]
        return float(lg[local_judge.id_a]), float(lg[local_judge.id_b])

    with FakeSGLang(pm_logits=pm_logits) as srv:
        j = make_judge(JudgeConfig(kind="pairwise", backend="sglang", model_path=str(pm), server_urls=[srv.url],
                                   batch_size=4, backoff_s=0.01))
        probs = j.compare(ITEMS)
        assert probs == pytest.approx(local_judge.compare(ITEMS), abs=1e-5)
        bodies = [b for p, b in srv.requests if p == "/generate"]
        assert len(bodies) == 2  # 3 comparisons x 2 orders = 6 inputs, batch_size 4
        b = bodies[0]
        assert b["token_ids_logprob"] == [j.id_a, j.id_b] and b["return_logprob"] is True
        assert b["sampling_params"] == {"max_new_tokens": 1, "temperature": 0.0} and b["logprob_start_len"] == -1
        # a malformed reply is retried; nothing lost
        srv.inject("/generate", "short", count=1)
        assert j.compare(ITEMS) == pytest.approx(probs, abs=1e-9)


def test_sglang_pm_down_is_a_clear_error(pm):
    from tests.helpers.rollout import free_url
    url = free_url()
    j = make_judge(JudgeConfig(kind="pairwise", backend="sglang", model_path=str(pm), server_urls=[url],
                               max_retries=1, backoff_s=0.01))
    with pytest.raises(SGLangError, match=url):
        j.compare(ITEMS)


def test_position_bias_is_cancelled(pm):
    # a PM that always prefers the first position by 0.8 has P = 0.5 on every pair after averaging both orders
    class Biased:
        def token_logprobs(self, inputs, token_ids):
            return [[math.log(0.8), math.log(0.2)] for _ in inputs]
    from transformers import AutoTokenizer
    j = PairwiseJudge(Biased(), AutoTokenizer.from_pretrained(str(pm)))
    assert j.compare(ITEMS) == pytest.approx([0.5] * 3)
    j1 = PairwiseJudge(Biased(), j.tokenizer, JudgeConfig(both_orders=False))
    assert j1.compare(ITEMS) == pytest.approx([0.8] * 3)


def test_config_errors(pm):
    with pytest.raises(ConfigError, match="judge.token_a: 'AB' is 2 tokens"):
        make_judge(JudgeConfig(kind="pairwise", model_path=str(pm), token_a="AB"))
    with pytest.raises(ConfigError, match="judge.template: missing placeholder"):
        make_judge(JudgeConfig(kind="pairwise", model_path=str(pm), template="{context} {response_a}"))
    with pytest.raises(ConfigError, match="judge.server_urls"):
        make_judge(JudgeConfig(kind="pairwise", backend="sglang", model_path=str(pm)))
    with pytest.raises(ConfigError, match="judge.function"):
        make_judge(JudgeConfig(kind="programmatic", function="no_colon"))
    with pytest.raises(ConfigError, match="cannot load"):
        make_judge(JudgeConfig(kind="programmatic", function="math:nope"))
    assert make_judge(JudgeConfig(kind="programmatic",
                                  function="tests.helpers.rollout:decode_chars")).kind == "pairwise"
    j = make_judge(JudgeConfig(kind="programmatic", function="tests.helpers.rollout:first_token_pref",
                               function_inputs="ids"))
    assert j.compare([Comparison("p", "a", "b", [0], [5], [3]), Comparison("p", "a", "b", [0], [3], [5])]) == [1, 0]


def test_pool_map_keeps_order():
    with FakeSGLang(pm_logits=lambda ids: (float(len(ids)), 0.0)) as srv:
        be = SGLangPairwiseBackend(SGLangPool([srv.url], concurrency=4), batch_size=1)
        inputs = [[1] * n for n in range(1, 9)]
        got = be.token_logprobs(inputs, [3 + CHARS.index("A"), 3 + CHARS.index("B")])
        diffs = [a - b for a, b in got]
        assert diffs == pytest.approx([float(n) for n in range(1, 9)])
