"""The game task (task.kind game): P_x's properties, determinism by seed, the oracle and the task files."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from megatron_inpo.config import ConfigError
from megatron_inpo.task import game
from megatron_inpo.task.synthetic import TaskConfig, prepare_task


def _prompts(n: int, seed: int = 0, games: int = 8) -> list[str]:
    return game.make_game_prompts(TaskConfig(kind="game", responses=n, games=games, seed=seed))


@pytest.mark.parametrize("n", [3, 4, 5, 6, 8])
def test_preference_matrix_is_a_general_preference(n):
    for prompt in _prompts(n):
        p = game.preference_matrix(prompt)
        assert p.shape == (n, n) and p.dtype == torch.float64
        assert torch.allclose(p + p.T, torch.ones_like(p), atol=1e-15, rtol=0)
        assert torch.equal(p.diagonal(), torch.full((n,), 0.5, dtype=torch.float64))
        assert bool(((p > 0) & (p < 1)).all())


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_every_game_has_an_intransitive_cycle(n):
    for prompt in _prompts(n):
        p = game.preference_matrix(prompt)
        cycles = [(i, j, k) for i, j, k in itertools.permutations(range(n), 3)
                  if p[i, j] > 0.5 and p[j, k] > 0.5 and p[k, i] > 0.5]
        assert cycles, f"{prompt}: no 3-cycle, the game would be transitive"


def test_games_are_deterministic_by_seed():
    assert _prompts(5, seed=3) == _prompts(5, seed=3)
    assert _prompts(5, seed=3) != _prompts(5, seed=4)
    a = [game.preference_matrix(x) for x in _prompts(5, seed=3)]
    b = [game.preference_matrix(x) for x in _prompts(5, seed=3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # P_x is a function of the prompt text alone (the judge sees nothing else); different prompts, different games
    p1, p2 = _prompts(5)[:2]
    assert torch.equal(game.preference_matrix(p1), game.preference_matrix("  " + p1.replace(" ", "  ")))
    assert not torch.equal(game.preference_matrix(p1), game.preference_matrix(p2))


def test_oracle_uses_p_x_and_out_of_set_responses_lose():
    prompt = _prompts(4)[0]
    p = game.preference_matrix(prompt)
    for i, j in itertools.product(range(4), repeat=2):
        assert game.prob_a_beats_b(prompt, f"y{i}", f"y{j}") == pytest.approx(float(p[i, j]), abs=1e-15)
    for bad in ("y4", "y7", "", "y0 y1", "q3"):  # y4 is a word of the vocabulary but outside this game's N = 4
        assert game.prob_a_beats_b(prompt, "y2", bad) == 1.0
        assert game.prob_a_beats_b(prompt, bad, "y2") == 0.0
        assert game.prob_a_beats_b(prompt, bad, "y9") == 0.5


def test_reference_distribution_is_skewed():
    prompt = _prompts(5)[0]
    q = game.reference_distribution(prompt, 0.45)
    assert sum(q) == pytest.approx(1.0)
    assert sorted(q, reverse=True) == pytest.approx([0.45 ** k / sum(0.45 ** j for j in range(5)) for k in range(5)])


def test_validate():
    for bad in ({"responses": 2}, {"responses": 9}, {"games": 0}, {"ref_skew": 0.0}, {"kind": "chess"}):
        with pytest.raises(ConfigError, match="task."):
            TaskConfig(**{"kind": "game", **bad}).validate()


def test_prepare_task_writes_the_game(tmp_path):
    cfg = TaskConfig(kind="game", responses=5, games=4, prompts_per_iteration=12, eval_prompts=8, sft_examples=40,
                     hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, num_layers=1)
    paths = prepare_task(tmp_path / "task", cfg, iterations=2)
    assert paths == prepare_task(tmp_path / "task", cfg, iterations=2)  # idempotent
    evals = [json.loads(line) for line in open(paths["eval_prompts"])]
    assert len(evals) == 8 and {e["prompt"] for e in evals} == set(game.make_game_prompts(cfg))
    sft = [json.loads(line) for line in open(paths["sft"])]
    assert all(len(r["response_ids"]) == 1 and r["response_ids"][0] in game.response_token_ids(5) for r in sft)
    assert all(r["prompt_ids"] == game.prompt_ids_of(r["prompt"]) for r in sft)
    conf = json.loads((tmp_path / "task" / "model_init" / "config.json").read_text())
    assert conf["vocab_size"] == len(game.WORDS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    assert tok.decode([game.word_id("y3")]) == "y3"


def test_game_cpu_recipe():
    from megatron_inpo.config import validate_all
    from megatron_inpo.driver.recipes import get_recipe

    cfg = get_recipe("game_cpu")
    validate_all(cfg)
    assert cfg.iterations >= 6 and cfg.trainer == "megatron" and cfg.task.kind == "game"
    assert cfg.rollout.sampling.max_new_tokens == 1 and cfg.eval.sampling.max_new_tokens == 1
    assert cfg.judge.function == "megatron_inpo.task.game:prob_a_beats_b"
    assert 0 < cfg.algorithm.objective.tau < cfg.algorithm.objective.eta
