"""Bradley-Terry reward judges: in-process LlamaForSequenceClassification and SGLang /classify (the fake server
scores with the same tiny model), best/worst-of-K, and errors."""
import pytest
import torch

from megatron_inpo.data.prompts import PromptRecord
from megatron_inpo.judge import JudgeConfig, make_judge, select_pairs
from megatron_inpo.rollout.engine import Completion, Rollout
from megatron_inpo.serving.pool import SGLangError, SGLangPool
from tests.helpers.rollout import FakeSGLang, make_tiny_llama, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # tiny models: see one_torch_thread

PAIRS = [("What is 2+2?", "4"), ("What is 2+2?", "five, maybe"), ("Say hi", "hi"), ("Say hi", "")]


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    make_tiny_llama(d, kind="reward", seed=5)
    return d


@pytest.fixture(scope="module")
def local_rm(rm):
    return make_judge(JudgeConfig(kind="reward", model_path=str(rm), batch_size=3))


def test_local_rm_matches_unpadded_forward(local_rm):
    j = local_rm
    assert j.kind == "reward"
    got = j.score(PAIRS)
    for (p, r), g in zip(PAIRS, got):
        ids = j.render(p, r)
        with torch.no_grad():  # the model's own pooling on one unpadded sequence
            want = float(j.model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert g == pytest.approx(want, abs=1e-5)
    assert len(set(round(g, 5) for g in got)) == 4
    text = j.tokenizer.decode(j.render("Q", "R"))
    assert text == "<s>user: Q\n<s>assistant: R\n"


def test_sglang_rm_agrees_with_local(rm, local_rm):
    def reward(ids):
        with torch.no_grad():
            return float(local_rm.model(input_ids=torch.tensor([ids])).logits[0, 0])

    with FakeSGLang(is_embedding=True, reward=reward) as srv:
        j = make_judge(JudgeConfig(kind="reward", backend="sglang", model_path=str(rm), server_urls=[srv.url],
                                   batch_size=3, backoff_s=0.01))
        assert j.score(PAIRS) == pytest.approx(local_rm.score(PAIRS), abs=1e-5)
        assert [p for p, _ in srv.requests] == ["/classify", "/classify"]
        assert all(isinstance(b["input_ids"][0], list) for _, b in srv.requests)
        # single-input reply is a dict, not a list
        assert SGLangPool([srv.url]).request("/classify", {"input_ids": [1, 2]})["embedding"][0] == reward([1, 2])
        srv.inject("/classify", "malformed", count=1)
        assert j.score(PAIRS) == pytest.approx(local_rm.score(PAIRS), abs=1e-5)


def test_best_worst_of_k_with_rm(local_rm):
    texts = ["4", "five, maybe", "four", "22", "IV", "?", "4!", "no"]
    r = Rollout(PromptRecord("p", "What is 2+2?"), [1, 2],
                [Completion(t, [10 + i, 2], "stop") for i, t in enumerate(texts)])
    (sel,) = select_pairs([r], local_rm)
    rewards = local_rm.score([("What is 2+2?", t) for t in texts])
    assert sel.chosen == rewards.index(max(rewards)) and sel.rejected == rewards.index(min(rewards))
    assert sel.extra["rewards"] == pytest.approx(rewards)


def test_generation_server_rejects_classify(rm):
    with FakeSGLang() as srv:
        j = make_judge(JudgeConfig(kind="reward", backend="sglang", model_path=str(rm), server_urls=[srv.url]))
        with pytest.raises(SGLangError, match=rf"{srv.url}/classify: HTTP 400.*embedding model"):
            j.score(PAIRS)
