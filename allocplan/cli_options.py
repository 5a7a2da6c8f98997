"""Click options built from the config dataclasses, so each default, help text and bound is written once.

``config_options(ProfileConfig)`` decorates a command with one option per field
(flag, default, help, choices and minimum from the field's metadata); the
command receives the values under the field names, and :func:`build_config`
turns them back into the config, taking a recipe's values for options the user
did not give.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable

import click

from .formats.config import flag_of


def _option(item: dataclasses.Field, hint: Any) -> Callable:
    meta = item.metadata
    flag = flag_of(item)
    kwargs: dict[str, Any] = {"default": item.default, "help": meta["help"], "show_default": item.default is not None}
    real = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = real[0]
    if base is bool:
        if "/" not in flag:
            kwargs.update(is_flag=True, show_default=False)
    elif meta.get("path"):
        kwargs["type"] = click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path)  # -: stdin
    elif meta.get("choices") is not None:
        choices = [str(c) if not isinstance(c, float) else f"{c:g}" for c in meta["choices"]]
        kwargs["type"] = click.Choice(choices)
        kwargs["default"] = None if item.default is None else (f"{item.default:g}" if base is float else item.default)
        if base is float:
            kwargs["callback"] = lambda _ctx, _param, value: None if value is None else float(value)
    elif base is int:
        kwargs["type"] = click.IntRange(min=meta.get("minimum"), max=meta.get("maximum"))
    elif base is float:
        kwargs["type"] = click.FloatRange(min=meta.get("minimum"), max=meta.get("maximum"))
    return click.option(flag, item.name, **kwargs)


def config_options(config_cls: type, exclude: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator adding an option for every field of ``config_cls`` (except ``exclude``)."""
    hints = typing.get_type_hints(config_cls)
    items = [item for item in dataclasses.fields(config_cls) if item.name not in exclude]

    def decorate(func: Callable) -> Callable:
        for item in reversed(items):
            func = _option(item, hints[item.name])(func)
        return func

    return decorate


def build_config(config_cls: type, values: dict[str, Any], base: Any = None) -> Any:
    """The config from command-line ``values`` (consumed from the dict); options left at their
    default take ``base``'s value (a recipe's), where a base is given."""
    ctx = click.get_current_context()
    chosen = {}
    for item in dataclasses.fields(config_cls):
        if item.name not in values:
            continue
        value = values.pop(item.name)
        given = ctx.get_parameter_source(item.name) not in (click.core.ParameterSource.DEFAULT, None)
        if base is not None and not given:
            value = getattr(base, item.name)
        if isinstance(value, Path):
            value = str(value)
        chosen[item.name] = value
    return config_cls(**chosen) if base is None else dataclasses.replace(base, **chosen)
