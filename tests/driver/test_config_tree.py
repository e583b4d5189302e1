"""The one config tree: the engine's config objects are embedded whole in the run config and reach the stages as
they are, so a field added to the engine is settable from `run` (and `train` / `logprobs`) with no other change."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from megatron_inpo.config import ConfigError, apply_overrides, validate_all
from megatron_inpo.driver.recipes import get_recipe
from megatron_inpo.driver.stages import MegatronStages
from megatron_inpo.engine.config import LogprobConfig, TrainConfig


@dataclasses.dataclass
class KnobTrainConfig(TrainConfig):
    """The engine's training config with one more field, as a developer would add it."""

    knob: int = 0
    """A new engine setting."""

    def validate(self) -> None:
        super().validate()
        if self.knob < 0:
            raise ConfigError(f"knob: must be >= 0, got {self.knob}")


def _captured_stage_yaml(stages: MegatronStages, out_dir: Path) -> dict:
    """Run the driver's train stage with the subprocess replaced by a recorder; the stage YAML it wrote."""
    seen = {}

    def record(name, call, **kw):
        seen["yaml"] = Path(call.argv[call.argv.index("--config") + 1])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_result.json").write_text(json.dumps({"final_checkpoint": "ck", "metrics": {}}))

    stages.run = record
    stages.train(Path("pairs.jsonl"), Path("init"), out_dir)
    return yaml.safe_load(seen["yaml"].read_text())


def test_a_new_engine_field_is_settable_from_run_and_reaches_the_stage(tmp_path):
    cfg = get_recipe("tiny_cpu")
    cfg.train = KnobTrainConfig(**dataclasses.asdict(cfg.train))
    cfg = apply_overrides(cfg, ["train.knob=5", "--megatron.model.fp8_recipe=current", "train.adam_beta2=0.99"])
    validate_all(cfg)
    assert isinstance(cfg.train, KnobTrainConfig) and cfg.train.knob == 5
    with pytest.raises(ConfigError, match=r"^train\.knob: must be >= 0"):
        validate_all(apply_overrides(cfg, ["train.knob=-1"]))
    stage = _captured_stage_yaml(MegatronStages(cfg, tmp_path / "run"), tmp_path / "run" / "iter_01" / "train")
    # the stage's YAML holds the run's objects as they are: every field, the new one included
    assert stage["train"] == dataclasses.asdict(cfg.train) and stage["train"]["knob"] == 5
    assert stage["megatron"] == dataclasses.asdict(cfg.megatron)
    assert stage["megatron"]["model"]["fp8_recipe"] == "current" and stage["train"]["adam_beta2"] == 0.99
    assert stage["objective"] == dataclasses.asdict(cfg.algorithm.objective) and stage["seed"] == cfg.seed


def test_run_and_stage_configs_share_the_engine_objects():
    """No copies: the run's `train`, `sft` and `logprobs` are the engine's own classes (the stage YAML of the
    engine commands reads them under the same dotted names)."""
    from megatron_inpo.driver.config import RunConfig
    from megatron_inpo.engine.config import LogprobStageConfig, MegatronConfig, TrainStageConfig

    hints = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    for name, cls in (("train", TrainConfig), ("sft", TrainConfig), ("logprobs", LogprobConfig),
                      ("megatron", MegatronConfig)):
        assert getattr(RunConfig(), name).__class__ is cls, name
    stage_fields = {f.name for f in dataclasses.fields(TrainStageConfig)}
    assert {"megatron", "train"} <= stage_fields and {"megatron", "logprobs"} <= {
        f.name for f in dataclasses.fields(LogprobStageConfig)}
    assert hints["megatron"] in (MegatronConfig, "MegatronConfig")


def test_dotted_names_in_errors(tmp_path):
    cfg = get_recipe("tiny_cpu")
    for override, name in (("train.lr=0", "train.lr"), ("sft.adam_beta1=1.5", "sft.adam_beta1"),
                           ("logprobs.chunk_pairs=0", "logprobs.chunk_pairs"),
                           ("megatron.model.precision=fp64", "megatron.model.precision"),
                           ("megatron.parallel.sequence_parallel=true", "megatron.parallel.sequence_parallel"),
                           ("megatron.parallel.tensor_model_parallel_size=2", "megatron.parallel"),
                           ("launch.master_port=1", "launch.master_port")):
        with pytest.raises(ConfigError) as e:
            validate_all(apply_overrides(cfg, [override]))
        assert str(e.value).startswith(name), (override, str(e.value))
