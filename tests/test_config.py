"""Config helpers: dict/YAML round trip, overrides, and errors that name the field."""
from dataclasses import dataclass, field

import pytest
import yaml

from megatron_inpo.config import ConfigError, apply_overrides, from_dict, save_yaml, to_dict, validate_all
from megatron_inpo.objectives import ObjectiveConfig


@dataclass
class Inner:
    k: int = 8
    """samples per prompt"""
    name: str | None = None
    """optional name"""


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    """nested section"""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """the loss"""
    lr: float = 1e-3
    """learning rate"""
    flags: list[int] = field(default_factory=list)
    """a list"""


def test_round_trip_yaml(tmp_path):
    cfg = Outer(inner=Inner(k=4, name="x"), lr=0.5, flags=[1, 2])
    save_yaml(cfg, tmp_path / "c.yaml")
    back = from_dict(Outer, yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert back == cfg and to_dict(back)["inner"]["k"] == 4


def test_overrides_parse_types_and_name_errors():
    cfg = apply_overrides(Outer(), ["inner.k=16", "--objective.name=dpo", "lr=2e-5", "flags=[3,4]"])
    assert cfg.inner.k == 16 and cfg.objective.name == "dpo" and cfg.lr == 2e-5 and cfg.flags == [3, 4]
    with pytest.raises(ConfigError, match="no config field 'inner.kk'"):
        apply_overrides(Outer(), ["inner.kk=1"])
    with pytest.raises(ConfigError, match="no config section 'nope'"):
        apply_overrides(Outer(), ["nope.x=1"])
    with pytest.raises(ConfigError, match="inner.k: expected int, got 'many'"):
        apply_overrides(Outer(), ["inner.k=many"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(Outer(), ["lr"])


def test_unknown_keys_and_validation_are_named():
    with pytest.raises(ConfigError, match=r"inner: unknown field\(s\) \['z'\]"):
        from_dict(Outer, {"inner": {"z": 1}})
    cfg = apply_overrides(Outer(), ["objective.tau=0.01", "objective.eta=0.005"])
    with pytest.raises(ConfigError, match="objective.tau"):
        validate_all(cfg)


def test_yaml_on_top_and_command_line_overrides(tmp_path):
    from megatron_inpo.config import merge_yaml, parse_override_args

    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  k: 3\nlr: 0.25\n")
    cfg = merge_yaml(Outer(inner=Inner(k=1, name="kept")), f)
    assert (cfg.inner.k, cfg.inner.name, cfg.lr) == (3, "kept", 0.25)  # nested sections merge, not replace
    f.write_text("inner:\n  kk: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: inner: unknown field\(s\) \[.kk.\]"):
        merge_yaml(Outer(), f)
    for text, msg in (("- 1\n", "expected a mapping"), ("a: [1\n", "not valid YAML")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            merge_yaml(Outer(), f)
    with pytest.raises(ConfigError, match="No such file"):
        merge_yaml(Outer(), tmp_path / "missing.yaml")
    assert parse_override_args(["--micro-batch-size", "2", "--data=my-file.jsonl", "a.b=c-d", "--x.y", "-1"]) == [
        "micro_batch_size=2", "data=my-file.jsonl", "a.b=c-d", "x.y=-1"]
    with pytest.raises(ConfigError, match="flag --lr needs a value"):
        parse_override_args(["--lr"])
    with pytest.raises(ConfigError, match="unexpected argument 'stray'"):
        parse_override_args(["stray"])


BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n" for i in range(9))


@pytest.mark.parametrize("where", ["top", "prompts"])
def test_yaml_alias_bomb_is_refused_at_once_naming_the_file(tmp_path, capsys, where):
    """A "billion laughs" document (9^9 nodes once its aliases are expanded): refused by the bounded loader before
    anything is built, as top-level keys and inside `prompts:` alike (the latter ran for minutes and grew to 1 GB)."""
    import time

    from megatron_inpo.cli import main

    # inside prompts: one list whose items hold the anchors, `prompts: [&l0 [...], &l1 [*l0, ...], ...]`
    text = BOMB if where == "top" else "prompts:\n" + "".join(f"  - {line.split(': ', 1)[1]}"
                                                             for line in BOMB.splitlines(True))
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(text)
    t0 = time.monotonic()
    assert main(["run", "--config", str(cfg), "--print-config"]) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(cfg) in err and "alias" in err, err


def test_yaml_aliases_within_bounds_still_load(tmp_path):
    from megatron_inpo.config import load_yaml

    assert load_yaml("a: &x {lr: 0.1}\nb: *x\n") == {"a": {"lr": 0.1}, "b": {"lr": 0.1}}


@pytest.mark.parametrize("override, field", [("seed=1234567890123456789012345678901234567890123", "seed"),
                                             ("rollout.sampling.seed=-1", "rollout.sampling.seed"),
                                             ("train.save_interval=99999999999999999999", "train.save_interval")])
def test_integers_beyond_64_bits_and_negative_seeds_are_refused_naming_the_field(override, field, capsys):
    """`--seed=` a 43-digit number was accepted by `run` and crashed `train` (Overflow when unpacking long long)."""
    from megatron_inpo.cli import main

    assert main(["run", "--recipe", "tiny_cpu", f"--{override}", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{field}: " in err, err


def test_a_renamed_field_is_refused_naming_its_new_name(tmp_path, capsys):
    """`engine` (the run's trainer switch, renamed `trainer`: one meaning per name) in a YAML config or an override:
    one line naming the new field, exit 2."""
    from megatron_inpo.cli import main

    cfg = tmp_path / "old.yaml"
    cfg.write_text("engine: torch\niterations: 1\n")
    assert main(["run", "--config", str(cfg), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "engine: renamed 'trainer' (write trainer: 'torch')" in err, err
    assert main(["run", "--recipe", "tiny_cpu", "--engine=torch", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "engine was renamed 'trainer'" in err, err
    assert main(["run", "--recipe", "tiny_cpu", "--trainer=torch", "--print-config"]) == 0
