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
import warnings
from pathlib import Path
from typing import Any

import click

import allocplan
from allocplan import display
from allocplan.cli_options import build_config, config_options
from allocplan import LoadConfig, ProfileConfig, RefineConfig, RoutingConfig

EXIT_USER_ERROR = 2


class _OneLineErrors(click.Group):
    """Group whose errors print as ``allocplan: error: ...`` on one line (exit 2).

    ``allocplan profile merge ...`` is the ``profile merge`` command, not ``profile``.
    """

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args[:2] == ["profile", "merge"]:
            return "profile merge", profile_merge_command, args[2:]
        return super().resolve_command(ctx, args)

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


def _report(lines: list[str], *outputs: Path | None) -> None:
    """Human-readable lines: to stdout, unless a result is being written there (``-o -``)."""
    _echo(lines, err=any(output is not None and str(output) == "-" for output in outputs))


# ``-`` is standard input for a file read and standard output for a file written.
_existing_file = click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path)
_output_file = click.Path(dir_okay=False, writable=False, allow_dash=True, path_type=Path)
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


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """-v logs progress lines to stderr; -q silences progress bars and logs. Accepted before or after the verb."""
    if not value:
        return
    if param.name == "verbose":
        logging.basicConfig(level=logging.INFO, format="allocplan: %(message)s", force=True)
    else:
        allocplan.show_progress(False)
        logging.getLogger("allocplan").setLevel(logging.WARNING)


def _common(func: Any) -> Any:
    func = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_verbosity,
                        help="No progress bars or log lines.")(func)
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_verbosity,
                        help="Log progress lines (profiling batches) to stderr.")(func)


_json_option = click.option("--json", "as_json", is_flag=True,
                            help="Print the result as JSON on stdout (instead of the table).")


def _plan_json(plan: Any, output: Path | None) -> str:
    return display.to_json({"wrote": None if output is None else str(output), "plan": display.plan_data(plan)})


def _no_json_on_stdout(as_json: bool, *outputs: Path | None) -> None:
    if as_json and any(output is not None and str(output) == "-" for output in outputs):
        raise allocplan.AllocplanError("--json and -o - both write to standard output; give -o a file")


def _budget(ratio: float | None, activations: int | None, recipe: Any) -> Any:
    if ratio is None and activations is None and recipe is not None and recipe.budget is not None:
        return recipe.budget
    return allocplan.BudgetRequest(ratio=ratio, activations=activations)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="allocplan", prog_name="allocplan")
@_common
def cli() -> None:
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


def _quiet_transformers() -> None:
    """Silence transformers' bars and advisories even when it was imported before the CLI ran."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@cli.command("compile")
@_common
@_json_option
@_model_option
@config_options(ProfileConfig)
@_budget_options
@config_options(RoutingConfig)
@config_options(RefineConfig)
@config_options(LoadConfig)
@_recipe_option
@click.option("-o", "--output", type=_output_file, required=True, help="Plan file to write.")
@click.option("--profile-out", type=_output_file, default=None, help="Also write the sensitivity profile here.")
def compile_command(model_name: str, output: Path, profile_out: Path | None, recipe_path: Path | None,
                    budget_ratio: float | None, budget_activations: int | None, as_json: bool,
                    **options: Any) -> None:
    """Profile a model on calibration text and solve its per-layer top-k (Alloc-L)."""
    _quiet_transformers()
    _no_json_on_stdout(as_json, output, profile_out)
    allocplan.check_outputs({"-o": output, "--profile-out": profile_out},
                            {"--calib": options.get("calib"), "--recipe": recipe_path})
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    profile = build_config(ProfileConfig, options, recipe.profile if recipe else None)
    routing = build_config(RoutingConfig, options, recipe.routing if recipe else None)
    refine = build_config(RefineConfig, options, recipe.refine if recipe else None)
    plan = allocplan.compile_plan(model_name, _budget(budget_ratio, budget_activations, recipe), profile=profile,
                                  routing=routing, refine=refine, load=build_config(LoadConfig, options),
                                  profile_out=profile_out)
    allocplan.save_plan(plan, output)
    if as_json:
        click.echo(_plan_json(plan, output))
    else:
        _report([*display.plan_lines(plan), f"wrote {output}"], output, profile_out)


@cli.command("profile")
@_common
@_model_option
@config_options(ProfileConfig)
@config_options(RoutingConfig)
@config_options(LoadConfig)
@_recipe_option
@click.option("--shard", default=None, metavar="I/N|auto",
              help="Measure only shard I of N of the (layer, k) grid and write a part for `allocplan profile merge`;"
                   " auto: the rank and world size of torchrun / accelerate launch, rank 0 merging (docs/scale.md).")
@click.option("-o", "--output", type=_output_file, required=True, help="Profile (or, with --shard I/N, part) to write.")
def profile_command(model_name: str, output: Path, recipe_path: Path | None, shard: str | None,
                    **options: Any) -> None:
    """Measure per-layer sensitivities S[l, k], routing as a plan with these settings will, and write them.

    `allocplan profile merge PARTS... -o PROFILE` joins the parts of a sharded run.
    """
    _quiet_transformers()
    allocplan.check_outputs({"-o": output}, {"--calib": options.get("calib"), "--recipe": recipe_path})
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    profile = build_config(ProfileConfig, options, recipe.profile if recipe else None)
    routing = build_config(RoutingConfig, options, recipe.routing if recipe else None)
    if shard is not None:
        _report(allocplan.profile_shard(model_name, output, shard, profile=profile, routing=routing,
                                        load=build_config(LoadConfig, options)), output)
        return
    model, tokenizer = allocplan.load_model(model_name, build_config(LoadConfig, options))
    measured = allocplan.profile_model(model, tokenizer, profile, routing, model_name=model_name)
    allocplan.save_profile(measured, output)
    _report([f"wrote {output}: {len(measured.layers)} MoE layers, reference NLL "
             f"{measured.measurement.reference_nll:.4f} on {measured.measurement.calibration.tokens} tokens"], output)


@click.command("profile merge")
@_common
@click.argument("parts", type=_existing_file, nargs=-1, required=True, metavar="PARTS...")
@click.option("-o", "--output", type=_output_file, required=True, help="Profile file to write.")
def profile_merge_command(parts: tuple[Path, ...], output: Path) -> None:
    """Check that the parts of a sharded profile belong together (one model, calibration text and settings;
    every shard once) and join them into the profile an unsharded run writes."""
    allocplan.check_outputs({"-o": output}, {f"PART {i}": part for i, part in enumerate(parts)})
    merged = allocplan.merge_profile_parts(list(parts), output)
    _report([f"wrote {output}: {len(parts)} parts, {len(merged.layers)} MoE layers"], output)


@cli.command("solve")
@_common
@_json_option
@click.argument("profile_path", type=_existing_file, metavar="PROFILE")
@_budget_options
@config_options(RoutingConfig)
@_recipe_option
@click.option("-o", "--output", type=_output_file, required=True, help="Plan file to write.")
def solve_command(profile_path: Path, budget_ratio: float | None, budget_activations: int | None, output: Path,
                  recipe_path: Path | None, as_json: bool, **options: Any) -> None:
    """Solve a stored profile at a budget (no model is loaded)."""
    _no_json_on_stdout(as_json, output)
    allocplan.check_outputs({"-o": output}, {"PROFILE": profile_path, "--recipe": recipe_path})
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    profile = allocplan.load_profile(profile_path)
    # Without --token-level/--no-token-level (here or in a recipe), the plan routes as the profile was measured.
    measured = RoutingConfig(token_level=profile.measurement.token_level)
    routing = build_config(RoutingConfig, options, recipe.routing if recipe else measured)
    plan = allocplan.solve_profile(profile, _budget(budget_ratio, budget_activations, recipe), routing)
    allocplan.save_plan(plan, output)
    if as_json:
        click.echo(_plan_json(plan, output))
    else:
        _report([*display.plan_lines(plan), f"wrote {output}"], output)


@cli.command("recipe")
@_common
@config_options(ProfileConfig)
@_budget_options
@config_options(RoutingConfig)
@config_options(RefineConfig)
@click.option("-o", "--output", type=_output_file, default=None, help="Write the recipe here [default: stdout].")
def recipe_command(budget_ratio: float | None, budget_activations: int | None, output: Path | None,
                   **options: Any) -> None:
    """Write the compile settings given here (defaults for the rest) as a YAML recipe."""
    allocplan.check_outputs({"-o": output})
    budget = None
    if budget_ratio is not None or budget_activations is not None:
        budget = allocplan.BudgetRequest(ratio=budget_ratio, activations=budget_activations)
    recipe = allocplan.Recipe(budget=budget, profile=build_config(ProfileConfig, options),
                              routing=build_config(RoutingConfig, options), refine=build_config(RefineConfig, options))
    if output is None or str(output) == "-":
        click.echo(recipe.to_yaml(), nl=False)
    else:
        allocplan.save_recipe(recipe, output)
        click.echo(f"wrote {output}")


@cli.command("apply")
@_common
@click.argument("plan_path", type=_existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None, help="Model to load [default: the one named in the plan].")
@click.option("--prompt", default=None, help="Generate from this prompt with the plan applied.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@config_options(LoadConfig)
def apply_command(plan_path: Path, model_name: str | None, prompt: str | None, max_new_tokens: int,
                  **options: Any) -> None:
    """Load a model, apply a plan and show it (optionally generate from a prompt)."""
    _quiet_transformers()
    if prompt is not None:  # before the model loads and the plan is shown
        allocplan.check_prompt(prompt)
    elif click.get_current_context().get_parameter_source("max_new_tokens") == click.core.ParameterSource.COMMANDLINE:
        raise allocplan.AllocplanError("--max-new-tokens sets how much --prompt generates, and no --prompt is given;"
                                       " add --prompt TEXT or leave it out")
    plan = allocplan.load_plan(plan_path)
    name = model_name or plan.model.name
    model, tokenizer = allocplan.load_model(name, build_config(LoadConfig, options))
    with allocplan.apply_plan(model, plan):
        click.echo(f"applied {plan_path} to {name}")
        _echo(display.plan_lines(plan))
        if prompt is not None:
            click.echo("generated: " + allocplan.generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens))


@cli.command("validate")
@_common
@_json_option
@click.argument("plan_path", type=_existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None,
              help="Also check the plan's fingerprint against this model's config (no weights loaded).")
@config_options(LoadConfig, exclude=("device", "dtype", "device_map", "attn_implementation", "max_memory",
                                       "offload_folder", "pickle_weights"))
def validate_command(plan_path: Path, model_name: str | None, as_json: bool, **options: Any) -> None:
    """Check a plan's schema and budget arithmetic, and optionally that it fits a model (config only)."""
    # A usage error, not a verdict on the plan: raised before the JSON verdict can be written.
    given = [flag for flag, value in (("--revision", options.get("revision")),
                                      ("--trust-remote-code", options.get("trust_remote_code"))) if value]
    if given and model_name is None:
        raise allocplan.AllocplanError(f"{given[0]} says how to load --model, which is not given; add --model or"
                                       f" leave {given[0]} out")
    try:
        plan = allocplan.load_plan(plan_path)
        message = f"{plan_path}: valid plan for {plan.model.name} ({plan.model.model_type}, {plan.model.fingerprint})"
        if model_name is not None:
            _quiet_transformers()
            allocplan.check_plan_for_model(plan, model_name, build_config(LoadConfig, options))
            message += f"; matches {model_name}"
    except allocplan.AllocplanError as exc:
        if as_json:  # CI reads the verdict from stdout; the one-line error and exit 2 follow as for any error
            click.echo(display.to_json({"valid": False, "plan": str(plan_path), "error": " ".join(str(exc).split())}))
        raise
    if as_json:
        click.echo(display.to_json({"valid": True, "plan": str(plan_path), "model": plan.model.name,
                                    "fingerprint": plan.model.fingerprint, "matches": model_name}))
    else:
        click.echo(message)


@cli.command("eval")
@_common
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
              help="Sensitivity profile for alloc-l / alloc-lt [default: profile --calib now, plain top-k with no"
                   " treatment or compensation, as the paper does].")
@click.option("--seed", type=int, default=None,
              help="Seed of --method random and of lexi's Gaussian inputs [default: 0].")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
              help="Tokens of --data to score.")
@click.option("--mode", type=click.Choice(list(allocplan.EVAL_MODES)), default="prefill", show_default=True,
              help="How --data is scored: windows in batches of 8, one forward each (prefill), or token by token"
                   " through the KV cache at batch 1 or 8 (decode-b1, decode-b8: the tokens Alloc-T pools in"
                   " generation).")
@click.option("--exact-decode", is_flag=True,
              help="Decode modes: run one forward per token instead of the equivalent forward per window.")
@config_options(LoadConfig)
def eval_command(model_name: str, plan_path: Path | None, method: str | None, budget_ratio: float | None,
                 data: Path, arith: Path | None, calib: Path | None, profile_path: Path | None, seed: int | None,
                 seq_len: int, max_tokens: int, mode: str, exact_decode: bool, **options: Any) -> None:
    """Measure NLL, arithmetic accuracy and activations under a plan or a method (JSON on stdout)."""
    _quiet_transformers()
    result = allocplan.run_eval(model_name, data=data, plan=plan_path, method=method, budget_ratio=budget_ratio,
                                arith=arith, calib=calib, profile=profile_path, seed=seed, seq_len=seq_len,
                                max_tokens=max_tokens, load=build_config(LoadConfig, options), mode=mode,
                                exact_decode=exact_decode)
    click.echo(display.to_json(result))
    _echo(display.eval_lines(result), err=True)


@cli.command("bench")
@_common
@click.option("--model", "model_name", default=None, help="Trained model to time (with --plan).")
@click.option("--plan", "plan_path", type=_existing_file, default=None, help="Plan to time against the untouched model.")
@click.option("--config", "preset", type=click.Choice(list(allocplan.BENCH_PRESETS)), default=None,
              help="Time a randomly initialised model of this shape, planned uniformly at --budget.")
@click.option("--budget", "budget_ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
              help=f"Budget of the uniform plan for --config [default: {allocplan.BENCH_PRESET_BUDGET:g}].")
@click.option("--token-level/--no-token-level", default=None,
              help="Alloc-T for the --config plan (fractional budgets always use it) [default: off].")
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
@click.option("--compensation", type=click.Choice(list(allocplan.COMPENSATION_KINDS)), default=None,
              help="Also time the --config plan with stand-ins of this kind for its dropped experts.")
@click.option("--device", default="cpu", show_default=True,
              help="torch device to time on; on cuda every reading waits for the queued kernels.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype to run the model in.")
@click.option("--decode-batch", type=click.IntRange(min=2), default=8, show_default=True,
              help="Batch of the batched decode measure.")
def bench_command(model_name: str | None, plan_path: Path | None, preset: str | None, budget_ratio: float | None,
                  token_level: bool | None, batch: int, prompt_len: int, new_tokens: int, repeat: int,
                  profile_cost: bool, solver_cost: bool, breakdown: bool, threads: int | None,
                  compensation: str | None, device: str, dtype: str, decode_batch: int) -> None:
    """Time prefill and decode without and with a plan, side by side (JSON on stdout)."""
    _quiet_transformers()
    result = allocplan.run_bench(plan=plan_path, model_name=model_name, preset=preset, budget_ratio=budget_ratio,
                                 token_level=token_level, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                                 repeat=repeat, profile_cost_too=profile_cost, solver_cost_too=solver_cost,
                                 breakdown=breakdown, threads=threads, compensation=compensation, device=device,
                                 dtype=dtype, decode_batch=decode_batch)
    click.echo(display.to_json(result))
    _echo(display.bench_lines(result), err=True)


@cli.command("diff")
@_common
@click.argument("plan_a", type=_existing_file, metavar="PLAN_A")
@click.argument("plan_b", type=_existing_file, metavar="PLAN_B")
@click.option("--rtol", type=click.FloatRange(min=0), default=1e-6, show_default=True,
              help="Relative tolerance for numbers (measured values move in their 8th digit between machines).")
@click.option("--atol", type=click.FloatRange(min=0), default=1e-9, show_default=True,
              help="Absolute tolerance for numbers.")
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
def diff_command(plan_a: Path, plan_b: Path, rtol: float, atol: float, as_json: bool) -> None:
    """Compare two plans by meaning: exit 0 when equivalent, 1 when they differ (2 on bad input).

    Behaviour (the model, per-layer k and treatments, routing, compensation stand-ins) and
    budget differences make plans different; record differences (objectives, refinement,
    provenance, hashes) are reported but keep them equivalent.
    """
    result = allocplan.diff_plans(allocplan.load_plan(plan_a), allocplan.load_plan(plan_b), rtol=rtol, atol=atol)
    if as_json:
        click.echo(display.to_json(result.to_data()))
    else:
        _echo(display.diff_lines(result, str(plan_a), str(plan_b)))
    click.get_current_context().exit(0 if result.equivalent else 1)


@cli.command("report")
@_common
@click.argument("plan_path", type=_existing_file, metavar="PLAN")
@click.option("--profile", "profile_path", type=_existing_file, default=None,
              help="The profile the plan was solved from: adds the heat map of S[l, k] with the chosen k marked.")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Directory for report.md and the pictures.")
@click.option("--pictures/--no-pictures", default=True, show_default=True,
              help="Draw k.png and sensitivity.png (needs matplotlib: pip install 'allocplan[report]').")
def report_command(plan_path: Path, profile_path: Path | None, output_dir: Path, pictures: bool) -> None:
    """Write a reviewer's summary of a plan: report.md and, with matplotlib, PNG pictures."""
    plan = allocplan.load_plan(plan_path)
    profile = allocplan.load_profile(profile_path) if profile_path else None
    for path in allocplan.write_report(plan, output_dir, profile, pictures):
        click.echo(f"wrote {path}")


@cli.command("export")
@_common
@click.argument("plan_path", type=_existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None, help="Model to export [default: the one named in the plan].")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New (or empty) checkpoint directory to write.")
@config_options(LoadConfig)
def export_command(plan_path: Path, model_name: str | None, output_dir: Path, **options: Any) -> None:
    """Write a checkpoint whose config.json carries the plan as engines read it (docs/serving.md)."""
    _quiet_transformers()
    plan = allocplan.load_plan(plan_path)
    result = allocplan.export_plan(plan, model_name or plan.model.name, output_dir, build_config(LoadConfig, options))
    keys = ", ".join(result["config_keys"]) or "an allocplan block naming the plan file"
    click.echo(f"wrote {result['directory']} ({result['form']} form: config.json sets {keys};"
               f" {len(result['files'])} files)")


@cli.command("families")
@click.option("--markdown", is_flag=True, help="Print docs/families.md (supported and unsupported families).")
def families_command(markdown: bool) -> None:
    """List the supported model families (config.model_type)."""
    if markdown:
        click.echo(allocplan.families_markdown(), nl=False)
    else:
        _echo(sorted(allocplan.FAMILIES))


@cli.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(args: tuple[str, ...]) -> None:
    """lm-evaluation-harness with --model allocplan (pretrained=..., plan=PLAN); lm-eval's own options.

    Example: allocplan lm-eval --model allocplan --model_args pretrained=bundled:ref-olmoe,plan=plan.yaml
    --tasks hellaswag --device cpu --batch_size 1
    """
    allocplan.run_lm_eval(list(args))


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """A warning as one line on stderr (Python's default adds the file, line number and source)."""
    text = " ".join(str(message).split())
    click.echo(text if text.startswith("allocplan:") else f"allocplan: warning: {text}", err=True)


def main() -> None:
    """Console-script entry point."""
    allocplan.show_progress(True)  # bars on a terminal, unless -q
    warnings.showwarning = _show_warning
    cli(prog_name="allocplan")


if __name__ == "__main__":
    main()
