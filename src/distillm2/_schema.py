"""The config schema machinery behind :mod:`distillm2.config`: fields that carry their help
and valid values, the strict loader (unknown keys, types including list elements, valid
values), ``--set`` overrides, and the commented YAML of ``distillm2 config show``. It knows no
command; config.py declares them."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import field
from pathlib import Path

import yaml

from distillm2._version import __version__
from distillm2.errors import ConfigError


def opt(default=None, help: str = "", *, choices=None, factory=None, noun: str = "value",  # noqa: A002
        bounds: str | None = None):
    """A config field: ``default`` (or ``factory`` for lists), one line of ``help``, optional
    ``choices`` (a tuple, or ``"module:attribute"`` naming the owner's table), the ``noun``
    an invalid value is called in the error, and for numbers the interval they must lie in,
    written as in maths (``bounds="(0, 1]"``, ``"[1, inf)"``; list elements each)."""
    if bounds is not None:
        _interval(bounds)  # a malformed interval fails at import, not when a user hits it
    meta = {"help": help, "choices": choices, "noun": noun, "bounds": bounds}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# Loading and checking ------------------------------------------------------------------------


def _interval(text: str) -> tuple[bool, float, float, bool]:
    """``"(0, 1]"`` -> (low closed?, low, high, high closed?)."""
    low, high = (part.strip() for part in text.strip()[1:-1].split(","))
    return text.strip()[0] == "[", float(low), float(high), text.strip()[-1] == "]"


def check_bounds(key: str, value, bounds: str | None) -> None:
    """Raise a ConfigError naming ``key`` when the number ``value`` (or an element of a list) is
    outside ``bounds``."""
    if bounds is None or value is None:
        return
    closed_low, low, high, closed_high = _interval(bounds)
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        inside = (item >= low if closed_low else item > low) and (item <= high if closed_high else item < high)
        if not inside:
            raise ConfigError(f"{key}: must be in {bounds}, got {item!r}")


def resolve_choices(choices) -> tuple | None:
    """A field's valid values: the tuple itself, or the keys of the table a string names."""
    if choices is None or isinstance(choices, tuple):
        return choices
    module, _, attr = choices.partition(":")
    return tuple(getattr(importlib.import_module(module), attr))


def _descriptions(choices) -> dict[str, str]:
    """``{name: description}`` of a choices table whose entries carry a ``description``."""
    if not isinstance(choices, str):
        return {}
    module, _, attr = choices.partition(":")
    table = getattr(importlib.import_module(module), attr)
    if not isinstance(table, dict):
        return {}
    return {k: v.description for k, v in table.items() if getattr(v, "description", None)}


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
            f"valid keys{' in ' + where.rstrip('.') if where else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint, key = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
            continue
        valid = resolve_choices(fields[name].metadata.get("choices"))
        value = _coerce(_yaml_word(value, valid), hint, key)
        check_bounds(key, value, fields[name].metadata.get("bounds"))
        if valid is not None and value is not None:
            for item in value if isinstance(value, list) else [value]:
                if item not in valid:
                    noun = fields[name].metadata.get("noun", "value")
                    raise ConfigError(f"{key}: unknown {noun} {item!r}; valid: {', '.join(map(str, valid))}")
        kwargs[name] = value
    return cls(**kwargs)


# YAML 1.1 reads these words as booleans; a choice-valued field that has one of them among its
# choices means the word (``train.mixed_precision: no``, ``--set train.mixed_precision=no``).
_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _yaml_word(value, valid):
    if isinstance(value, bool) and valid:
        for word in _BOOL_WORDS[value]:
            if word in valid:
                return word
    return value


def _scalar(value, kind):
    """``value`` as ``kind`` (bool/int/float/str/dict), or raise TypeError."""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    if kind is str and isinstance(value, str):
        return value
    if kind is dict and isinstance(value, dict):
        return value
    raise TypeError


def _coerce(value, hint, key):
    """Check ``value`` against its annotation: a scalar, ``list[X]`` (every element checked), a
    union of those, optionally None."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{key}: may not be null")
    options = [a for a in args if a is not type(None)] if typing.get_origin(hint) is typing.Union or \
        type(hint).__name__ == "UnionType" else [hint]
    for option in options:
        if typing.get_origin(option) is list:
            if isinstance(value, str) and typing.get_args(option) == (str,):
                value = [item.strip() for item in value.split(",") if item.strip()]  # "a" or "a,b", as the flags
            if not isinstance(value, list):
                continue
            (element,) = typing.get_args(option) or (object,)
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(item if element is object else _scalar(item, element))
                except TypeError:
                    raise ConfigError(f"{key}[{i}]: expected {element.__name__}, got {item!r}") from None
            return out
        try:
            return _scalar(value, option)
        except TypeError:
            continue
    expected = " or ".join(_type_name(o) for o in options)
    hint = " (YAML reads yes/no/on/off as booleans: quote the word)" if isinstance(value, bool) and str in options else ""
    raise ConfigError(f"{key}: expected {expected}, got {value!r}{hint}")


def _type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _check(cfg) -> None:
    """The checks across fields (one field's range is its ``bounds``)."""
    train = getattr(cfg, "train", None)
    if train is not None and hasattr(train, "teacher_topk"):
        check_topk_setting(train.teacher_topk, train.fused_loss)
    generation = getattr(cfg, "generation", None)
    if generation is not None and not generation.greedy and generation.temperature <= 0:
        raise ConfigError(f"generation.temperature: sampling needs a temperature > 0, got {generation.temperature} "
                          "(set generation.greedy: true for greedy decoding)")
    loss = getattr(cfg, "loss", None)
    if loss is not None and loss.alpha_min > loss.alpha_max:
        raise ConfigError(f"loss.alpha_min ({loss.alpha_min}) must not exceed loss.alpha_max ({loss.alpha_max})")


def check_topk_setting(k: int, fused: bool) -> None:
    """``train.teacher_topk`` on its own and against ``train.fused_loss`` (at load time, and again
    by the Trainer for configs built in code)."""
    if k < 0:
        raise ConfigError(f"train.teacher_topk must be >= 0 (0: exact teacher logits), got {k}")
    if k and fused:
        raise ConfigError("train.teacher_topk cannot be combined with train.fused_loss (the fused path never forms "
                          "the teacher's logits); set one of them")


def set_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: {raw!r} is not a YAML value") from None
    set_value(data, key.strip(), value)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path``; a missing file or bad YAML is a :class:`ConfigError`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    loaded.pop("version", None)  # written by to_yaml; informational
    return loaded


def set_value(data: dict, key: str, value) -> None:
    """Set the dotted ``key`` of a nested dict to ``value``."""
    *parents, last = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    data[last] = value


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None, values: dict | None = None):
    """Build ``cls`` from ``base`` defaults, then an optional YAML file over them, then
    ``values`` (dotted key -> value, e.g. from command-line flags), then ``key=value``
    overrides; checks keys, types and valid values."""
    data: dict = _merge({}, base) if base else {}
    if path is not None:
        data = _merge(data, read_yaml(path))
    for key, value in (values or {}).items():
        set_value(data, key, value)
    for assignment in overrides or []:
        set_override(data, assignment)
    try:
        cfg = _build(cls, data, "")
    except ConfigError as err:
        # Blame what set the key: a flag or --set (the later sources win), else the YAML file.
        given = {*(values or {})} | {a.split("=", 1)[0].strip() for a in overrides or [] if "=" in a}
        if any(str(err).startswith(key) for key in given):
            raise ConfigError(f"--set {err}") from None
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
    _check(cfg)
    return cfg


def _merge(dst: dict, src: dict) -> dict:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = value
    return dst


def to_dict(cfg) -> dict:
    """The config as plain nested dicts."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    """The config as YAML with the package version on top (written into run directories)."""
    return yaml.safe_dump({"version": __version__, **to_dict(cfg)}, sort_keys=False)


def describe(cls, indent: int = 0) -> str:
    """Every key of ``cls`` with its default, valid values and help, as commented YAML."""
    lines = []
    pad = "  " * indent
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        meta = f.metadata
        if dataclasses.is_dataclass(hint):
            lines.append(f"{pad}{f.name}:  # {meta.get('help', '')}")
            lines.append(describe(hint, indent + 1))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
        value = value.removesuffix("\n...").removesuffix("...").strip()
        note = meta.get("help", "")
        choices = resolve_choices(meta.get("choices"))
        if choices:
            note += f" [{' | '.join(map(str, choices))}]"
        if meta.get("bounds"):
            note += f" (in {meta['bounds']})"
        lines.append(f"{pad}{f.name}: {value}  # {note}")
        for name, what in _descriptions(meta.get("choices")).items():
            lines.append(f"{pad}  #   {name}: {what}")
    return "\n".join(lines)
