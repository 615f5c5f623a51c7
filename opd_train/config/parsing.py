"""Command line and YAML -> flat values -> :class:`~.sections.Config` (dataclass default < YAML < flag)."""
from __future__ import annotations

import argparse
import os
import typing
from dataclasses import fields
from typing import Any

from .sections import FIELD_SECTION, SECTIONS, Config, ConfigError, unknown_key_message


def _field_type(cls, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every config flag to ``parser`` with default SUPPRESS (so only explicitly given flags are present)."""
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file of flag values (flags given on the command line win)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__.strip().splitlines()[0]})")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            meta, typ = f.metadata, _field_type(cls, f.name)
            # help texts that explain their default themselves ("(default: the student's ...)") keep theirs
            help_text = meta["help"] if "(default:" in meta["help"] else f"{meta['help']} (default: {f.default})"
            if typ is bool:
                # "--no-x" fields (slime's --no-load-optim, ...) are plain switches: argparse's BooleanOptionalAction
                # would read a "--no-" prefix as "False".
                action = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
                group.add_argument(flag, action=action, default=argparse.SUPPRESS, help=help_text)
                continue
            if typing.get_origin(typ) is tuple:           # slime's name lists: --flag A B C
                group.add_argument(flag, type=str, nargs="+", default=argparse.SUPPRESS, metavar=meta["metavar"],
                                   help=help_text)
                continue
            conv = {int: int, float: float, str: str}[typ]
            # slime writes --eval-prompt-data NAME PATH: one or two values, the path last
            nargs = "+" if f.name == "eval_prompt_data" else None
            group.add_argument(flag, type=conv, default=argparse.SUPPRESS, choices=meta["choices"],
                               metavar=meta["metavar"], help=help_text, nargs=nargs)


def load_yaml(path: str) -> dict[str, Any]:
    """Flat ``{field: value}`` from a YAML file (flat or nested under section names)."""
    import yaml
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: file not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping of flag names to values")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                sub = str(sub).replace("-", "_")
                if FIELD_SECTION.get(sub) != key:
                    raise ConfigError(f"--config {path!r}: {unknown_key_message(sub)} (in section {key!r})")
                flat[sub] = v
        elif key in FIELD_SECTION:
            flat[key] = value
        else:
            raise ConfigError(f"--config {path!r}: {unknown_key_message(key)}")
    return flat


def _coerce(key: str, value: Any) -> Any:
    """Type-check a YAML value against its field (ints are accepted for floats)."""
    cls = SECTIONS[FIELD_SECTION[key]]
    typ = _field_type(cls, key)
    if value is None:
        return None
    if typing.get_origin(typ) is tuple:                    # a list of strings (one string: a list of one)
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"--{key.replace('_', '-')} takes one or more strings, got {value!r}")
        return tuple(items)
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)          # YAML reads "1e-3" as a string
        except ValueError:
            pass
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"--{key.replace('_', '-')} must be of type {typ.__name__}, got {value!r}")
    return value


def build_config(values: dict[str, Any], defaults: dict[str, Any] | None = None) -> Config:
    """A :class:`Config` from flat values over (optional) flat defaults; not validated yet."""
    merged = {**(defaults or {}), **values}
    by_section: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in merged.items():
        if key not in FIELD_SECTION:
            raise ConfigError(unknown_key_message(key))
        by_section[FIELD_SECTION[key]][key] = _coerce(key, value)
    return Config(**{name: SECTIONS[name](**kw) for name, kw in by_section.items()})


def explicit_values(namespace: argparse.Namespace) -> dict[str, Any]:
    """Flat values given explicitly: the YAML file's, overridden by command-line flags."""
    given = dict(vars(namespace))
    path = given.pop("config", None)
    given.pop("command", None)
    values = load_yaml(path) if path else {}
    values.update({k: v for k, v in given.items() if k in FIELD_SECTION})
    if isinstance(values.get("eval_prompt_data"), list):
        data = values["eval_prompt_data"]
        if len(data) > 2:
            raise ConfigError(f"--eval-prompt-data takes PATH or NAME PATH (one evaluation set), got {data}")
        values["eval_prompt_data"] = data[-1]
    return values


