"""The ``allocplan`` command line: a thin click layer over the public verbs of :mod:`allocplan`.

Options come from the config dataclasses (:mod:`allocplan.cli_options`), the work
from the public verbs, and the printed text from :mod:`allocplan.display`. Every
user error ends in one line on stderr and exit status 2; outputs are written
atomically, so a failed command leaves no partial file.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

import allocplan
from allocplan import display
from allocplan.cli_options import build_config, config_options
from allocplan import LoadConfig, ProfileConfig, RoutingConfig

EXIT_USER_ERROR = 2


class _OneLineErrors(click.Group):
    """Group whose errors print as ``allocplan: error: ...`` on one line (exit 2)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("allocplan: aborted", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            _fail(exc.format_message())
        except allocplan.AllocplanError as exc:
            _fail(str(exc))
        except allocplan.SolverDisagreement as exc:
            click.echo(f"allocplan: internal error: solver cross-check failed: {exc}", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    click.echo(f"allocplan: error: {' '.join(message.split())}", err=True)
    sys.exit(EXIT_USER_ERROR)


def _echo(lines: list[str], err: bool = False) -> None:
    for line in lines:
        click.echo(line, err=err)


_existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
_output_file = click.Path(dir_okay=False, writable=False, path_type=Path)
_model_option = click.option("--model", "model_name", required=True,
                             help="Local checkpoint directory, bundled:<name>, or hub id.")


def _budget_options(func: Any) -> Any:
    func = click.option("--budget-activations", type=click.IntRange(min=1), default=None,
                        help="Absolute routed activations per token over all MoE layers.")(func)
    return click.option("--budget", "budget_ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
                        help="Fraction of the model's activations per token to keep, e.g. 0.5.")(func)


_recipe_option = click.option("--recipe", "recipe_path", type=_existing_file, default=None,
                              help="Take the budget and settings from this recipe (allocplan recipe);"
                                   " options given here override it.")


def _budget(ratio: float | None, activations: int | None, recipe: Any) -> Any:
    if ratio is None and activations is None and recipe is not None and recipe.budget is not None:
        return recipe.budget
    return allocplan.BudgetRequest(ratio=ratio, activations=activations)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="allocplan", prog_name="allocplan")
@click.option("-v", "--verbose", is_flag=True, help="Log progress (profiling batches) to stderr.")
def cli(verbose: bool) -> None:
    """Plan and apply per-layer expert budgets for Mixture-of-Experts models (Alloc-MoE).

    \b
    Typical use:
      allocplan compile --model bundled:ref-olmoe --budget 0.5 -o plan.yaml
      allocplan validate plan.yaml --model bundled:ref-olmoe
      allocplan apply plan.yaml --prompt "The if statement"
    """
    # transformers' progress bars and advisory warnings would break the one-line error
    # contract and bury the table; set before transformers is first imported.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if verbose:
        logging.basicConfig(level=logging.INFO, format="allocplan: %(message)s")


def _quiet_transformers() -> None:
    """Silence transformers' bars and advisories even when it was imported before the CLI ran."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@cli.command("compile")
@_model_option
@config_options(ProfileConfig)
@_budget_options
@config_options(RoutingConfig)
@config_options(LoadConfig)
@_recipe_option
@click.option("-o", "--output", type=_output_file, required=True, help="Plan file to write.")
@click.option("--profile-out", type=_output_file, default=None, help="Also write the sensitivity profile here.")
def compile_command(model_name: str, output: Path, profile_out: Path | None, recipe_path: Path | None,
                    budget_ratio: float | None, budget_activations: int | None, **options: Any) -> None:
    """Profile a model on calibration text and solve its per-layer top-k (Alloc-L)."""
    _quiet_transformers()
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    profile = build_config(ProfileConfig, options, recipe.profile if recipe else None)
    routing = build_config(RoutingConfig, options, recipe.routing if recipe else None)
    plan = allocplan.compile_plan(model_name, _budget(budget_ratio, budget_activations, recipe), profile=profile,
                                  routing=routing, load=build_config(LoadConfig, options), profile_out=profile_out)
    allocplan.save_plan(plan, output)
    _echo(display.plan_lines(plan))
    click.echo(f"wrote {output}")


@cli.command("profile")
@_model_option
@config_options(ProfileConfig)
@config_options(LoadConfig)
@_recipe_option
@click.option("-o", "--output", type=_output_file, required=True, help="Profile file to write.")
def profile_command(model_name: str, output: Path, recipe_path: Path | None, **options: Any) -> None:
    """Measure per-layer sensitivities S[l, k] and write them as a profile."""
    _quiet_transformers()
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    profile = build_config(ProfileConfig, options, recipe.profile if recipe else None)
    model, tokenizer = allocplan.load_model(model_name, build_config(LoadConfig, options))
    measured = allocplan.profile_model(model, tokenizer, profile, model_name=model_name)
    allocplan.save_profile(measured, output)
    click.echo(f"wrote {output}: {len(measured.layers)} MoE layers, reference NLL "
               f"{measured.measurement.reference_nll:.4f} on {measured.measurement.calibration.tokens} tokens")


@cli.command("solve")
@click.argument("profile_path", type=_existing_file, metavar="PROFILE")
@_budget_options
@config_options(RoutingConfig)
@_recipe_option
@click.option("-o", "--output", type=_output_file, required=True, help="Plan file to write.")
def solve_command(profile_path: Path, budget_ratio: float | None, budget_activations: int | None, output: Path,
                  recipe_path: Path | None, **options: Any) -> None:
    """Solve a stored profile at a budget (no model is loaded)."""
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    routing = build_config(RoutingConfig, options, recipe.routing if recipe else None)
    plan = allocplan.solve_profile(allocplan.load_profile(profile_path),
                                   _budget(budget_ratio, budget_activations, recipe), routing)
    allocplan.save_plan(plan, output)
    _echo(display.plan_lines(plan))
    click.echo(f"wrote {output}")


@cli.command("recipe")
@config_options(ProfileConfig)
@_budget_options
@config_options(RoutingConfig)
@click.option("-o", "--output", type=_output_file, default=None, help="Write the recipe here [default: stdout].")
def recipe_command(budget_ratio: float | None, budget_activations: int | None, output: Path | None,
                   **options: Any) -> None:
    """Write the compile settings given here (defaults for the rest) as a YAML recipe."""
    budget = None
    if budget_ratio is not None or budget_activations is not None:
        budget = allocplan.BudgetRequest(ratio=budget_ratio, activations=budget_activations)
    recipe = allocplan.Recipe(budget=budget, profile=build_config(ProfileConfig, options),
                              routing=build_config(RoutingConfig, options))
    if output is None:
        click.echo(recipe.to_yaml(), nl=False)
    else:
        allocplan.save_recipe(recipe, output)
        click.echo(f"wrote {output}")


@cli.command("apply")
@click.argument("plan_path", type=_existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None, help="Model to load [default: the one named in the plan].")
@click.option("--prompt", default=None, help="Generate from this prompt with the plan applied.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@config_options(LoadConfig)
def apply_command(plan_path: Path, model_name: str | None, prompt: str | None, max_new_tokens: int,
                  **options: Any) -> None:
    """Load a model, apply a plan and show it (optionally generate from a prompt)."""
    _quiet_transformers()
    plan = allocplan.load_plan(plan_path)
    name = model_name or plan.model.name
    model, tokenizer = allocplan.load_model(name, build_config(LoadConfig, options))
    with allocplan.apply_plan(model, plan):
        click.echo(f"applied {plan_path} to {name}")
        _echo(display.plan_lines(plan))
        if prompt is not None:
            click.echo("generated: " + allocplan.generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens))


@cli.command("validate")
@click.argument("plan_path", type=_existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None,
              help="Also check the plan's fingerprint against this model's config (no weights loaded).")
@config_options(LoadConfig, exclude=("device", "dtype"))
def validate_command(plan_path: Path, model_name: str | None, **options: Any) -> None:
    """Check a plan's schema and budget arithmetic, and optionally its model fingerprint."""
    plan = allocplan.load_plan(plan_path)
    message = f"{plan_path}: valid plan for {plan.model.name} ({plan.model.model_type}, {plan.model.fingerprint})"
    if model_name is not None:
        _quiet_transformers()
        allocplan.check_plan_for_model(plan, model_name, build_config(LoadConfig, options))
        message += f"; matches {model_name}"
    click.echo(message)


@cli.command("eval")
@_model_option
@click.option("--plan", "plan_path", type=_existing_file, default=None, help="Evaluate with this plan applied.")
@click.option("--method", default=None,
              help=f"Evaluate a registered routing method at --budget instead of a plan: {', '.join(allocplan.METHODS)}"
                   " (docs/results.md).")
@click.option("--budget", "budget_ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Budget ratio for --method.")
@click.option("--data", type=_existing_file, required=True, help="UTF-8 text for NLL (never calibrate on it).")
@click.option("--arith", type=_existing_file, default=None, help="Arithmetic problems, one 'a+b=c' per line.")
@click.option("--calib", type=_existing_file, default=None,
              help="Calibration text for methods that need it [default: the bundled calibration text].")
@click.option("--profile", "profile_path", type=_existing_file, default=None,
              help="Sensitivity profile for alloc-l / alloc-lt [default: profile --calib now].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --method random.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="Tokens of --data to score.")
@config_options(LoadConfig)
def eval_command(model_name: str, plan_path: Path | None, method: str | None, budget_ratio: float | None,
                 data: Path, arith: Path | None, calib: Path | None, profile_path: Path | None, seed: int,
                 seq_len: int, max_tokens: int, **options: Any) -> None:
    """Measure NLL, arithmetic accuracy and activations under a plan or a method (JSON on stdout)."""
    _quiet_transformers()
    result = allocplan.run_eval(model_name, data=data, plan=plan_path, method=method, budget_ratio=budget_ratio,
                                arith=arith, calib=calib, profile=profile_path, seed=seed, seq_len=seq_len,
                                max_tokens=max_tokens, load=build_config(LoadConfig, options))
    click.echo(display.to_json(result))
    _echo(display.eval_lines(result), err=True)


@cli.command("bench")
@click.option("--model", "model_name", default=None, help="Trained model to time (with --plan).")
@click.option("--plan", "plan_path", type=_existing_file, default=None, help="Plan to time against the untouched model.")
@click.option("--config", "preset", type=click.Choice(list(allocplan.BENCH_PRESETS)), default=None,
              help="Time a randomly initialised model of this shape, planned uniformly at --budget.")
@click.option("--budget", "budget_ratio", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Budget of the uniform plan for --config.")
@click.option("--token-level/--no-token-level", default=False, show_default=True,
              help="Alloc-T for the --config plan (fractional budgets always use it).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Prefill batch size.")
@click.option("--prompt-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--profile-cost", is_flag=True,
              help="Also time profiling with allocplan's reuse and naively (a full forward per (layer, k)).")
@click.option("--solver-cost", is_flag=True, help="Also time the DP and the ILP on a 60-layer, k<=16 instance.")
@click.option("--breakdown", is_flag=True,
              help="Also split prefill and decode time into router, expert matmuls, other expert work and the rest.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads [default: torch's].")
def bench_command(model_name: str | None, plan_path: Path | None, preset: str | None, budget_ratio: float,
                  token_level: bool, batch: int, prompt_len: int, new_tokens: int, repeat: int,
                  profile_cost: bool, solver_cost: bool, breakdown: bool, threads: int | None) -> None:
    """Time prefill and decode without and with a plan, side by side (JSON on stdout)."""
    _quiet_transformers()
    result = allocplan.run_bench(plan=plan_path, model_name=model_name, preset=preset, budget_ratio=budget_ratio,
                                 token_level=token_level, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                                 repeat=repeat, profile_cost_too=profile_cost, solver_cost_too=solver_cost,
                                 breakdown=breakdown, threads=threads)
    click.echo(display.to_json(result))
    _echo(display.bench_lines(result), err=True)


@cli.command("families")
@click.option("--markdown", is_flag=True, help="Print docs/families.md (supported and unsupported families).")
def families_command(markdown: bool) -> None:
    """List the supported model families (config.model_type)."""
    if markdown:
        click.echo(allocplan.families_markdown(), nl=False)
    else:
        _echo(sorted(allocplan.FAMILIES))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="allocplan")


if __name__ == "__main__":
    main()
