"""Experiment configs: frozen, typed, nested dataclasses loaded from YAML with overrides.

One :class:`ExperimentConfig` describes a whole pipeline (SFT, reward model, PPO) and where it
runs. It is composed from the configs the library modules own — ``SFTConfig``,
``RewardModelConfig``, ``PPOConfig``, ``OptimConfig``, ``LoopConfig``, ``ParallelConfig`` — so a
field is documented once, where it is used. A config comes from three layers, each overriding the
one before::

    dataclass defaults  <  a YAML file (experiments/configs/*.yaml)  <  key.path=value overrides

:func:`load_config` does the layering and :func:`from_dict` the typed conversion (PyYAML parses;
this module checks every value against the dataclass field's type). Errors say what to change:

- an unknown key names the file and line (or the override) and lists the close matches and the
  keys that section accepts;
- a wrong type names the field, the type it expects and the value it got;
- a value a config's ``__post_init__`` rejects is reported with the section path it sits at.

Override values are YAML scalars or flow collections: ``ppo.kl_coef=0.05``,
``run.wandb_project=null``, ``parallel.mesh.data=-1``, ``sft.data.stop_tokens=[0,2]``. Floats may
be written ``1e-5`` (PyYAML reads that as a string; float fields accept it).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import inspect
import os
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from rlhf_jax.errors import UsageError

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_override",
    "field_docs",
    "describe",
    "to_yaml",
    "load_yaml",
]


class ConfigError(UsageError, ValueError):
    """A config file, override or value is wrong; the message says where and what to change."""


# ------------------------------------------------------------------------------------------
# Field documentation (the one comment per field)
# ------------------------------------------------------------------------------------------

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?#\s?(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: its trailing comment}`` read from the dataclass source (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = _FIELD_LINE.match(line)
            if m:
                docs[m.group(1)] = m.group(2).strip()
    return docs


# ------------------------------------------------------------------------------------------
# Typed conversion
# ------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    return str(tp)


def _where(path: str, sources: Mapping[str, str]) -> str:
    """The file:line or override a key path came from, as a message prefix."""
    probe = re.sub(r"\[\d+\]", "", path)
    while probe:
        if probe in sources:
            return f"{sources[probe]}: "
        probe = probe.rpartition(".")[0]
    return ""


def _section_source(path: str, sources: Mapping[str, str]) -> str:
    """Where a section's rejected combination of values came from: the last override that set a
    key inside it, else the section's own line in the file."""
    inside = [
        src
        for key, src in sources.items()
        if src.startswith("override") and (not path or key == path or key.startswith(path + "."))
    ]
    return f"{inside[-1]}: " if inside else _where(path, sources)


class _Mismatch(Exception):
    pass


def _convert(tp: Any, value: Any, path: str, sources: Mapping[str, str]) -> Any:
    """Convert a YAML value to ``tp`` or raise ConfigError naming ``path``."""
    if tp is Any or tp is typing.Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _from_dict(tp, value, path, sources)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _convert(args[0], value, path, sources)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _convert(arm, value, path, sources)
            except _Mismatch:
                continue
            except ConfigError as err:  # a dataclass arm that matched in shape but not in detail
                errors.append(err)
        if errors:
            raise errors[0]
        raise _Mismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(
            f"{_where(path, sources)}{path}={value!r}: choose one of {', '.join(map(repr, args))}"
        )
    if origin in (tuple, list, Sequence, typing.Sequence):
        if not isinstance(value, list | tuple):
            raise _Mismatch
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ConfigError(
                    f"{_where(path, sources)}{path}: expected {len(args)} items "
                    f"({_type_name(tp)}), got {len(value)}: {value!r}"
                )
            items = [
                _convert_field(a, v, f"{path}[{i}]", sources)
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            item = args[0] if args else Any
            items = [_convert_field(item, v, f"{path}[{i}]", sources) for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin in (dict, Mapping, typing.Mapping):
        if not isinstance(value, Mapping):
            raise _Mismatch
        kt, vt = args if args else (Any, Any)
        return {
            _convert_field(kt, k, f"{path}.{k}", sources): _convert_field(
                vt, v, f"{path}.{k}", sources
            )
            for k, v in value.items()
        }
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(
                f"{_where(path, sources)}{path}={value!r}: choose one of "
                f"{', '.join(repr(m.value) for m in tp)}"
            ) from None
    if tp in (pathlib.Path, os.PathLike):
        if isinstance(value, str | os.PathLike):
            return pathlib.Path(value)
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def _convert_field(tp: Any, value: Any, path: str, sources: Mapping[str, str]) -> Any:
    try:
        return _convert(tp, value, path, sources)
    except _Mismatch:
        got = type(value).__name__ if not isinstance(value, Mapping) else "a mapping"
        hint = ""
        if dataclasses.is_dataclass(tp) or any(
            dataclasses.is_dataclass(a) for a in typing.get_args(tp)
        ):
            hint = f" (a section: set its keys, e.g. {path}.<key>=...)"
        raise ConfigError(
            f"{_where(path, sources)}{path}: expected {_type_name(tp)}, got {got} {value!r}{hint}"
        ) from None


def _unknown_key(cls: type, key: str, path: str, sources: Mapping[str, str]) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    close = difflib.get_close_matches(str(key), names, n=3, cutoff=0.6)
    full = f"{path}.{key}" if path else str(key)
    section = path or "the top level"
    msg = f"{_where(full, sources)}unknown key {full!r}"
    if close:
        prefix = f"{path}." if path else ""
        msg += f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?"
    else:
        msg += "."
    msg += f" The keys of {section} ({cls.__name__}) are: {', '.join(names)}"
    return ConfigError(msg)


def _from_dict(cls: type, data: Mapping[str, Any], path: str, sources: Mapping[str, str]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception as err:  # noqa: BLE001 - an unresolvable annotation is a library bug
        raise TypeError(f"cannot resolve the field types of {cls.__qualname__}: {err}") from err
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key(cls, key, path, sources)
        sub = f"{path}.{key}" if path else key
        default = _default(fields[key])
        if isinstance(value, Mapping) and dataclasses.is_dataclass(default):
            # A section overrides the keys it names; the rest keep this field's default, which
            # may differ from the section class's own defaults (PPOConfig.optim sets eps=1e-5).
            value = _merge(to_dict(default), value)
        kwargs[key] = _convert_field(hints[key], value, sub, sources)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = path or "the top level"
        raise ConfigError(f"{where} ({cls.__name__}): required keys missing: {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        where = path or "the config"
        raise ConfigError(f"{_section_source(path, sources)}in {where}: {err}") from err


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` written over it, recursively for nested mappings."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(cls: type, data: Mapping[str, Any] | None, *, sources=None, path: str = "") -> Any:
    """Build the dataclass ``cls`` from nested plain data, checking every key and type.

    Args:
      cls: a (frozen) dataclass type; nested dataclass fields take nested mappings.
      data: the values; missing keys take the dataclass defaults.
      sources: optional ``{key path: "file.yaml:12"}`` used to point errors at their origin.
      path: the key path of ``data`` inside a bigger config (for messages).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'the config'}: expected a mapping of keys, got {data!r}")
    return _from_dict(cls, data, path, sources or {})


def to_dict(cfg: Any) -> Any:
    """Plain nested data (dicts, lists, scalars) from a config, the inverse of :func:`from_dict`."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return cfg


# ------------------------------------------------------------------------------------------
# YAML files and overrides
# ------------------------------------------------------------------------------------------


def load_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a YAML config: ``(data, {key path: "file:line"})``. Errors name the file and line."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist (presets live in experiments/configs/)"
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {err}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {data!r}")
    sources: dict[str, str] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                sources[key] = f"{path}:{k.start_mark.line + 1}"
                walk(v, key)

    walk(node, "")
    return data, sources


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> ``(["a", "b", "c"], value parsed as a YAML scalar/flow value)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(
            f"override {text!r}: write key.path=value, e.g. ppo.optim.learning_rate=1e-5"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from None
    return key.split("."), value


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], sources: dict[str, str] | None = None
) -> dict[str, Any]:
    """Set each ``key.path=value`` into a copy of nested ``data`` (later overrides win)."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override {text!r}: {'.'.join(keys[: i + 1])} is a value, not a section"
                )
            node = nxt
        node[keys[-1]] = value
        if sources is not None:
            sources[".".join(keys)] = f"override {text!r}"
            for i in range(1, len(keys)):  # a section the override created or reached
                sources.setdefault(".".join(keys[:i]), f"override {text!r}")
    return data


# ------------------------------------------------------------------------------------------
# Describing a config: help text and commented YAML
# ------------------------------------------------------------------------------------------


def _flat(cfg: Any, prefix: str = "") -> list[tuple[str, Any, str, str]]:
    """``[(key path, value, type name, comment)]`` for every leaf field of a config instance."""
    out = []
    cls = type(cfg)
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cfg):
        if not f.init:
            continue
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += _flat(value, key + ".")
        else:
            out.append((key, value, _type_name(hints[f.name]), docs.get(f.name, "")))
    return out


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def describe(cfg: Any, *, width: int = 100) -> str:
    """A table of every key: ``key.path  type = value  comment`` (for ``--help``)."""
    rows = _flat(cfg)
    kw = max((len(k) for k, *_ in rows), default=0)
    lines = []
    for key, value, tname, doc in rows:
        head = f"  {key.ljust(kw)}  {tname} = {_scalar(value)}"
        lines.append(head if not doc else f"{head}\n      {doc}"[: width * 3])
    return "\n".join(lines)


def to_yaml(cfg: Any, *, comments: bool = True) -> str:
    """The config as YAML that :func:`load_yaml` reads back, each field with its comment."""
    lines: list[str] = []

    def emit(obj, indent):
        docs = field_docs(type(obj)) if comments else {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            value = getattr(obj, f.name)
            pad = "  " * indent
            doc = f"  # {docs[f.name]}" if docs.get(f.name) else ""
            if dataclasses.is_dataclass(value):
                lines.append(f"{pad}{f.name}:{doc}")
                emit(value, indent + 1)
            else:
                lines.append(f"{pad}{f.name}: {_scalar(value)}{doc}")

    emit(cfg, 0)
    return "\n".join(lines) + "\n"


def load_config(
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    *,
    cls: type | None = None,
) -> Any:
    """Defaults < the YAML file at ``path`` (None: defaults only) < ``key.path=value`` overrides.

    Returns a frozen :class:`ExperimentConfig` (or ``cls``). Raises :class:`ConfigError` with the
    file and line, or the override, of the first bad key or value.
    """
    if cls is None:
        from rlhf_jax.pipeline import ExperimentConfig as cls  # the pipeline owns the schema
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        data, sources = load_yaml(path)
    data = apply_overrides(data, overrides, sources)
    return from_dict(cls, data, sources=sources)
