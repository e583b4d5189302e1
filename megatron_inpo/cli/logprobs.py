r"""`megatron-inpo logprobs`: store log pi_ref and log pi_t of every (y_w, y_l) of a preference file.

    megatron-inpo logprobs --data pairs.jsonl --output pairs.logp.jsonl --ref-checkpoint REF [--last-checkpoint LAST]
    torchrun --nproc-per-node N -m megatron_inpo logprobs --config logprobs.yaml \
        --megatron.parallel.tensor_model_parallel_size=2

The config is a LogprobStageConfig (megatron_inpo/engine/config.py; `--help` lists every field). Forward-only over
Megatron-Core (any TP / PP / DP), resumable chunk by chunk; an existing output is left alone (stage done). See
megatron_inpo/engine/logprobs.py. Prints `logprobs: {summary}` on rank 0.
"""
from __future__ import annotations

import sys
from typing import Any

from megatron_inpo.cli.loader import Command
from megatron_inpo.cli.train import run_engine_stage

PROG = "megatron-inpo logprobs"


def command() -> Command:
    from megatron_inpo.engine.config import LogprobStageConfig

    return Command(prog=PROG, config=LogprobStageConfig, doc=__doc__ or "")


def main(argv: list[str] | None = None) -> int:
    return run_engine_stage(command(), "logprobs", argv,
                            lambda summary: f"logprobs: {summary}" if summary.get("rank0", True) else None,
                            lambda cfg: cfg.output)


if __name__ == "__main__":
    sys.exit(main())
