r"""`megatron-inpo train`: one training stage (preference objective or SFT) on Megatron-Core.

    megatron-inpo train --config stage.yaml [--a.b=value | --a.b value | a.b=value ...]
    torchrun --nproc-per-node N -m megatron_inpo train --config stage.yaml \
        --megatron.parallel.tensor_model_parallel_size=2

The config is a TrainStageConfig (megatron_inpo/engine/config.py; `--help` lists every field); flags may spell
'_' as '-' (`--init-checkpoint`). Prints `trained: CHECKPOINT` on rank 0. See megatron_inpo/engine/train.py for
the output layout.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from megatron_inpo.cli.loader import Command, run_command

PROG = "megatron-inpo train"


def command() -> Command:
    from megatron_inpo.engine.config import TrainStageConfig

    return Command(prog=PROG, config=TrainStageConfig, doc=__doc__ or "")


def main(argv: list[str] | None = None) -> int:
    def report(result: dict) -> str | None:
        if "final_checkpoint" in result and result.get("rank0", True):
            return f"trained: {result['final_checkpoint']}"
        return None

    return run_engine_stage(command(), "train", argv, report, lambda cfg: cfg.output_dir)


def run_engine_stage(cmd: Command, kind: str, argv: list[str] | None, report: Callable[[Any], str | None],
                     output: Callable[[Any], str]) -> int:
    """Shared body of the engine's commands: load the config, hold its `output(cfg)` (loader.hold_output: one
    command per output), run the stage (engine/entry.run_stage: the process groups are torn down afterwards),
    print `report(result)` (nothing for None). Bad config, data or checkpoints, a busy output, a full disk, Ctrl-C,
    ...: the message of loader.guard (exit 2, 130)."""
    from megatron_inpo.cli.loader import hold_output

    def body(cfg: Any, _args: Any) -> int:
        from megatron_inpo.engine.entry import run_stage

        with hold_output(output(cfg), f"the output of {cmd.prog}"):
            result = run_stage(kind, cfg)
        line = report(result)
        if line:
            print(line, flush=True)
        return 0

    return run_command(cmd, argv, body)


if __name__ == "__main__":
    sys.exit(main())
