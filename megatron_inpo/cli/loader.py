"""The one config loader of every `megatron-inpo` command.

A command's config is a dataclass. The command line resolves it in one order, the same for every command:

1. `--recipe NAME` (commands with a recipe registry): the base config; without it, the command's default recipe
   (when neither --recipe nor --config is given) or the dataclass's defaults;
2. `--config FILE.yaml`: its fields laid on top (nested sections merged; unknown keys are an error naming them);
3. overrides, as `--a.b=value`, `--a.b value` or `a.b=value` (dashes in a flag's name read as underscores);
4. `validate()` of the config and of every nested section;
5. `--print-config`: print the resolved config as YAML and exit 0.

`--help` lists every field (dotted name) with the first line of its docstring and, for a field with a fixed set
of values (a Literal annotation, or `metadata={"values": ...}` on the dataclass field), those values. A config error exits 2 with
`megatron-inpo CMD: config error: ...`. Nothing here imports torch or Megatron-Core; commands import their
heavy modules inside their body.

`guard` is the one place where failures become messages, for every command (run_command calls it, and so does
the top-level `megatron-inpo` dispatcher around importing a command): each is ONE line on stderr,
`megatron-inpo CMD: error: ...`, never a traceback:

- bad input or a broken environment exits 2 (EXIT_BAD_INPUT): the project's own errors (every subclass of
  errors.InputError, which carries its exit code: config, data, checkpoint, conversion, a busy output, SGLang
  requests that failed for good), a disk full (ENOSPC / EDQUOT), a read-only or
  forbidden directory (EROFS / EACCES / EPERM), a missing file, an unreachable server, and torch's
  CheckpointException (a BaseException that `except Exception` does not catch);
- Ctrl-C (SIGINT) exits 130 (EXIT_INTERRUPTED) with `interrupted; rerun the same command to resume`, SIGTERM (a
  scheduler's preemption, `kill`) 143 (EXIT_TERMINATED) with `terminated; ...` (every output is written atomically
  or appended resumably, so the rerun continues where this one stopped). Both are installed while the command
  runs, whatever the process inherited: a command started with `&` from a script inherits SIGINT ignored (POSIX
  shells do that to background jobs), and SIGTERM's default action ends the process without unwinding, which
  leaves the stage worker to die of its parent-death signal instead of being stopped;
- anything else is a bug and keeps its traceback. `MEGATRON_INPO_TRACEBACK=1` shows the traceback of every error.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from megatron_inpo.errors import (EXIT_BAD_INPUT, InputError, checkpoint_exception_summary,  # noqa: F401 - re-exported
                                  describe_os_error, explain, is_checkpoint_exception, one_line)

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
INTERRUPTED = "interrupted; rerun the same command to resume"
TERMINATED = "terminated; rerun the same command to resume"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a KeyboardInterrupt, so every cleanup that stops a stage on Ctrl-C
    stops it on SIGTERM too; the exit status tells them apart (143)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt and SIGTERM Terminated while the block runs (module docstring); the
    handlers the process had are restored afterwards. Only the main thread can set them: elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
def hold_output(path: str | os.PathLike, what: str) -> contextlib.AbstractContextManager:
    """One command at a time per output (files.exclusive_output, `<path>.lock`; a second is refused naming the
    holder): taken by global rank 0 only (RANK, torchrun's), so that the ranks of one command do not refuse each
    other; the refused rank's exit ends the others (torchrun stops the group)."""
    from megatron_inpo.files import exclusive_output

    if os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return exclusive_output(path, what)




@dataclass(frozen=True)
class Command:
    """What the loader needs to know about one command."""

    prog: str
    """Program name for usage and error lines, e.g. 'megatron-inpo run'."""
    config: type
    """The config dataclass."""
    doc: str = ""
    """Description printed by --help (the command module's docstring)."""
    recipes: Mapping[str, Callable[[], Any]] | None = None
    """--recipe NAME -> function returning a complete config; None: the command takes no --recipe."""
    default_recipe: str | None = None
    """Recipe used when neither --recipe nor --config is given (else the dataclass's defaults)."""
    base: Callable[[argparse.Namespace], Any] | None = None
    """Base config without --recipe, from the command's own arguments (default: `config()`)."""
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    """Adds the command's own flags (e.g. --prompts, --out) to its parser."""
    config_aliases: tuple[str, ...] = ()
    """Other spellings of --config kept for older command lines (e.g. --rollout-config)."""


def allowed_values(f: Any, hint: Any) -> tuple | None:
    """The fixed values a config field takes: its Literal annotation's (None allowed when Optional), else the
    dataclass field's metadata["values"]; None for a free field."""
    import typing

    values = f.metadata.get("values") if f.metadata else None
    if values:
        return tuple(values)
    args = typing.get_args(hint) if (typing.get_origin(hint) is typing.Union
                                     or str(typing.get_origin(hint)) == "<class 'types.UnionType'>") else (hint,)
    out: list = []
    for a in args:
        if typing.get_origin(a) is typing.Literal:
            out += list(typing.get_args(a))
        elif a is type(None):
            continue
        else:
            return None
    return tuple(out) or None


def _show_values(values: tuple) -> str:
    return "values: " + ", ".join(repr(v) if v == "" else str(v) for v in values)


def field_docs(cls: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field name, first line of its docstring [+ its allowed values]) for a config dataclass and its
    nested ones."""
    import ast
    import dataclasses
    import inspect
    import textwrap
    import typing

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr) \
                    and isinstance(getattr(b, "value", None), ast.Constant) and isinstance(b.value.value, str):
                text = b.value.value.strip()
                docs[a.target.id] = text.splitlines()[0] if text else ""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += field_docs(hints[f.name], f"{prefix}{f.name}.")
        else:
            text = docs.get(f.name, "")
            values = allowed_values(f, hints[f.name])
            if values:
                text = f"{text} [{_show_values(values)}]" if text else f"[{_show_values(values)}]"
            out.append((prefix + f.name, text))
    return out


def build_parser(cmd: Command) -> argparse.ArgumentParser:
    """The command's parser: its own flags, --recipe, --config, --print-config; the field list as epilog."""
    p = argparse.ArgumentParser(prog=cmd.prog, description=cmd.doc, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if cmd.arguments is not None:
        cmd.arguments(p)
    if cmd.recipes is not None:
        default = f" (default {cmd.default_recipe} when no --config is given)" if cmd.default_recipe else ""
        p.add_argument("--recipe", help=f"base config: {', '.join(cmd.recipes)}{default}")
    p.add_argument("--config", *cmd.config_aliases, dest="config", metavar="YAML",
                   help="YAML file of config fields, laid on top of the recipe" if cmd.recipes is not None
                   else "YAML file of config fields")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_no_verify(p)
    width = max([len(n) for n, _ in field_docs(cmd.config)] + [28])
    p.epilog = ("overrides: --a.b=value, --a.b value or a.b=value (dotted field names; '-' in a flag reads as "
                "'_'), applied after --config.\n\nfields:\n" +
                "\n".join(f"  {name:<{width}}  {text}".rstrip() for name, text in field_docs(cmd.config)))
    return p


def add_no_verify(p: argparse.ArgumentParser) -> None:
    """--no-verify, for every command that reads checkpoints or HF exports (applied by `apply_no_verify`)."""
    p.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 checks of checkpoints and HF exports against their digest records "
                        "(integrity only: the no-code-on-load checks always run); same as MEGATRON_INPO_NO_VERIFY=1")


def apply_no_verify(args: argparse.Namespace) -> None:
    """--no-verify reaches every reader through the environment, so the stage processes a run starts inherit it."""
    if getattr(args, "no_verify", False):
        from megatron_inpo.engine.trust import NO_VERIFY_ENV

        os.environ[NO_VERIFY_ENV] = "1"


def parse_command_line(cmd: Command, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the parsed flags, the overrides as ['a.b=value', ...]); a malformed override is a ConfigError."""
    from megatron_inpo.config import parse_override_args

    args, rest = build_parser(cmd).parse_known_args(argv)
    return args, parse_override_args(rest)


def resolve_config(cmd: Command, recipe: str | None, config: str | None, overrides: list[str],
                   args: argparse.Namespace | None = None) -> Any:
    """Recipe (or base), then the YAML file, then the overrides; validated. Raises ConfigError."""
    from megatron_inpo.config import ConfigError, apply_overrides, merge_yaml, validate_all

    if recipe is None and config is None and cmd.default_recipe is not None:
        recipe = cmd.default_recipe
    if recipe is not None:
        recipes = cmd.recipes or {}
        if recipe not in recipes:
            raise ConfigError(f"--recipe: unknown recipe {recipe!r}; choose from {sorted(recipes)}")
        cfg = recipes[recipe]()
    elif cmd.base is not None:
        cfg = cmd.base(args if args is not None else argparse.Namespace(config=config))
    else:
        cfg = cmd.config()
    if config:
        cfg = merge_yaml(cfg, config)
    cfg = apply_overrides(cfg, overrides)
    validate_all(cfg)
    return cfg


def load_config(cmd: Command, argv: list[str]) -> tuple[Any, argparse.Namespace]:
    """Parse `argv` and resolve the config: (validated config, parsed flags). Raises ConfigError."""
    args, overrides = parse_command_line(cmd, argv)
    cfg = resolve_config(cmd, getattr(args, "recipe", None), args.config, overrides, args)
    return cfg, args


def config_yaml(cfg: Any) -> str:
    import yaml

    from megatron_inpo.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def guard(prog: str, fn: Callable[[], int | None]) -> int:
    """Run `fn()` and return its exit status; bad input / environment -> one line on stderr and 2, Ctrl-C -> 130,
    SIGTERM -> 143 (see the module docstring). Bugs propagate with their traceback."""
    try:
        with interrupts():
            return int(fn() or 0)
    except KeyboardInterrupt as e:
        if os.environ.get("MEGATRON_INPO_TRACEBACK"):
            raise
        term = isinstance(e, Terminated)
        _say(f"{prog}: {TERMINATED if term else INTERRUPTED}")
        return EXIT_TERMINATED if term else EXIT_INTERRUPTED
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        msg = explain(e)
        if msg is None or os.environ.get("MEGATRON_INPO_TRACEBACK"):
            raise
        _say(f"{prog}: error: {msg}")
        return getattr(e, "exit_code", EXIT_BAD_INPUT)


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr itself gone (a closed pipe): the exit status still tells
        pass


def run_command(cmd: Command, argv: list[str] | None, body: Callable[[Any, argparse.Namespace], int | None]) -> int:
    """The whole command-line protocol: load the config (a config error exits 2 with `PROG: config error: ...`),
    answer --print-config (exit 0), else return `body(cfg, args)` (None reads as 0), under `guard`."""
    from megatron_inpo.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)

    def protocol() -> int:
        try:
            cfg, args = load_config(cmd, argv)
        except (ConfigError, OSError) as e:
            msg = one_line(str(e)) if isinstance(e, ConfigError) else describe_os_error(e)
            _say(f"{cmd.prog}: config error: {msg}")
            return EXIT_BAD_INPUT
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        apply_no_verify(args)
        return int(body(cfg, args) or 0)

    return guard(cmd.prog, protocol)
