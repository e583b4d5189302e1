"""What each stage of the iteration loop records: a typed result per stage, whose `to_dict` is exactly the
`outputs` the manifest keeps (driver/manifest.py), so a resumed run reads back the same objects."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar


@dataclass
class StageResult:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return cls(**d)


R = TypeVar("R", bound=StageResult)


@dataclass
class TaskFiles(StageResult):
    """'prepare': the prompt file of each iteration, the held-out prompts and the model sources (the synthetic
    task's SFT data, initial model and tokenizer; or the HF model of model.source 'hf')."""

    prompts: list[str]
    eval_prompts: str
    sft: str | None = None
    model_init: str | None = None
    tokenizer: str | None = None
    hf: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


@dataclass
class Policy(StageResult):
    """'sft' / 'import': pi_ref, a policy of the engine."""

    policy: str


@dataclass
class HFExport(StageResult):
    """'iter{n}/export': pi_n as an HF directory (what the rollout engine and the evaluation load)."""

    hf: str


@dataclass
class Rollouts(StageResult):
    """'iter{t}/rollout': K samples of pi_t for every prompt of D_t (rollouts.jsonl)."""

    rollouts: str
    prompts: int
    sequences: int
    mean_tokens: float


@dataclass
class Pairs(StageResult):
    """'iter{t}/judge': one (y_w, y_l) pair per kept prompt (pairs.jsonl; dropped prompts in .dropped.jsonl)."""

    pairs_file: str
    pairs: int
    dropped: int
    method: str
    comparisons_this_attempt: int


@dataclass
class LogprobResult(StageResult):
    """'iter{t}/logprobs': the pairs with log pi_ref and log pi_t of y_w, y_l (pairs.logp.jsonl)."""

    data: str


@dataclass
class TrainResult(StageResult):
    """'iter{t}/train': the final checkpoint of the INPO update, its metrics and the eta it trained with."""

    checkpoint: str
    metrics: dict
    eta: float | None = None
    """The iteration's objective.eta (algorithm.eta_schedule); None in manifests written before it was recorded."""


@dataclass
class Checkpoint(StageResult):
    """'iter{t}/checkpoint': pi_{t+1}, also linked as <run_dir>/policies/pi_{t+1}."""

    policy: str
    link: str


@dataclass
class EvalResult(StageResult):
    """'iter{t}/eval': win rate of pi_{t+1} against pi_ref (megatron_inpo.evaluate.evaluate_pair's result)."""

    win_rate: float
    stderr: float
    n: int
    wins: int
    ties: int
    losses: int
    both_orders: bool
    policy: str
    baseline: str
    judge: str
    policy_length: dict
    baseline_length: dict


@dataclass
class NashReading(StageResult):
    """'meter/pi_ref' and 'iter{t}/meter' (task.kind 'game'): the Nash meter's exact reading of a policy
    (megatron_inpo.nash_meter; pi_ref's also holds every game's pi* and its certificate)."""

    reading: dict
