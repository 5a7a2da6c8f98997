"""The ``allocplan`` command line: a thin click layer over the public verbs of :mod:`allocplan`.

Options come from the config dataclasses (:mod:`allocplan.cli_options`), the work
from the public verbs, and the printed text from :mod:`allocplan.display`. Every
user error ends in one line on stderr and exit status 2; outputs are written
atomically, so a failed command leaves no partial file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import click

import allocplan
from allocplan import BenchConfig, EvalConfig, LoadConfig, ProfileConfig, RefineConfig, RoutingConfig, display
from allocplan.cli_options import (OneLineErrors, budget_options, budget_request, build_config, common,
                                   config_options, echo_lines, existing_file, json_option, load_flags_need_model,
                                   model_option,
                                   no_json_on_stdout, output_file, plan_json, quiet_transformers, recipe_option,
                                   report_lines, show_warning)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="allocplan", prog_name="allocplan")
@common
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


@cli.command("compile")
@common
@json_option
@model_option
@config_options(ProfileConfig)
@budget_options
@config_options(RoutingConfig)
@config_options(RefineConfig)
@config_options(LoadConfig)
@recipe_option
@click.option("-o", "--output", type=output_file, required=True, help="Plan file to write.")
@click.option("--profile-out", type=output_file, default=None, help="Also write the sensitivity profile here.")
def compile_command(model_name: str, output: Path, profile_out: Path | None, recipe_path: Path | None,
                    budget_ratio: float | None, budget_activations: int | None, as_json: bool,
                    **options: Any) -> None:
    """Profile a model on calibration text and solve its per-layer top-k (Alloc-L)."""
    quiet_transformers()
    no_json_on_stdout(as_json, output, profile_out)
    allocplan.check_outputs({"-o": output, "--profile-out": profile_out},
                            {"--calib": options.get("calib"), "--recipe": recipe_path})
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    profile = build_config(ProfileConfig, options, recipe.profile if recipe else None)
    routing = build_config(RoutingConfig, options, recipe.routing if recipe else None)
    refine = build_config(RefineConfig, options, recipe.refine if recipe else None)
    plan = allocplan.compile_plan(model_name, budget_request(budget_ratio, budget_activations, recipe), profile=profile,
                                  routing=routing, refine=refine, load=build_config(LoadConfig, options),
                                  profile_out=profile_out)
    allocplan.save_plan(plan, output)
    if as_json:
        click.echo(plan_json(plan, output))
    else:
        report_lines([*display.plan_lines(plan), f"wrote {output}"], output, profile_out)


@cli.command("profile")
@common
@model_option
@config_options(ProfileConfig)
@config_options(RoutingConfig)
@config_options(LoadConfig)
@recipe_option
@click.option("--shard", default=None, metavar="I/N|auto",
              help="Measure only shard I of N of the (layer, k) grid and write a part for `allocplan profile merge`;"
                   " auto: the rank and world size of torchrun / accelerate launch, rank 0 merging (docs/scale.md).")
@click.option("-o", "--output", type=output_file, required=True, help="Profile (or, with --shard I/N, part) to write.")
def profile_command(model_name: str, output: Path, recipe_path: Path | None, shard: str | None,
                    **options: Any) -> None:
    """Measure per-layer sensitivities S[l, k], routing as a plan with these settings will, and write them.

    `allocplan profile merge PARTS... -o PROFILE` joins the parts of a sharded run.
    """
    quiet_transformers()
    allocplan.check_outputs({"-o": output}, {"--calib": options.get("calib"), "--recipe": recipe_path})
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    profile = build_config(ProfileConfig, options, recipe.profile if recipe else None)
    routing = build_config(RoutingConfig, options, recipe.routing if recipe else None)
    if shard is not None:
        report_lines(allocplan.profile_shard(model_name, output, shard, profile=profile, routing=routing,
                                        load=build_config(LoadConfig, options)), output)
        return
    model, tokenizer = allocplan.load_model(model_name, build_config(LoadConfig, options))
    measured = allocplan.profile_model(model, tokenizer, profile, routing, model_name=model_name)
    allocplan.save_profile(measured, output)
    report_lines([f"wrote {output}: {len(measured.layers)} MoE layers, reference NLL "
             f"{measured.measurement.reference_nll:.4f} on {measured.measurement.calibration.tokens} tokens"], output)


@click.command("profile merge")
@common
@click.argument("parts", type=existing_file, nargs=-1, required=True, metavar="PARTS...")
@click.option("-o", "--output", type=output_file, required=True, help="Profile file to write.")
def profile_merge_command(parts: tuple[Path, ...], output: Path) -> None:
    """Check that the parts of a sharded profile belong together (one model, calibration text and settings;
    every shard once) and join them into the profile an unsharded run writes."""
    allocplan.check_outputs({"-o": output}, {f"PART {i}": part for i, part in enumerate(parts)})
    merged = allocplan.merge_profile_parts(list(parts), output)
    report_lines([f"wrote {output}: {len(parts)} parts, {len(merged.layers)} MoE layers"], output)


cli.two_word_commands = {("profile", "merge"): profile_merge_command}


@cli.command("solve")
@common
@json_option
@click.argument("profile_path", type=existing_file, metavar="PROFILE")
@budget_options
@config_options(RoutingConfig)
@recipe_option
@click.option("-o", "--output", type=output_file, required=True, help="Plan file to write.")
def solve_command(profile_path: Path, budget_ratio: float | None, budget_activations: int | None, output: Path,
                  recipe_path: Path | None, as_json: bool, **options: Any) -> None:
    """Solve a stored profile at a budget (no model is loaded)."""
    no_json_on_stdout(as_json, output)
    allocplan.check_outputs({"-o": output}, {"PROFILE": profile_path, "--recipe": recipe_path})
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    profile = allocplan.load_profile(profile_path)
    # Without --token-level/--no-token-level (here or in a recipe), the plan routes as the profile was measured.
    measured = RoutingConfig(token_level=profile.measurement.token_level)
    routing = build_config(RoutingConfig, options, recipe.routing if recipe else measured)
    plan = allocplan.solve_profile(profile, budget_request(budget_ratio, budget_activations, recipe), routing)
    allocplan.save_plan(plan, output)
    if as_json:
        click.echo(plan_json(plan, output))
    else:
        report_lines([*display.plan_lines(plan), f"wrote {output}"], output)


@cli.command("recipe")
@common
@config_options(ProfileConfig)
@budget_options
@config_options(RoutingConfig)
@config_options(RefineConfig)
@click.option("-o", "--output", type=output_file, default=None, help="Write the recipe here [default: stdout].")
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
@common
@click.argument("plan_path", type=existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None, help="Model to load [default: the one named in the plan].")
@click.option("--prompt", default=None, help="Generate from this prompt with the plan applied.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@config_options(LoadConfig)
def apply_command(plan_path: Path, model_name: str | None, prompt: str | None, max_new_tokens: int,
                  **options: Any) -> None:
    """Load a model, apply a plan and show it (optionally generate from a prompt)."""
    quiet_transformers()
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
        echo_lines(display.plan_lines(plan))
        if prompt is not None:
            click.echo("generated: " + allocplan.generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens))


@cli.command("validate")
@common
@json_option
@click.argument("plan_path", type=existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None,
              help="Also check the plan's fingerprint against this model's config (no weights loaded).")
@config_options(LoadConfig, exclude=("device", "dtype", "device_map", "attn_implementation", "max_memory",
                                       "offload_folder", "pickle_weights"))
def validate_command(plan_path: Path, model_name: str | None, as_json: bool, **options: Any) -> None:
    """Check a plan's schema and budget arithmetic, and optionally that it fits a model (config only)."""
    load_flags_need_model(model_name, options)  # a usage error, raised before any JSON verdict is written
    try:
        plan = allocplan.load_plan(plan_path)
        message = f"{plan_path}: valid plan for {plan.model.name} ({plan.model.model_type}, {plan.model.fingerprint})"
        if model_name is not None:
            quiet_transformers()
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
@common
@model_option
@config_options(EvalConfig, help_suffix={"method": f" Registered: {', '.join(allocplan.METHODS)}."})
@config_options(LoadConfig)
@recipe_option
def eval_command(model_name: str, recipe_path: Path | None, **options: Any) -> None:
    """Measure NLL, arithmetic accuracy and activations under a plan or a method (JSON on stdout)."""
    quiet_transformers()
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    config = build_config(EvalConfig, options, recipe.eval if recipe else None)
    result = allocplan.run_eval(model_name, config, build_config(LoadConfig, options))
    click.echo(display.to_json(result))
    echo_lines(display.eval_lines(result), err=True)


@cli.command("bench")
@common
@config_options(BenchConfig, choices={"preset": list(allocplan.BENCH_PRESETS)},
                help_suffix={"budget": f" [default: {allocplan.BENCH_PRESET_BUDGET:g}]"})
@recipe_option
def bench_command(recipe_path: Path | None, **options: Any) -> None:
    """Time prefill and decode without and with a plan, side by side (JSON on stdout)."""
    quiet_transformers()
    recipe = allocplan.load_recipe(recipe_path) if recipe_path else None
    result = allocplan.run_bench(build_config(BenchConfig, options, recipe.bench if recipe else None))
    click.echo(display.to_json(result))
    echo_lines(display.bench_lines(result), err=True)


@cli.command("diff")
@common
@click.argument("plan_a", type=existing_file, metavar="PLAN_A")
@click.argument("plan_b", type=existing_file, metavar="PLAN_B")
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
        echo_lines(display.diff_lines(result, str(plan_a), str(plan_b)))
    click.get_current_context().exit(0 if result.equivalent else 1)


@cli.command("report")
@common
@click.argument("plan_path", type=existing_file, metavar="PLAN")
@click.option("--profile", "profile_path", type=existing_file, default=None,
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
@common
@click.argument("plan_path", type=existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None, help="Model to export [default: the one named in the plan].")
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New (or empty) checkpoint directory to write.")
@config_options(LoadConfig)
def export_command(plan_path: Path, model_name: str | None, output_dir: Path, **options: Any) -> None:
    """Write a checkpoint whose config.json carries the plan as engines read it (docs/serving.md)."""
    quiet_transformers()
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
        echo_lines(sorted(allocplan.FAMILIES))


@cli.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_command(args: tuple[str, ...]) -> None:
    """lm-evaluation-harness with --model allocplan (pretrained=..., plan=PLAN); lm-eval's own options.

    Example: allocplan lm-eval --model allocplan --model_args pretrained=bundled:ref-olmoe,plan=plan.yaml
    --tasks hellaswag --device cpu --batch_size 1
    """
    allocplan.run_lm_eval(list(args))


def main() -> None:
    """Console-script entry point."""
    allocplan.show_progress(True)  # bars on a terminal, unless -q
    warnings.showwarning = show_warning
    cli(prog_name="allocplan")


if __name__ == "__main__":
    main()
