"""`megatron-inpo evaluate`: win rate in both orders with its standard error, length stats, AlpacaEval export."""
import json
import math

import pytest

from tests.helpers.driver import run_cli
from megatron_inpo.evaluate import alpaca_eval_records, length_stats, win_rate
from megatron_inpo.judge import ProgrammaticJudge
from megatron_inpo.task import prob_a_beats_b


def _gens(outputs):
    return [{"id": str(i), "prompt": "a b c", "outputs": [o], "output_ids": [[1] * len(o.split())]}
            for i, o in enumerate(outputs)]


def test_win_rate_both_orders_cancels_position_bias():
    ga, gb = _gens(["rock a b c"] * 4), _gens(["rock a"] * 4)
    biased = ProgrammaticJudge(pref_fn=lambda p, a, b: 0.9)  # always prefers the first position
    assert win_rate(biased, ga, gb, both_orders=False)["win_rate"] == pytest.approx(0.9)
    assert win_rate(biased, ga, gb, both_orders=True)["win_rate"] == pytest.approx(0.5)
    oracle = ProgrammaticJudge(pref_fn=prob_a_beats_b)
    r = win_rate(oracle, ga, gb)
    p = prob_a_beats_b("a b c", "rock a b c", "rock a")
    assert r["win_rate"] == pytest.approx(p) and r["n"] == 4 and r["wins"] == 4
    assert r["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 4))
    with pytest.raises(ValueError, match="different prompts"):
        win_rate(oracle, ga, gb[:3])


def test_length_stats_and_alpaca_format():
    g = _gens(["a", "a b", "a b c", "a b c d"])
    s = length_stats(g)
    assert s["mean_tokens"] == 2.5 and s["max_tokens"] == 4 and s["median_tokens"] == 2.5
    rec = alpaca_eval_records(g, "pi_2")
    assert rec[0] == {"instruction": "a b c", "output": "a", "generator": "pi_2", "dataset": "megatron-inpo"}


@pytest.mark.slow
def test_evaluate_cli_on_tiny_policies(tmp_path):
    from megatron_inpo.task import TaskConfig
    from megatron_inpo.task.synthetic import init_model, prepare_task

    paths = prepare_task(tmp_path / "task", TaskConfig(prompts_per_iteration=4, eval_prompts=16, sft_examples=8), 1)
    other = tmp_path / "other"
    init_model(TaskConfig(seed=5), other, paths["tokenizer"])
    common = ["--prompts", paths["eval_prompts"], "--judge-function", "megatron_inpo.task.oracle:prob_a_beats_b",
              "--max-new-tokens", "8", "--samples", "2"]
    r = run_cli(["evaluate", "--policy", paths["model_init"], "--baseline", paths["model_init"],
                 "--out", str(tmp_path / "self"), *common])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "self" / "result.json").read_text())
    assert res["win_rate"] == 0.5 and res["n"] == 32  # same weights, same seeds: identical responses
    r = run_cli(["evaluate", "--policy", str(other), "--baseline", paths["model_init"],
                 "--out", str(tmp_path / "ab"), *common])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "ab" / "result.json").read_text())
    assert 0 < res["win_rate"] < 1 and res["stderr"] > 0 and res["policy_length"]["max_tokens"] <= 8
    alp = json.loads((tmp_path / "ab" / "policy.alpaca_eval.json").read_text())
    assert len(alp) == 16 and set(alp[0]) == {"instruction", "output", "generator", "dataset"}
    r = run_cli(["evaluate", "--policy", str(tmp_path / "nope"), "--baseline", paths["model_init"],
                 "--out", str(tmp_path / "x"), *common])
    assert r.returncode == 2 and "--policy" in r.stderr and "no config.json" in r.stderr
