"""`megatron-inpo train`: one training stage (preference objective or SFT) on Megatron-Core.

    megatron-inpo train --config stage.yaml [KEY=VALUE ...] [--FIELD VALUE ...]
    torchrun --nproc-per-node N -m megatron_inpo train --config stage.yaml tensor_model_parallel_size=2

Flags are the TrainConfig fields with '-' or '_' (`--init-checkpoint`, `--objective.eta`); KEY=VALUE overrides use
the dotted field names. See megatron_inpo/engine/train.py for the fields and the output layout.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any


def field_docs(cls: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field name, first line of its docstring) for a config dataclass and its nested ones."""
    import ast
    import dataclasses
    import inspect
    import textwrap
    import typing

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None),
                                                                                   ast.Constant):
            docs[a.target.id] = str(b.value.value).strip().splitlines()[0]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += field_docs(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, docs.get(f.name, "")))
    return out


def parse_config(argv: list[str], cls: Any, prog: str, doc: str) -> Any:
    """--config YAML, then KEY=VALUE overrides, then --field value flags (last wins); validated."""
    from megatron_inpo.config import apply_overrides, from_dict, parse_override_args, read_yaml_mapping, validate_all

    parser = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with the config fields")
    parser.epilog = "Other arguments: KEY=VALUE overrides (dotted field names) or --field VALUE flags.\n\nfields:\n" + \
        "\n".join(f"  {name:<30} {text}" for name, text in field_docs(cls))
    args, rest = parser.parse_known_args(argv)
    overrides = parse_override_args(rest)
    data = read_yaml_mapping(args.config) if args.config else {}
    cfg = from_dict(cls, data, where=args.config or "")
    cfg = apply_overrides(cfg, overrides)
    validate_all(cfg)
    return cfg


def run_command(argv: list[str] | None, cls: type, prog: str, doc: str | None, fn, report) -> int:
    """Shared body of the engine's commands: parse and validate the config, run `fn(cfg)`, tear down the process
    groups, print `report(result)` (or nothing for None). Bad config or data exits 2 with the message."""
    from megatron_inpo.config import ConfigError
    from megatron_inpo.data.preferences import DataError
    from megatron_inpo.engine.checkpoint import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(argv, cls, prog, doc)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    try:
        result = fn(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    finally:
        _shutdown()
    line = report(result)
    if line:
        print(line, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from megatron_inpo.engine.train import TrainConfig, train

    def report(result: dict) -> str | None:
        if "final_checkpoint" in result and result.get("rank0", True):
            return f"trained: {result['final_checkpoint']}"
        return None

    return run_command(argv, TrainConfig, "megatron-inpo train", __doc__, train, report)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        finally:
            dist.destroy_process_group()
