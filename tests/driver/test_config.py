"""RunConfig, recipes and the manifest: validation errors name the field; resume refuses a changed config."""
import json

import pytest
import yaml

from megatron_inpo.config import ConfigError, to_dict, validate_all
from megatron_inpo.cli.loader import parse_command_line
from megatron_inpo.cli.run import command, main, resolve_config
from megatron_inpo.driver.manifest import Manifest, config_diff
from megatron_inpo.driver.recipes import RECIPES, get_recipe


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_validate(name):
    validate_all(get_recipe(name))


@pytest.mark.parametrize("name", ["llama3_8b_h100", "llama3_70b_h100", "llama3_8b_h100_rm"])
def test_large_recipes_use_the_papers_hyperparameters(name):
    c = get_recipe(name)
    o = c.algorithm.objective
    assert (o.name, o.eta, c.iterations, c.rollout.sampling.n) == ("inpo", 0.005, 3, 8)
    assert o.tau == pytest.approx(0.005 / 3)
    assert (c.train.lr, c.train.lr_decay_style, c.train.warmup_ratio, c.train.global_batch_size) == \
        (5e-7, "cosine", 0.03, 128)
    assert c.rollout.sampling.temperature == 1.0 and c.judge.kind in ("pairwise", "reward")
    assert c.trainer == "megatron" and c.rollout.backend == "sglang"


def test_70b_layout():
    c = get_recipe("llama3_70b_h100")
    p = c.megatron.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, c.launch.world_size) == (8, 4, 32)
    assert "rdzv" in c.launch.launcher and p.sequence_parallel and p.use_distributed_optimizer
    assert c.megatron.model.recompute_activations and c.megatron.model.precision == "bf16"


@pytest.mark.parametrize("override,field", [
    ("train.lr=0", "train.lr"),
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("train.global_batch_size=30", "train.global_batch_size"),
    ("algorithm.objective.tau=0.2", "objective.tau"),            # tau >= eta
    ("algorithm.objective.name=ppo", "objective.name"),
    ("rollout.sampling.n=6", "rollout.sampling.n"),               # tournament needs a power of two
    ("iterations=0", "iterations"),
    ("trainer=jax", "trainer"),
    ("megatron.parallel.tensor_model_parallel_size=3", "megatron.parallel"),   # TP x PP does not divide the world
    ("launch.nnodes=2", "launch.launcher"),                                   # several nodes need a rendezvous
    ("eval.sampling.seed=null", "eval.sampling.seed"),
    ("model.source=hf", "model.hf_path"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve_config("tiny_cpu", None, [override])


def test_sppo_needs_all_pairs():
    with pytest.raises(ConfigError, match="algorithm.selection"):
        resolve_config("tiny_cpu", None, ["algorithm.objective.name=sppo", "algorithm.selection=tournament"])
    cfg = resolve_config("tiny_cpu", None, ["algorithm.objective.name=sppo"])
    assert cfg.algorithm.resolved_selection("pairwise") == "all_pairs"


def test_override_syntaxes_and_yaml(tmp_path):
    args, ov = parse_command_line(command(), ["--recipe", "tiny_cpu", "--train.lr=0.5", "--seed", "7",
                                              "iterations=2", "--no-progress"])
    assert args.recipe == "tiny_cpu" and args.no_progress and ov == ["train.lr=0.5", "seed=7", "iterations=2"]
    cfg = resolve_config(args.recipe, None, ov)
    assert (cfg.train.lr, cfg.seed, cfg.iterations) == (0.5, 7, 2)
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"iterations": 1, "algorithm": {"objective": {"name": "dpo"}}}))
    cfg = resolve_config("tiny_cpu", str(f), ["seed=9"])
    assert (cfg.iterations, cfg.algorithm.objective.name, cfg.seed, cfg.train.lr) == (1, "dpo", 9, 1e-3)
    f.write_text(yaml.safe_dump({"itrations": 1}))
    with pytest.raises(ConfigError, match="itrations"):
        resolve_config("tiny_cpu", str(f), [])
    with pytest.raises(ConfigError, match="not found|No such file"):
        resolve_config("tiny_cpu", str(tmp_path / "missing.yaml"), [])
    with pytest.raises(ConfigError, match="unknown recipe"):
        resolve_config("tiny_gpu", None, [])


def test_print_config_round_trips(tmp_path, capsys):
    assert main(["--recipe", "llama3_70b_h100", "--print-config"]) == 0
    text = capsys.readouterr().out
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert to_dict(resolve_config(None, str(f), [])) == to_dict(get_recipe("llama3_70b_h100"))


def test_rm_recipe_judges_with_a_reward_model():
    c = get_recipe("llama3_8b_h100_rm")
    assert (c.judge.kind, c.algorithm.selection, c.algorithm.resolved_selection(c.judge.kind)) == \
        ("reward", "best_worst", "best_worst")
    base = to_dict(get_recipe("llama3_8b_h100"))
    rm = to_dict(c)
    assert {k for k in base if base[k] != rm[k]} == {"run_dir", "judge", "algorithm"}


def test_config_errors_exit_2_and_help_lists_the_fields(capsys):
    assert main(["--recipe", "tiny_cpu", "--train.lr=-1", "--print-config"]) == 2
    assert "megatron-inpo run: config error: train.lr" in capsys.readouterr().err
    assert main(["--recipe", "nope", "--print-config"]) == 2
    assert "megatron-inpo run: config error: --recipe: unknown recipe 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--recipe" in out and "--print-config" in out and "llama3_8b_h100_rm" in out
    assert "train.lr" in out and "rollout.sampling.n" in out and "algorithm.objective.eta" in out
    assert "T, the number of INPO iterations (paper: 3)." in out  # the field's docstring, first line


def test_manifest_records_and_resume_refuses_changed_config(tmp_path):
    cfg = get_recipe("tiny_cpu")
    m = Manifest.open(tmp_path, cfg)
    assert not m.done("sft")
    assert m.start("sft") == 1 and m.start("sft") == 2
    m.finish("sft", {"policy": "x"}, 1.5)
    with pytest.raises(RuntimeError, match="recorded twice"):
        m.finish("sft", {}, 1.0)
    m2 = Manifest.open(tmp_path, cfg)  # same config: reopened with the records
    assert m2.done("sft") and m2.outputs("sft") == {"policy": "x"} and m2.data["stages"]["sft"]["attempts"] == 2
    changed = get_recipe("tiny_cpu")
    changed.train.lr = 5e-4
    changed.algorithm.objective.name = "dpo"
    with pytest.raises(ConfigError) as e:
        Manifest.open(tmp_path, changed)
    assert "train.lr: saved 0.001, now 0.0005" in str(e.value)
    assert "algorithm.objective.name: saved 'inpo', now 'dpo'" in str(e.value)
    ok = get_recipe("tiny_cpu")
    ok.stage_timeout_s = 100.0  # does not change results: allowed
    Manifest.open(tmp_path, ok)


def test_corrupt_manifest_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="manifest.json: corrupt"):
        Manifest(tmp_path)


def test_config_diff_lists_added_and_removed():
    assert config_diff({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == ["a.c: saved '<absent>', now 2"]
