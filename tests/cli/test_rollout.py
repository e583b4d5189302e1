"""`megatron-inpo rollout` end to end on CPU: tiny policy in-process, tiny pairwise PM, resumable output."""
import json

import pytest
import yaml

from megatron_inpo.cli import main as top_main
from megatron_inpo.data.preferences import read_preferences
from tests.helpers.rollout import make_tiny_llama, one_torch_thread

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # tiny models: see one_torch_thread


def test_cli_local_policy_local_pm(tmp_path, capsys):
    pol, pm = tmp_path / "pol", tmp_path / "pm"
    make_tiny_llama(pol, seed=0)
    make_tiny_llama(pm, seed=9)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"x{i}", "prompt": f"question {i}?"}) + "\n" for i in range(5)))
    out = tmp_path / "prefs.jsonl"
    argv = ["rollout", "--prompts", str(prompts), "--out", str(out), "--no-progress",
            f"rollout.model_path={pol}", "rollout.sampling.n=4", "rollout.sampling.max_new_tokens=6",
            "judge.kind=pairwise", f"judge.model_path={pm}", "batch_size=2", "iteration=2"]
    assert top_main(argv) == 0
    pairs = read_preferences(out)
    stats = json.loads((tmp_path / "prefs.jsonl.stats.json").read_text())
    assert stats["pairs"] == len(pairs) and stats["pairs"] + stats["dropped"] == 5
    assert stats["comparisons"] == 5 * 5 and stats["engine"]["tokens"] > 0
    for p in pairs:
        assert p.iteration == 2 and p.judge.startswith("pairwise-pm:") and p.chosen_prob > 0.5
        assert p.model_version == str(pol) and len(p.extra["matches"]) == 5
    assert "tokens/s" in capsys.readouterr().out
    assert (tmp_path / "prefs.jsonl.config.yaml").exists()
    before = out.read_bytes()
    assert top_main(argv) == 0 and out.read_bytes() == before  # resumed: everything skipped
    assert json.loads((tmp_path / "prefs.jsonl.stats.json").read_text())["skipped"] == 5


def test_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a"}\n')
    assert top_main(["rollout", "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl"),
                     "rollout.model_path=m", "judge.kind=programmatic", "judge.function=m:f"]) == 2
    assert "bad.jsonl:2: missing field 'prompt'" in capsys.readouterr().err
    assert top_main(["rollout", "--prompts", str(bad), "--out", "o", "rollout.sampling.n=6",
                     "rollout.model_path=m", "method=tournament", "judge.kind=programmatic",
                     "judge.function=m:f"]) == 2
    assert "rollout.sampling.n: the tournament needs K a power of two" in capsys.readouterr().err
    assert top_main(["rollout", "--prompts", "p", "--out", "o", "rollout.nope=1"]) == 2
    assert "no config field 'rollout.nope'" in capsys.readouterr().err


def _load(path, overrides, recipe=None):
    from megatron_inpo.cli.loader import resolve_config
    from megatron_inpo.cli.rollout import command

    return resolve_config(command(), recipe, path, overrides)


def test_recipes_and_yaml_on_top(tmp_path):
    """--recipe is a run recipe (driver/recipes.py): the rollout stage takes its rollout, judge and selection."""
    cfg = _load(None, ["rollout.model_path=p", "rollout.server_urls=http://a:1,http://b:2",
                       "judge.model_path=pm", "judge.server_urls=[http://c:3]"], "llama3_8b_h100")
    assert (cfg.rollout.backend, cfg.rollout.sampling.n, cfg.rollout.sampling.temperature) == ("sglang", 8, 1.0)
    assert cfg.rollout.server_urls == ["http://a:1", "http://b:2"] and cfg.judge.server_urls == ["http://c:3"]
    assert cfg.method == "tournament" and cfg.judge.kind == "pairwise" and cfg.judge.backend == "sglang"
    cfg = _load(None, ["rollout.model_path=p"], "llama3_8b_h100_rm")  # the reward-model variant
    assert (cfg.judge.kind, cfg.method, cfg.rollout.sampling.n) == ("reward", "best_worst", 8)
    y = tmp_path / "stage.yaml"
    y.write_text("rollout:\n  model_path: p\n  sampling:\n    seed: null\n    stop_token_ids: [7, 9]\n"
                 "judge:\n  function: 'm:f'\niteration: 3\n")
    cfg = _load(str(y), ["--rollout.sampling.n=2"], "tiny_cpu")
    assert cfg.rollout.sampling.seed is None and cfg.rollout.sampling.stop_token_ids == [7, 9]
    assert (cfg.iteration, cfg.rollout.sampling.n, cfg.rollout.sampling.max_new_tokens) == (3, 2, 16)
    assert cfg.judge.kind == "programmatic" and cfg.judge.function == "m:f" and cfg.method == "tournament"
    from megatron_inpo.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.model_path: backend 'local' needs"):
        _load(None, [], "tiny_cpu")  # a run's model_path 'auto' is the driver's export: the stage needs a path
    with pytest.raises(ConfigError, match="unknown recipe 'inpo_paper'"):
        _load(None, [], "inpo_paper")


def test_print_config(tmp_path, capsys):
    argv = ["rollout", "--prompts", "p", "--out", "o", "--recipe", "tiny_cpu", "--rollout.model-path", "m",
            "--print-config"]
    assert top_main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["rollout"]["model_path"] == "m" and printed["method"] == "tournament"
    f = tmp_path / "stage.yaml"
    f.write_text(yaml.safe_dump(printed))
    assert _load(str(f), []) == _load(None, ["rollout.model_path=m"], "tiny_cpu")
