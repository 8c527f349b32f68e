"""Experiment configs: frozen, typed, nested dataclasses loaded from YAML with overrides.

One experiment config (``rlhf_jax.pipeline.ExperimentConfig``) describes a whole pipeline (SFT,
reward model, PPO) and where it runs. It is composed from the configs the library modules own —
``SFTConfig``, ``RewardModelConfig``, ``PPOConfig``, ``OptimConfig``, ``LoopConfig``,
``ParallelConfig`` — so a field is documented once, where it is used. A config comes from four
layers, each overriding the one before::

    dataclass defaults  <  the chosen preset's source defaults  <  a YAML file  <  overrides

- *dataclass defaults* include a section's default in its parent, which may differ from the section
  class's own defaults (``PPOConfig.optim`` keeps ``eps=1e-5`` when only its learning rate is set);
- *the chosen preset's source defaults*: a section with a ``preset`` field set explicitly (in the
  file or an override) to a name of :data:`rlhf_jax.presets.PRESETS` (``ppo.trainer.preset=
  lm-human-preferences``) also takes that source's default hyperparameters
  (:class:`rlhf_jax.presets.SourceDefaults`: ``kl_coef``, ``kl_controller``, ``kl_target``, ...)
  for the fields of the section it has and that the file and overrides do not set. A source default
  of None (the source has no such number) leaves the field alone. A preset that only comes from a
  dataclass default applies nothing; ``rlhf-jax`` (the library's own) changes no default.

:func:`load_config` does the layering (PyYAML parses) and :func:`from_dict` the typed conversion:
pydantic validates the nested mapping against the dataclasses themselves (strict types, unknown
keys forbidden, ``__post_init__`` run), and this module rewrites its errors into one line that says
what to change:

- an unknown key names the file and line (or the override) and lists the close matches and the
  keys that section accepts;
- a wrong type names the key path, the type it expects and the value it got;
- a value a config's ``__post_init__`` rejects is reported with the section path it sits at and
  where it was set.

Override values are YAML scalars or flow collections: ``ppo.trainer.kl_coef=0.05``,
``run.wandb_project=null``, ``parallel.mesh.data=-1``, ``sft.data.stop_tokens=[0,2]``. Floats may
be written ``1e-5`` (read as a float, as YAML 1.2 does; PyYAML alone reads it as a string).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import inspect
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic
import yaml

from rlhf_jax import presets
from rlhf_jax.errors import UsageError

__all__ = [
    "ConfigError",
    "load_config",
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
# Layering: a section's default in its parent < the chosen preset's source defaults < given keys
# ------------------------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _section_class(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (``X`` or ``X | None``), else None."""
    arms = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    found = [a for a in arms if dataclasses.is_dataclass(a) and isinstance(a, type)]
    return found[0] if len(found) == 1 and len(arms) == 1 else None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _preset_defaults(cls: type, given: Mapping[str, Any]) -> dict[str, Any]:
    """The source defaults of the preset ``given`` names, for the fields of ``cls`` not given."""
    names = _init_fields(cls)
    chosen = given.get("preset") if "preset" in names else None
    preset = presets.PRESETS.get(chosen) if isinstance(chosen, str) else None
    if preset is None:  # no preset chosen here, or a name the dataclass itself rejects
        return {}
    source = to_dict(preset.defaults)
    return {k: v for k, v in source.items() if k in names and k not in given and v is not None}


def _layer(cls: type, given: Mapping[str, Any], base: Mapping[str, Any] | None) -> dict[str, Any]:
    """The mapping validated for section ``cls``: ``base`` (its default in the parent) < the chosen
    preset's source defaults < ``given``, recursively into the sections ``given`` sets."""
    out = {**(base or {}), **_preset_defaults(cls, given)}
    fields = _init_fields(cls)
    for key, value in given.items():
        sub = _section_class(_hints(cls)[key]) if key in fields else None
        if sub is not None and isinstance(value, Mapping):
            outer = (base or {}).get(key) if base else to_dict(_default(fields[key]))
            value = _layer(sub, value, outer if isinstance(outer, Mapping) else None)
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------
# Validation (pydantic) and its errors
# ------------------------------------------------------------------------------------------

# Strict types (a bool is no float, "5" no int), unknown keys forbidden. Validated from JSON, where
# strict mode still takes arrays for tuples and mappings for dataclasses; the nested stdlib
# dataclasses inherit this config (none of ours sets ``__pydantic_config__``).
_STRICT = pydantic.ConfigDict(extra="forbid", strict=True)


@functools.cache
def _validator(cls: type) -> type[pydantic.BaseModel]:
    return pydantic.create_model(f"_{cls.__name__}Input", __config__=_STRICT, value=(cls, ...))


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


def _locate(cls: type, loc: Sequence[str | int], path: str) -> tuple[str, Any, Any, type]:
    """Follow a pydantic error location through the schema: ``(key path, the field's declared
    type, the type the error is about, the section it sits in)``."""
    declared = tp = section = cls
    for item in loc:
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            if len(arms) > 1:  # pydantic names the arm it tried ('int', 'PPOConfig', ...)
                tp = next((a for a in arms if getattr(a, "__name__", None) == item), Any)
                continue
            tp = arms[0]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            section, tp = tp, _hints(tp).get(item, Any)
            path = f"{path}.{item}" if path else str(item)
        elif isinstance(item, int):
            path += f"[{item}]"
            fixed = typing.get_origin(tp) is tuple and Ellipsis not in args
            tp = args[item] if fixed and item < len(args) else (args[0] if args else Any)
        else:  # a key of a mapping
            path += f".{item}"
            tp = args[-1] if args else Any
        declared = tp
    return path, declared, tp, section


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


def _unknown_key(section: type, path: str, sources: Mapping[str, str]) -> str:
    names = list(_init_fields(section))
    parent, _, key = path.rpartition(".")
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    msg = f"{_where(path, sources)}unknown key {path!r}"
    if close:
        prefix = f"{parent}." if parent else ""
        msg += f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?"
    else:
        msg += "."
    section_name = f"{parent or 'the top level'} ({section.__name__})"
    return f"{msg} The keys of {section_name} are: {', '.join(names)}"


def _explain(err: Mapping[str, Any], errors, cls: type, prefix: str, sources) -> str:
    """One line for the first pydantic error: where it was set, the key path and what to do."""
    path, declared, tp, section = _locate(cls, err["loc"][1:], prefix)
    kind, value = err["type"], err.get("input")
    if kind == "unexpected_keyword_argument":
        return _unknown_key(section, path, sources)
    if kind == "missing":
        parent = path.rpartition(".")[0]
        missing = [e["loc"][-1] for e in errors if e["type"] == "missing"]
        missing = [m for m in missing if m in _init_fields(section)]
        where = parent or "the top level"
        return f"{where} ({section.__name__}): required keys missing: {', '.join(missing)}"
    if kind in ("value_error", "assertion_error"):
        return f"{_section_source(path, sources)}in {path or 'the config'}: {err['ctx']['error']}"
    where = _where(path, sources)
    if kind in ("literal_error", "enum"):
        choices = ", ".join(map(repr, typing.get_args(tp))) or err["ctx"]["expected"]
        return f"{where}{path}={value!r}: choose one of {choices}"
    if kind in ("too_long", "too_short") and typing.get_origin(tp) is tuple:
        want = len(typing.get_args(tp))
        return (
            f"{where}{path}: expected {want} items ({_type_name(tp)}), got {len(value)}: {value!r}"
        )
    got = "a mapping" if isinstance(value, Mapping) else type(value).__name__
    hint = ""
    if _section_class(declared) is not None:
        hint = f" (a section: set its keys, e.g. {path}.<key>=...)"
    return f"{where}{path}: expected {_type_name(declared)}, got {got} {value!r}{hint}"


def from_dict(
    cls: type, data: Mapping[str, Any] | None, *, sources=None, path: str = "", base: Any = None
) -> Any:
    """Build the dataclass ``cls`` from nested plain data, checking every key and type.

    Args:
      cls: a (frozen) dataclass type; nested dataclass fields take nested mappings.
      data: the values; missing keys take the defaults (the section's default in its parent, and
        the source defaults of a preset ``data`` chooses: see the module docstring).
      sources: optional ``{key path: "file.yaml:12"}`` used to point errors at their origin.
      path: the key path of ``data`` inside a bigger config (for messages).
      base: a ``cls`` instance whose values stand in for the dataclass defaults (e.g. the
        quickstart's tuned config under a user's YAML and overrides).
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'the config'}: expected a mapping of keys, got {data!r}")
    sources = sources or {}
    validator = _validator(cls)  # outside the try: a schema pydantic cannot build is a bug here
    below = None if base is None else to_dict(base)
    text = json.dumps({"value": to_dict(_layer(cls, data, below))}, default=str)
    try:
        return validator.model_validate_json(text).value
    except pydantic.ValidationError as err:
        errors = err.errors()
        cause = errors[0].get("ctx", {}).get("error")
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(_explain(errors[0], errors, cls, path, sources)) from None
    except TypeError as err:  # a __post_init__ check that raised TypeError, not ValueError
        raise ConfigError(
            f"{_section_source(path, sources)}in {path or 'the config'}: {err}"
        ) from err


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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats without a dot (``1e-5``, ``3E+2``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's complaint on one line (its ``str`` quotes the text over several)."""
    parts = (getattr(err, "context", None), getattr(err, "problem", None))
    return ", ".join(p for p in parts if p) or str(err).splitlines()[0]


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
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {_yaml_problem(err)}") from None
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
            f"override {text!r}: write key.path=value, e.g. ppo.trainer.optim.learning_rate=1e-5"
        )
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)})"
        ) from None
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
    base: Any = None,
) -> Any:
    """Defaults < the YAML file at ``path`` (None: defaults only) < ``key.path=value`` overrides.

    Returns a frozen :class:`ExperimentConfig` (or ``cls``). ``base``, a ``cls`` instance, replaces
    the dataclass defaults (the quickstart's tuned config). Raises :class:`ConfigError` with the
    file and line, or the override, of the first bad key or value.
    """
    if cls is None:
        from rlhf_jax.pipeline import ExperimentConfig as cls  # the pipeline owns the schema
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        data, sources = load_yaml(path)
    data = apply_overrides(data, overrides, sources)
    if base is not None:
        cls = type(base)
    return from_dict(cls, data, sources=sources, base=base)
