"""Theorem 4's eta schedule (algorithm.eta_schedule): eta_t = tau (t + 2) / 2 for t = 1..T, in float64; only for
INPO with tau > 0; part of the run's identity; each iteration's train stage gets its eta (the Megatron stage YAML
and the torch stage's objective), and the manifest, results rows, table and tensorboard record it."""
import dataclasses
import json
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from megatron_inpo.config import ConfigError, apply_overrides, validate_all
from megatron_inpo.driver.config import AlgorithmConfig
from megatron_inpo.driver.manifest import Manifest
from megatron_inpo.driver.recipes import get_recipe
from megatron_inpo.objectives import ObjectiveConfig
from tests.helpers.driver import tiny_overrides


def test_theorem4_values_float64():
    tau = 0.005 / 3
    alg = AlgorithmConfig(objective=ObjectiveConfig("inpo", eta=0.005, tau=tau), eta_schedule="theorem4")
    for t in range(1, 11):
        want = float(Fraction(tau) * (t + 2) / 2)  # exact rational arithmetic on tau's float64 value, rounded once
        assert alg.eta(t) == pytest.approx(want, rel=1e-15, abs=0)
        assert tau / alg.eta(t) == pytest.approx(2 / (t + 2), rel=1e-14)  # OMD's weight on pi_ref: tau/eta_t
    assert [alg.eta(t) / tau for t in (1, 2, 3)] == pytest.approx([1.5, 2.0, 2.5], rel=1e-15)
    with pytest.raises(ValueError, match="counts from 1"):
        alg.eta(0)


def test_constant_is_the_default_and_objective_at_composes():
    alg = AlgorithmConfig(objective=ObjectiveConfig("inpo", eta=0.1, tau=0.02, beta=0.3))
    assert alg.eta_schedule == "constant" and [alg.eta(t) for t in (1, 2, 5)] == [0.1, 0.1, 0.1]
    alg.eta_schedule = "theorem4"
    o3 = alg.objective_at(3)
    assert o3 is not alg.objective and alg.objective.eta == 0.1  # the run's objective is left as it is
    assert o3.eta == pytest.approx(0.02 * 5 / 2, rel=1e-15)
    assert dataclasses.replace(o3, eta=0.1) == alg.objective  # every other field carried over
    o3.validate()


@pytest.mark.parametrize("overrides", [["algorithm.objective.name=dpo"], ["algorithm.objective.name=sppo"],
                                       ["algorithm.objective.name=inpo_nokl"], ["algorithm.objective.tau=0"]])
def test_theorem4_needs_inpo_with_positive_tau(overrides):
    cfg = get_recipe("tiny_cpu")
    validate_all(apply_overrides(cfg, ["algorithm.eta_schedule=theorem4"]))
    with pytest.raises(ConfigError, match=r"^algorithm\.eta_schedule: 'theorem4' .* needs objective\.name 'inpo'"):
        validate_all(apply_overrides(cfg, ["algorithm.eta_schedule=theorem4", *overrides]))


def test_unknown_schedule_names_the_field():
    with pytest.raises(ConfigError, match=r"^algorithm\.eta_schedule: 'constant' or 'theorem4'"):
        validate_all(apply_overrides(get_recipe("tiny_cpu"), ["algorithm.eta_schedule=linear"]))


def test_schedule_is_part_of_the_run_identity(tmp_path):
    cfg = get_recipe("tiny_cpu")
    Manifest.open(tmp_path, cfg)
    with pytest.raises(ConfigError, match="algorithm.eta_schedule: saved 'constant', now 'theorem4'"):
        Manifest.open(tmp_path, apply_overrides(cfg, ["algorithm.eta_schedule=theorem4"]))
    (tmp_path / "config.yaml").unlink()  # without the YAML the recorded identity digest still refuses it
    with pytest.raises(ConfigError, match="different config"):
        Manifest.open(tmp_path, apply_overrides(cfg, ["algorithm.eta_schedule=theorem4"]))
    Manifest.open(tmp_path, cfg)


def test_each_iteration_hands_its_eta_to_the_megatron_train_stage(tmp_path):
    """Driver._train with the Megatron stages, the subprocess replaced by a recorder: the stage YAML's objective."""
    from megatron_inpo.driver.loop import Driver
    from megatron_inpo.driver.report import format_table
    from megatron_inpo.driver.results import LogprobResult, Pairs, Rollouts
    from megatron_inpo.driver.stages import MegatronStages

    cfg = apply_overrides(get_recipe("tiny_cpu"), [f"run_dir={tmp_path / 'run'}", "algorithm.eta_schedule=theorem4"])
    validate_all(cfg)
    tau = cfg.algorithm.objective.tau
    driver = Driver(cfg, progress=False, out=lambda s: None)
    driver.stages = MegatronStages(cfg, driver.run_dir)
    seen = []

    def record(name, call, **kw):
        seen.append(yaml.safe_load(Path(call.argv[call.argv.index("--config") + 1]).read_text()))
        out = driver.run_dir / f"iter_{len(seen):02d}" / "train"
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_result.json").write_text(json.dumps({"final_checkpoint": "ck", "metrics": {"loss": 1.0}}))

    driver.stages.run = record
    rows = []
    for t in (1, 2, 3):
        res = driver._train(t, LogprobResult(data="pairs.logp.jsonl"), Path("init"),
                            driver.run_dir / f"iter_{t:02d}")
        assert seen[-1]["objective"] == dataclasses.asdict(cfg.algorithm.objective_at(t))
        assert seen[-1]["objective"]["eta"] == res.eta == pytest.approx(tau * (t + 2) / 2, rel=1e-15)
        assert res.to_dict()["eta"] == res.eta  # what the manifest records
        rows.append(driver._report(t, Rollouts("r", 1, 1, 1.0), Pairs("p", 8, 0, "tournament", 0), res, None))
    assert [r["eta"] for r in rows] == pytest.approx([tau * 1.5, tau * 2.0, tau * 2.5], rel=1e-15)
    table = format_table(rows)
    assert "eta" in table.splitlines()[0] and f"{tau * 2.5:.4g}" in table
    driver.tb.close()


def test_theorem4_run_trains_each_iteration_with_its_eta(tmp_path, monkeypatch):
    """A real (tiny, torch-engine) INPO run with theorem4: the objective each train stage used, the manifest, the
    results rows, table.txt-style table and the tensorboard scalar train/eta."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_inpo.cli.run import resolve_config
    from megatron_inpo.driver.loop import Driver
    from megatron_inpo.driver.stages import TorchStages

    used = []
    original = TorchStages.train

    def spy(self, data, init, out_dir, objective=None):
        used.append(objective)
        return original(self, data, init, out_dir, objective)

    monkeypatch.setattr(TorchStages, "train", spy)
    run_dir = tmp_path / "run"
    cfg = resolve_config("tiny_cpu", None,
                         [*tiny_overrides(run_dir, iterations=2), "--algorithm.eta_schedule=theorem4"])
    tau = cfg.algorithm.objective.tau
    want = [tau * 1.5, tau * 2.0]
    rows = Driver(cfg, progress=False, out=lambda s: None).run()
    assert [o.eta for o in used] == pytest.approx(want, rel=1e-15)
    assert all(dataclasses.replace(o, eta=cfg.algorithm.objective.eta) == cfg.algorithm.objective for o in used)
    assert [r["eta"] for r in rows] == pytest.approx(want, rel=1e-15)
    man = json.loads((run_dir / "manifest.json").read_text())
    assert [man["stages"][f"iter{t}/train"]["outputs"]["eta"] for t in (1, 2)] == pytest.approx(want, rel=1e-15)
    assert [r["eta"] for r in json.loads((run_dir / "results.json").read_text())["table"]] == pytest.approx(want)
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/eta")] == [(1, pytest.approx(want[0], rel=1e-6)),
                                                                   (2, pytest.approx(want[1], rel=1e-6))]
