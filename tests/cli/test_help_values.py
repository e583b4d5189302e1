"""`--help` shows the values a field takes (issue 20: `model.source`'s `hf` never appeared), and the chat template
has one default in every command: on, used when the tokenizer has one."""
import re

import pytest

from megatron_inpo.cli import main as top_main


def _help(capsys, command):
    with pytest.raises(SystemExit) as e:
        top_main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _line(text, field):
    lines = [x for x in text.splitlines() if re.match(rf"^\s+{re.escape(field)}\s", x)]
    assert len(lines) == 1, (field, lines)
    return lines[0]


def test_run_help_lists_allowed_values(capsys):
    out = _help(capsys, "run")
    assert "values: synthetic, hf" in _line(out, "model.source")
    assert "values: bfloat16, float32, float16" in _line(out, "model.export_dtype")
    assert "values: pairwise, reward, programmatic" in _line(out, "judge.kind")  # a Literal field
    assert "values: rlhflow_pm, chat" in _line(out, "judge.preset")
    assert "values: local, sglang" in _line(out, "rollout.backend")
    assert "values: auto, tournament, best_worst, all_pairs" in _line(out, "algorithm.selection")
    assert "values:" not in _line(out, "model.hf_path")  # free fields show none
    assert "values: '', rlhflow, chat_template, plain" in _line(out, "judge.context_format")


def test_rollout_and_evaluate_help_list_values(capsys):
    assert "values: rlhflow_pm, chat" in _line(_help(capsys, "rollout"), "judge.preset")
    assert "values: local, sglang" in _line(_help(capsys, "evaluate"), "backend")


def test_chat_template_has_one_default_everywhere():
    import argparse

    from megatron_inpo.cli import evaluate, rollout
    from megatron_inpo.driver.recipes import RECIPES

    assert rollout.RolloutStageConfig().rollout.chat_template is True
    assert evaluate._base(argparse.Namespace(policy="p", config=None)).chat_template is True
    for name, recipe in RECIPES.items():
        assert recipe().rollout.chat_template is True, name
