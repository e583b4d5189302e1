"""The synthetic task: oracle properties (antisymmetry, intransitivity), deterministic data, tokenizer, model."""
import itertools
import json

import pytest

from megatron_inpo.config import ConfigError
from megatron_inpo.task import TaskConfig, make_prompts, make_sft, prepare_task, prob_a_beats_b, quality, rps
from megatron_inpo.task.synthetic import prompt_ids_of
from megatron_inpo.task.vocab import STYLES, WORDS

RESPONSES = ["rock a b c", "paper a b c", "scissors a b c", "rock a b", "a b c", "paper a b c z", "paper a a b c",
             "rock paper a b c", "scissors d e", ""]


def test_quality_hand_worked():
    p = "a b c"
    assert quality(p, "rock a b c") == 1.0                      # every word once + a style
    assert quality(p, "paper c a") == pytest.approx(2 / 3)       # one word missing
    assert quality(p, "a b c") == pytest.approx(1.0 - 0.5)       # no style word
    assert quality(p, "rock a b c d") == pytest.approx((3 - 1.5) / 3)  # one wrong word
    assert quality(p, "rock a a b c") == pytest.approx((3 - 1.5) / 3)  # a repeat counts as wrong
    assert quality(p, "rock paper a b c") == pytest.approx(0.5)  # extra style word
    with pytest.raises(ValueError, match="no content words"):
        quality("rock", "a")


def test_oracle_is_a_general_preference():
    p = "a b c"
    for a, b in itertools.product(RESPONSES, repeat=2):
        pab, pba = prob_a_beats_b(p, a, b), prob_a_beats_b(p, b, a)
        assert 0.0 < pab < 1.0
        assert pab + pba == pytest.approx(1.0, abs=1e-12)  # antisymmetric: both orders agree
    assert prob_a_beats_b(p, "rock a b", "rock a b") == 0.5
    # Intransitive: with equal quality, paper > rock, scissors > paper and rock > scissors (a cycle no reward fits)
    r, pa, s = "rock a b c", "paper a b c", "scissors a b c"
    assert prob_a_beats_b(p, pa, r) > 0.5 and prob_a_beats_b(p, s, pa) > 0.5 and prob_a_beats_b(p, r, s) > 0.5
    assert [rps(x, y) for x, y in [("paper", "rock"), ("scissors", "paper"), ("rock", "scissors")]] == [1, 1, 1]
    # quality dominates: a complete answer beats a style-advantaged incomplete one
    assert prob_a_beats_b(p, "rock a b c", "paper a") > 0.5


def test_prompts_deterministic_and_disjoint():
    cfg = TaskConfig(seed=3)
    a, b = make_prompts(cfg, "iter1", 50), make_prompts(cfg, "iter1", 50)
    assert a == b
    c = make_prompts(cfg, "iter2", 50)
    assert [x["prompt"] for x in a] != [x["prompt"] for x in c]
    assert len({x["id"] for x in a + c}) == 100
    other_seed = make_prompts(TaskConfig(seed=4), "iter1", 50)
    assert [x["prompt"] for x in a] != [x["prompt"] for x in other_seed]
    for x in a:
        words = x["prompt"].split()
        assert cfg.min_words <= len(words) <= cfg.max_words and len(set(words)) == len(words)
        assert x["prompt_ids"] == prompt_ids_of(x["prompt"])


def test_sft_data_is_mixed_quality():
    rows = make_sft(TaskConfig(sft_examples=1000))
    qs = [quality(r["prompt"], r["response"]) for r in rows]
    assert sum(q == 1.0 for q in qs) > 30           # some perfect answers (the policy can learn them)...
    assert sum(q < 0.5 for q in qs) > 300           # ...and many poor ones: pi_ref is improvable
    styles = [r["response"].split()[0] for r in rows if r["response"].split()[0] in STYLES]
    assert styles.count("rock") > styles.count("paper") > styles.count("scissors")  # skewed, exploitable
    assert all(r["response_ids"][-1] == WORDS.index("<eos>") for r in rows)


def test_prepare_task_files_tokenizer_and_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = TaskConfig(prompts_per_iteration=8, eval_prompts=8, sft_examples=16)
    paths = prepare_task(tmp_path / "task", cfg, iterations=2)
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    row = json.loads(open(paths["sft"]).readline())
    assert tok.decode(row["response_ids"], skip_special_tokens=True) == row["response"]
    assert tok(row["response"])["input_ids"] == row["response_ids"][:-1]
    model = AutoModelForCausalLM.from_pretrained(paths["model_init"])
    assert model.config.vocab_size == len(WORDS) and model.config.num_key_value_heads == 2
    assert len(open(paths["prompts_iter2"]).readlines()) == 8
    # idempotent with the same config, refused with another
    assert prepare_task(tmp_path / "task", cfg, iterations=2) == paths
    with pytest.raises(ConfigError, match="different task config"):
        prepare_task(tmp_path / "task", TaskConfig(prompts_per_iteration=9, eval_prompts=8, sft_examples=16), 2)


def test_task_config_validation():
    with pytest.raises(ConfigError, match="task.style_probs"):
        TaskConfig(style_probs=[0.5, 0.5]).validate()
    with pytest.raises(ConfigError, match="task.min_words"):
        TaskConfig(min_words=5, max_words=3).validate()
