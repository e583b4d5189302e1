"""Helpers for the dataclass configs of every concern (model, parallel, rollout, judge, algorithm, train, ...).

Each concern defines its own `@dataclass` with a docstring under every field and a `validate()` that raises
`ConfigError` naming the field. These helpers turn configs into dicts / YAML and apply `a.b=value` overrides.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any

import yaml

from megatron_inpo.errors import InputError
from megatron_inpo.files import atomic_write_text


class ConfigError(InputError, ValueError):
    """A config value is invalid; the message names the field (dotted path) and the offending value."""


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _coerce(value: Any, tp: Any, where: str, template: Any = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        # a subclass instance in the template (a recipe's extended config) keeps its class and its fields
        if isinstance(template, tp) and type(template) is not tp:
            return from_dict(type(template), value, where, template)
        return from_dict(tp, value, where, template)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                last = e
        raise last or ConfigError(f"{where}: cannot read {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return type(value)(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)) if origin is list else tuple(
            _coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)
        )
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type, data: dict, where: str = "", template: Any = None) -> Any:
    """Build dataclass `cls` from a (possibly partial) dict; unknown keys are an error naming them. Nested configs
    of `template` (a config being overridden) that are subclasses of the declared type keep their class."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    renamed = [k for k in unknown if k in getattr(cls, "RENAMED", {})]
    if renamed:
        old = renamed[0]
        raise ConfigError(f"{where + '.' if where else ''}{old}: renamed {cls.RENAMED[old]!r} (write "  # type: ignore[attr-defined]
                          f"{cls.RENAMED[old]}: {data[old]!r})")  # type: ignore[attr-defined]
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k, getattr(template, k, None))
              for k, v in data.items()}
    return dataclasses.replace(cls(), **kwargs) if _has_defaults(cls) else cls(**kwargs)


def _has_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
        for f in dataclasses.fields(cls)
    )


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Return a copy of `cfg` with `a.b=value` overrides applied (values parsed as YAML scalars)."""
    data = to_dict(cfg)
    for item in overrides:
        key, sep, raw = item.lstrip("-").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node, dict) or p not in node:
                raise ConfigError(f"override {item!r}: no config section {p!r}")
            node = node[p]
        if not isinstance(node, dict) or parts[-1] not in node:
            section = _section_class(type(cfg), parts[:-1])
            new = getattr(section, "RENAMED", {}).get(parts[-1])
            if new:
                raise ConfigError(f"override {item!r}: {key} was renamed {'.'.join([*parts[:-1], new])!r}")
            raise ConfigError(f"override {item!r}: no config field {key!r}")
        try:
            node[parts[-1]] = load_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: not a YAML value ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return from_dict(type(cfg), data, template=cfg)


def _section_class(cls: type, path: list[str]) -> type | None:
    """The dataclass at dotted `path` below `cls` (its declared types), or None."""
    for p in path:
        hints = typing.get_type_hints(cls)
        cls = hints.get(p)
        if not dataclasses.is_dataclass(cls):
            return None
    return cls


def validate_all(cfg: Any, where: str = "") -> None:
    """Call validate() on `cfg` and every nested dataclass that defines one (innermost first). A nested config's
    ConfigError names its field relative to itself ('lr: ...'); this prefixes the dotted path ('train.lr: ...')."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate_all(v, f"{where}{f.name}.")
        check_int_range(f"{where}{f.name}", v)
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ConfigError as e:
            full = qualify(str(e), where)
            if full != str(e):
                raise ConfigError(full) from None
            raise


INT64 = (-(1 << 63), (1 << 63) - 1)
"""The range of every integer field: each reaches C somewhere (torch's seeds and sizes, struct, numpy)."""


def check_int_range(name: str, value: Any) -> None:
    """ConfigError naming the field when an integer (or an integer in a list) lies outside int64, or a seed is
    negative: YAML reads a 43-digit number as a Python int, which fails only deep inside the stage that uses it."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if type(v) is not int:
            continue
        if not INT64[0] <= v <= INT64[1]:
            raise ConfigError(f"{name}: {v} is out of range (integers must fit in 64 bits: "
                              f"{INT64[0]} .. {INT64[1]})")
        if name.rsplit(".", 1)[-1] == "seed" and v < 0:
            raise ConfigError(f"{name}: a seed must be >= 0, got {v}")


def qualify(message: str, where: str) -> str:
    """`message` with its leading field name completed to the dotted path `where` ('a.b.'): 'x: ..' ->
    'a.b.x: ..'; a message that already names a tail of the path ('b.x: ..') gets only the rest ('a.')."""
    parts = where.rstrip(".").split(".") if where else []
    for k in range(len(parts)):
        if message.startswith(".".join(parts[k:]) + "."):
            return ".".join(parts[:k]) + ("." if k else "") + message
    return where + message


MAX_YAML_NODES = 100_000
"""The most nodes a YAML document of this project may expand to through its aliases (a config has hundreds)."""


class YAMLBombError(yaml.YAMLError):
    """A YAML document whose aliases expand it past MAX_YAML_NODES, or refer to themselves."""


def _expanded_nodes(root: yaml.Node) -> int:
    """How many nodes `root` stands for once every alias is expanded (capped at MAX_YAML_NODES + 1); shared nodes
    are counted once per use, in time linear in the distinct nodes. YAMLBombError on a self-referring alias."""
    cap = MAX_YAML_NODES + 1
    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        key = id(node)
        kids = ([n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else
                list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if closing:
            open_.discard(key)
            sizes[key] = min(cap, 1 + sum(sizes[id(k)] for k in kids))
        elif key in open_:
            raise YAMLBombError("an alias refers to a node that contains it (a recursive document)")
        elif key not in sizes:
            open_.add(key)
            stack.append((node, True))
            stack.extend((k, False) for k in kids)
    return sizes[id(root)]


def load_yaml(stream: Any) -> Any:
    """yaml.safe_load with alias expansion bounded: a document that would expand past MAX_YAML_NODES nodes (a
    "billion laughs" bomb) or refer to itself raises YAMLBombError (a yaml.YAMLError) before anything is built.
    Every YAML file or value this project reads goes through here."""
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        n = _expanded_nodes(node)
        if n > MAX_YAML_NODES:
            raise YAMLBombError(f"its aliases expand it to more than {MAX_YAML_NODES} nodes (an alias bomb?)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML config file; a missing file, bad YAML or a non-mapping is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = load_yaml(f) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except YAMLBombError as e:
        raise ConfigError(f"--config {path}: refused: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: invalid UTF-8 (byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping at the top level")
    return data


def _deep_merge(base: dict, new: dict) -> dict:
    out = dict(base)
    for k, v in new.items():
        out[k] = _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def merge_yaml(cfg: Any, path: str | os.PathLike) -> Any:
    """`cfg` with the fields of a YAML file laid on top (nested sections merged); unknown keys name the file."""
    try:
        return from_dict(type(cfg), _deep_merge(to_dict(cfg), read_yaml_mapping(path)), template=cfg)
    except ConfigError as e:
        if str(e).startswith(f"--config {path}:"):
            raise
        raise ConfigError(f"--config {path}: {e}") from None


def parse_override_args(tokens: list[str]) -> list[str]:
    """Command-line overrides `--a.b=v`, `--a.b v` or `a.b=v` as ['a.b=v', ...]; dashes in a flag's name read as
    underscores (`--micro-batch-size 2`), never in its value."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        flag = tok.startswith("--")
        key, sep, value = (tok[2:] if flag else tok).partition("=")
        if flag:
            key = key.replace("-", "_")
        if sep:
            out.append(f"{key}={value}")
            i += 1
        elif flag and i + 1 < len(tokens):
            out.append(f"{key}={tokens[i + 1]}")
            i += 2
        elif flag:
            raise ConfigError(f"flag {tok} needs a value")
        else:
            raise ConfigError(f"unexpected argument {tok!r} (overrides are KEY=VALUE or --key value)")
    return out
