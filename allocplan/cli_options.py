"""The CLI's helpers: options built from the config dataclasses, one-line errors, shared options and output.

``config_options(ProfileConfig)`` decorates a command with one option per field
(flag, default, help, choices and minimum from the field's metadata); the
command receives the values under the field names, and :func:`build_config`
turns them back into the config, taking a recipe's values for options the user
did not give. :class:`OneLineErrors` turns every user error into one line and exit
status 2; the options and printing helpers that several commands share live here
too, so that ``allocplan/cli.py`` holds only the commands.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Callable

import click

import allocplan
from allocplan import display

from .formats.config import flag_of


def _option(item: dataclasses.Field, hint: Any, help_suffix: str = "", choices: Any = None) -> Callable:
    meta = item.metadata
    flag = flag_of(item)
    kwargs: dict[str, Any] = {"default": item.default, "help": meta["help"] + help_suffix,
                              "show_default": item.default is not None}
    real = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = real[0]
    choices = choices if choices is not None else meta.get("choices")
    if callable(choices):  # a registry's names, as registered when the CLI is built
        choices = choices()
    if base is bool:
        if "/" not in flag:
            kwargs.update(is_flag=True, show_default=False)
    elif meta.get("path"):
        kwargs["type"] = click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path)  # -: stdin
    elif choices is not None:
        choices = [str(c) if not isinstance(c, float) else f"{c:g}" for c in choices]
        kwargs["type"] = click.Choice(choices)
        kwargs["default"] = None if item.default is None else (f"{item.default:g}" if base is float else item.default)
        if base is float:
            kwargs["callback"] = lambda _ctx, _param, value: None if value is None else float(value)
    elif base is int:
        kwargs["type"] = click.IntRange(min=meta.get("minimum"), max=meta.get("maximum"))
    elif base is float:
        above = meta.get("above")
        kwargs["type"] = click.FloatRange(min=above if above is not None else meta.get("minimum"),
                                          max=meta.get("maximum"), min_open=above is not None)
    return click.option(flag, item.name, **kwargs)


def config_options(config_cls: type, exclude: tuple[str, ...] = (), *, help_suffix: dict[str, str] | None = None,
                   choices: dict[str, Any] | None = None) -> Callable[[Callable], Callable]:
    """Decorator adding an option for every field of ``config_cls`` (except ``exclude``).

    ``help_suffix`` and ``choices`` (field name -> text, values) add what only the CLI knows: the
    names of a registry that lives above the formats layer (methods, presets).
    """
    hints = typing.get_type_hints(config_cls)
    items = [item for item in dataclasses.fields(config_cls) if item.name not in exclude]
    help_suffix, choices = help_suffix or {}, choices or {}

    def decorate(func: Callable) -> Callable:
        for item in reversed(items):
            func = _option(item, hints[item.name], help_suffix.get(item.name, ""), choices.get(item.name))(func)
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


# ---------------------------------------------------------------- errors, options and output shared by commands

EXIT_USER_ERROR = 2


class OneLineErrors(click.Group):
    """Group whose errors print as ``allocplan: error: ...`` on one line (exit 2).

    ``two_word_commands`` maps a pair of words to a command of its own (``allocplan profile merge ...``
    is the ``profile merge`` command, not ``profile``).
    """

    two_word_commands: dict[tuple[str, str], click.Command] = {}

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        command = self.two_word_commands.get(tuple(args[:2]))
        if command is not None:
            return command.name, command, args[2:]
        return super().resolve_command(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("allocplan: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            fail(exc.format_message())
        except allocplan.AllocplanError as exc:
            fail(str(exc))
        except allocplan.SolverDisagreement as exc:
            click.echo(f"allocplan: internal error: solver cross-check failed: {exc}", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def fail(message: str) -> None:
    """The one-line error and exit status 2."""
    click.echo(f"allocplan: error: {' '.join(message.split())}", err=True)
    sys.exit(EXIT_USER_ERROR)


def echo_lines(lines: list[str], err: bool = False) -> None:
    for line in lines:
        click.echo(line, err=err)


def report_lines(lines: list[str], *outputs: Path | None) -> None:
    """Human-readable lines: to stdout, unless a result is being written there (``-o -``)."""
    echo_lines(lines, err=any(output is not None and str(output) == "-" for output in outputs))


# ``-`` is standard input for a file read and standard output for a file written.
existing_file = click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path)
output_file = click.Path(dir_okay=False, writable=False, allow_dash=True, path_type=Path)
model_option = click.option("--model", "model_name", required=True,
                             help="Local checkpoint directory, bundled:<name>, or hub id.")


def budget_options(func: Any) -> Any:
    func = click.option("--budget-activations", type=click.IntRange(min=1), default=None,
                        help="Absolute routed activations per token over all MoE layers.")(func)
    return click.option("--budget", "budget_ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
                        help="Fraction of the model's activations per token to keep, e.g. 0.5.")(func)


recipe_option = click.option("--recipe", "recipe_path", type=existing_file, default=None,
                              help="Take the budget and settings from this recipe (allocplan recipe);"
                                   " options given here override it.")


def verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """-v logs progress lines to stderr; -q silences progress bars and logs. Accepted before or after the verb."""
    if not value:
        return
    if param.name == "verbose":
        logging.basicConfig(level=logging.INFO, format="allocplan: %(message)s", force=True)
    else:
        allocplan.show_progress(False)
        logging.getLogger("allocplan").setLevel(logging.WARNING)


def common(func: Any) -> Any:
    func = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=verbosity,
                        help="No progress bars or log lines.")(func)
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=verbosity,
                        help="Log progress lines (profiling batches) to stderr.")(func)


json_option = click.option("--json", "as_json", is_flag=True,
                            help="Print the result as JSON on stdout (instead of the table).")


def plan_json(plan: Any, output: Path | None) -> str:
    return display.to_json({"wrote": None if output is None else str(output), "plan": display.plan_data(plan)})


def no_json_on_stdout(as_json: bool, *outputs: Path | None) -> None:
    if as_json and any(output is not None and str(output) == "-" for output in outputs):
        raise allocplan.AllocplanError("--json and -o - both write to standard output; give -o a file")


def budget_request(ratio: float | None, activations: int | None, recipe: Any) -> Any:
    if ratio is None and activations is None and recipe is not None and recipe.budget is not None:
        return recipe.budget
    return allocplan.BudgetRequest(ratio=ratio, activations=activations)


def quiet_transformers() -> None:
    """Silence transformers' bars and advisories even when it was imported before the CLI ran."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """A warning as one line on stderr (Python's default adds the file, line number and source)."""
    text = " ".join(str(message).split())
    click.echo(text if text.startswith("allocplan:") else f"allocplan: warning: {text}", err=True)


def load_flags_need_model(model_name: str | None, options: dict[str, Any]) -> None:
    """Refuse ``--revision`` or ``--trust-remote-code`` without the ``--model`` they say how to load.

    Raises:
        AllocplanError: naming the first such flag.
    """
    given = [flag for flag, value in (("--revision", options.get("revision")),
                                      ("--trust-remote-code", options.get("trust_remote_code"))) if value]
    if given and model_name is None:
        raise allocplan.AllocplanError(f"{given[0]} says how to load --model, which is not given; add --model or"
                                       f" leave {given[0]} out")
