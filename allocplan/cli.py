"""The ``allocplan`` command line: a thin click layer over the public verbs.

Every user error ends in one line on stderr and exit status 2; outputs are
written atomically, so a failed command leaves no partial file.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from allocplan.errors import AllocplanError
from allocplan.planner.plan import RENORMALIZE_MODES
from allocplan.planner.solve import SolverDisagreement

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
        except AllocplanError as exc:
            _fail(str(exc))
        except SolverDisagreement as exc:
            click.echo(f"allocplan: internal error: solver cross-check failed: {exc}", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    click.echo(f"allocplan: error: {' '.join(message.split())}", err=True)
    sys.exit(EXIT_USER_ERROR)


_existing_file = click.Path(exists=True, dir_okay=False, path_type=Path)
_output_file = click.Path(dir_okay=False, writable=False, path_type=Path)


def _model_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option("--device", default="cpu", show_default=True, help="torch device to run the model on."),
            click.option(
                "--dtype",
                type=click.Choice(["float32", "bfloat16", "float16"]),
                default="float32",
                show_default=True,
                help="dtype to load the weights in.",
            ),
            click.option(
                "--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code (off by default)."
            ),
        ]
    ):
        func = option(func)
    return func


def _profiling_options(func: Any) -> Any:
    func = _model_options(func)
    for option in reversed(
        [
            click.option("--model", "model_name", required=True,
                         help="Local checkpoint directory, bundled:<name>, or hub id."),
            click.option("--calib", type=_existing_file, default=None,
                         help="UTF-8 calibration text [default: the text bundled with allocplan]."),
            click.option("--calib-tokens", type=click.IntRange(min=2), default=16384, show_default=True,
                         help="Tokens of calibration text to score."),
            click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True,
                         help="Tokens per packed calibration window."),
            click.option("--strategy", type=click.Choice(["isolated", "paper"]), default="isolated",
                         show_default=True, help="What the other layers do while one layer is profiled."),
            click.option("--metric", type=click.Choice(["nll", "kl"]), default="kl", show_default=True,
                         help="Sensitivity metric: KL divergence from the full model, or NLL increase."),
            click.option("--k-min", type=click.IntRange(min=1), default=1, show_default=True,
                         help="Smallest top-k a layer may be given."),
            click.option("--k-step", type=click.Choice(["1", "0.5"]), default="1", show_default=True,
                         callback=lambda _ctx, _param, value: float(value),
                         help="Candidate grid: whole experts, or halves realised by token-level allocation."),
            click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                         help="Calibration windows per forward pass."),
        ]
    ):
        func = option(func)
    return func


def _budget_options(func: Any) -> Any:
    for option in reversed(
        [
            click.option("--budget", "budget_ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
                         help="Fraction of the model's activations per token to keep, e.g. 0.5."),
            click.option("--budget-activations", type=click.IntRange(min=1), default=None,
                         help="Absolute routed activations per token over all MoE layers."),
            click.option("--token-level/--no-token-level", default=True, show_default=True,
                         help="Alloc-T: redistribute each layer's activations between the tokens of a forward pass."),
            click.option("--k-base", type=click.IntRange(min=0), default=1, show_default=True,
                         help="Experts every token keeps under token-level allocation."),
            click.option("--k-max", type=click.IntRange(min=1), default=None,
                         help="Most experts one token can get [default: the layer's original top-k]."),
            click.option("--renormalize", type=click.Choice(list(RENORMALIZE_MODES)),
                         default="model", show_default=True, help="How the kept experts' weights are normalised."),
            click.option("--reference-k", type=click.IntRange(min=1), default=None,
                         help="k' of --renormalize decoupled [default: the layer's original top-k]."),
        ]
    ):
        func = option(func)
    return func


def _check_budget(budget_ratio: float | None, budget_activations: int | None) -> None:
    if (budget_ratio is None) == (budget_activations is None):
        raise AllocplanError("give exactly one of --budget RATIO or --budget-activations N")


def _print_plan(plan: Any, file: Any = None) -> None:
    rows = [("layer", "module", "original_k", "planned_k")]
    rows += [(str(e.index), e.path, str(e.original_k), f"{e.planned_k:g}") for e in plan.layers]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        click.echo("  ".join(cell.rjust(w) if i != 1 else cell.ljust(w) for i, (cell, w) in
                             enumerate(zip(row, widths))), file=file)
    budget = plan.budget
    ratio = f"ratio {budget.ratio:g}, " if budget.ratio is not None else ""
    click.echo(
        f"activations per token: {budget.planned_activations:g} of {budget.original_activations}"
        f" ({ratio}budget {budget.total_activations});"
        f" objective {plan.solver.dp_objective:.6g} {plan.solver.metric} (DP) ="
        f" {plan.solver.ilp_objective:.6g} (ILP, {plan.solver.ilp_status})",
        file=file,
    )


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
@_profiling_options
@_budget_options
@click.option("-o", "--output", type=_output_file, required=True, help="Plan file to write.")
@click.option("--profile-out", type=_output_file, default=None, help="Also write the sensitivity profile here.")
def compile_command(model_name: str, output: Path, profile_out: Path | None, budget_ratio: float | None,
                    budget_activations: int | None, **options: Any) -> None:
    """Profile a model on calibration text and solve its per-layer top-k (Alloc-L)."""
    _quiet_transformers()
    from allocplan.planner.compile import compile_plan
    from allocplan.planner.plan import save_plan

    _check_budget(budget_ratio, budget_activations)
    plan = compile_plan(model_name, budget_ratio, budget_activations=budget_activations,
                        profile_out=profile_out, **options)
    save_plan(plan, output)
    _print_plan(plan)
    click.echo(f"wrote {output}")


@cli.command("profile")
@_profiling_options
@click.option("-o", "--output", type=_output_file, required=True, help="Profile file to write.")
def profile_command(model_name: str, output: Path, device: str, dtype: str, trust_remote_code: bool,
                    calib: Path | None, **options: Any) -> None:
    """Measure per-layer sensitivities S[l, k] and write them as a profile."""
    _quiet_transformers()
    from allocplan.loading import DEFAULT_CALIBRATION, load_model
    from allocplan.planner.profile_format import save_profile
    from allocplan.planner.profiling import profile_model

    model, tokenizer = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    profile = profile_model(model, tokenizer, model_name=model_name, calib=calib or DEFAULT_CALIBRATION, **options)
    save_profile(profile, output)
    click.echo(f"wrote {output}: {len(profile.layers)} MoE layers, reference NLL "
               f"{profile.measurement.reference_nll:.4f} on {profile.measurement.calibration.tokens} tokens")


@cli.command("solve")
@click.argument("profile_path", type=_existing_file, metavar="PROFILE")
@_budget_options
@click.option("-o", "--output", type=_output_file, required=True, help="Plan file to write.")
def solve_command(profile_path: Path, budget_ratio: float | None, budget_activations: int | None, output: Path,
                  **routing: Any) -> None:
    """Solve a stored profile at a budget (no model is loaded)."""
    from allocplan.planner.from_profile import solve_profile
    from allocplan.planner.plan import save_plan
    from allocplan.planner.profile_format import load_profile

    _check_budget(budget_ratio, budget_activations)
    plan = solve_profile(load_profile(profile_path), budget_ratio=budget_ratio,
                         budget_activations=budget_activations, **routing)
    save_plan(plan, output)
    _print_plan(plan)
    click.echo(f"wrote {output}")


@cli.command("apply")
@click.argument("plan_path", type=_existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None, help="Model to load [default: the one named in the plan].")
@click.option("--prompt", default=None, help="Generate from this prompt with the plan applied.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@_model_options
def apply_command(plan_path: Path, model_name: str | None, prompt: str | None, max_new_tokens: int, device: str,
                  dtype: str, trust_remote_code: bool) -> None:
    """Load a model, apply a plan and show it (optionally generate from a prompt)."""
    _quiet_transformers()
    from allocplan.loading import load_model
    from allocplan.planner.plan import load_plan
    from allocplan.runtime.apply import apply_plan

    plan = load_plan(plan_path)
    name = model_name or plan.model.name
    model, tokenizer = load_model(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    handle = apply_plan(model, plan)
    click.echo(f"applied {plan_path} to {name}")
    _print_plan(plan)
    if prompt is not None:
        import torch

        inputs = tokenizer(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        click.echo("generated: " + tokenizer.decode(out[0], skip_special_tokens=True))
    handle.remove()


@cli.command("validate")
@click.argument("plan_path", type=_existing_file, metavar="PLAN")
@click.option("--model", "model_name", default=None,
              help="Also check the plan's fingerprint against this model's config (no weights loaded).")
@click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code (off by default).")
def validate_command(plan_path: Path, model_name: str | None, trust_remote_code: bool) -> None:
    """Check a plan's schema and budget arithmetic, and optionally its model fingerprint."""
    from allocplan.planner.plan import load_plan

    plan = load_plan(plan_path)
    message = f"{plan_path}: valid plan for {plan.model.name} ({plan.model.model_type}, {plan.model.fingerprint})"
    if model_name is not None:
        _quiet_transformers()
        from allocplan.loading import load_config
        from allocplan.runtime.families import get_family, model_fingerprint

        # A multimodal checkpoint loads as its text model under AutoModelForCausalLM.
        config = load_config(model_name, trust_remote_code=trust_remote_code).get_text_config()
        get_family(config.model_type)
        fingerprint = model_fingerprint(config.to_dict())
        if fingerprint != plan.model.fingerprint:
            raise AllocplanError(
                f"{plan_path} was compiled for fingerprint {plan.model.fingerprint} ({plan.model.name})"
                f" but {model_name} has {fingerprint}; compile a plan for this model"
            )
        message += f"; matches {model_name}"
    click.echo(message)


@cli.command("eval")
@click.option("--model", "model_name", required=True, help="Local checkpoint directory, bundled:<name>, or hub id.")
@click.option("--plan", "plan_path", type=_existing_file, default=None, help="Evaluate with this plan applied.")
@click.option("--method", type=click.Choice(["full", "uniform", "random", "lexi", "naee", "top-p", "alloc-t",
                                              "alloc-l", "alloc-lt"]), default=None,
              help="Evaluate a routing policy at --budget instead of a plan (see docs/results.md).")
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
@_model_options
def eval_command(model_name: str, plan_path: Path | None, method: str | None, budget_ratio: float | None,
                 data: Path, arith: Path | None, calib: Path | None, profile_path: Path | None, seed: int,
                 seq_len: int, max_tokens: int, device: str, dtype: str, trust_remote_code: bool) -> None:
    """Measure NLL, arithmetic accuracy and activations under a plan or a method (JSON on stdout)."""
    _quiet_transformers()
    import json

    from allocplan.baselines import PROFILE_METHODS, THRESHOLD_METHODS, build_policy
    from allocplan.evaluation import evaluate
    from allocplan.loading import DEFAULT_CALIBRATION, load_model
    from allocplan.planner.plan import load_plan
    from allocplan.planner.profile_format import load_profile
    from allocplan.planner.profiling import calibration_windows, profile_model
    from allocplan.runtime.apply import apply_plan

    if (plan_path is None) == (method is None):
        raise AllocplanError("give exactly one of --plan PLAN or --method NAME")
    if method not in (None, "full") and budget_ratio is None:
        raise AllocplanError(f"--method {method} needs --budget RATIO")
    model, tokenizer = load_model(model_name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    calib = calib or DEFAULT_CALIBRATION
    parameter = None
    if plan_path is not None:
        handle = apply_plan(model, load_plan(plan_path))
        label, budget_total = f"plan {plan_path}", handle.plan.budget.total_activations
    else:
        profile = None
        if method in PROFILE_METHODS:
            profile = load_profile(profile_path) if profile_path else profile_model(
                model, tokenizer, model_name=model_name, calib=calib)
        windows = None
        if method in THRESHOLD_METHODS:  # only threshold rules are calibrated on text
            windows, _ = calibration_windows(tokenizer, calib, calib_tokens=4096, seq_len=seq_len)
        policy = build_policy(model, method, budget_ratio or 1.0, profile=profile, calib_windows=windows, seed=seed)
        handle, parameter = policy.apply(model), policy.parameter
        label, budget_total = method, policy.target
    try:
        result = evaluate(model, tokenizer, data=data, arith=arith, handle=handle, seq_len=seq_len,
                          max_tokens=max_tokens)
    finally:
        if handle is not None:
            handle.remove()
    result = {"model": model_name, "policy": label, "budget_ratio": budget_ratio, "parameter": parameter,
              "target_activations_per_token": budget_total, **result}
    click.echo(json.dumps(result, indent=2, sort_keys=True))
    arith_text = f", arithmetic {result['arith_accuracy']:.3f}" if "arith_accuracy" in result else ""
    click.echo(f"{label}: NLL {result['nll']:.4f} (ppl {result['perplexity']:.2f}){arith_text},"
               f" {result['activations_per_token']:.3f} activations per token", err=True)
    for path, value in result["activations_per_layer"].items():
        click.echo(f"  {path}: {value:.3f}", err=True)


@cli.command("bench")
@click.option("--model", "model_name", default=None, help="Trained model to time (with --plan).")
@click.option("--plan", "plan_path", type=_existing_file, default=None, help="Plan to time against the untouched model.")
@click.option("--config", "preset", type=click.Choice(["dsv2-lite-small", "mixtral-small"]), default=None,
              help="Time a randomly initialised model of this shape, planned uniformly at --budget.")
@click.option("--budget", "budget_ratio", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Budget of the uniform plan for --config.")
@click.option("--token-level/--no-token-level", default=False, show_default=True,
              help="Alloc-T for the --config plan (fractional budgets always use it).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Prefill batch size.")
@click.option("--prompt-len", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--profile-cost", is_flag=True, help="Also time profiling with allocplan's reuse and naively (a full forward per (layer, k)).")
@click.option("--solver-cost", is_flag=True, help="Also time the DP and the ILP on a 60-layer, k<=16 instance.")
@click.option("--breakdown", is_flag=True,
              help="Also split prefill and decode time into router, expert matmuls, other expert work and the rest.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads [default: torch's].")
def bench_command(model_name: str | None, plan_path: Path | None, preset: str | None, budget_ratio: float,
                  token_level: bool, batch: int, prompt_len: int, new_tokens: int, repeat: int,
                  profile_cost: bool, solver_cost: bool, breakdown: bool, threads: int | None) -> None:
    """Time prefill and decode without and with a plan, side by side (JSON on stdout)."""
    _quiet_transformers()
    import json

    import torch

    from allocplan import benchmark
    from allocplan.loading import DEFAULT_CALIBRATION, load_model
    from allocplan.planner.plan import load_plan
    from allocplan.planner.profiling import calibration_windows

    if threads:
        torch.set_num_threads(threads)
    if (preset is None) == (plan_path is None):
        raise AllocplanError("give --plan PLAN (with --model or the plan's model) or --config PRESET")
    tokenizer = None
    if preset is not None:
        model = benchmark.build_preset(preset)
        plan = benchmark.uniform_budget_plan(model, budget_ratio, token_level)
        label = f"{preset} (random init), uniform budget {budget_ratio:g}"
    else:
        plan = load_plan(plan_path)
        model, tokenizer = load_model(model_name or plan.model.name)
        label = f"{model_name or plan.model.name} with {plan_path}"
    result = {"label": label, **benchmark.bench(model, plan, batch=batch, prompt_len=prompt_len,
                                                new_tokens=new_tokens, repeat=repeat)}
    if profile_cost:
        if tokenizer is None:
            generator = torch.Generator().manual_seed(0)
            windows = torch.randint(0, model.get_input_embeddings().num_embeddings, (4, 256), generator=generator)
        else:
            windows, _ = calibration_windows(tokenizer, DEFAULT_CALIBRATION, calib_tokens=2048, seq_len=256)
        result["profile_cost"] = benchmark.profile_cost(model, windows)
    if solver_cost:
        result["solver_cost"] = benchmark.solver_cost()
    if breakdown:
        result["breakdown"] = benchmark.time_breakdown(model, plan, prompt_len=prompt_len, new_tokens=new_tokens)
    click.echo(json.dumps(result, indent=2, sort_keys=True))
    click.echo(f"{label}: budget {result['budget']:.3f}, f_routed_weights {result['f_routed_weights']:.2f},"
               f" f_routed_flops {result['f_routed_flops']:.2f}, f_moe_time {result['f_moe_time']:.2f}", err=True)
    for name in ("prefill_s", "decode_b1_s_per_token", "decode_b8_s_per_step"):
        r = result[name]
        same = r.get("speedup_same_path")
        click.echo(f"  {name}: {r['untouched']['median'] * 1e3:.1f} ms -> {r['planned']['median'] * 1e3:.1f} ms,"
                   f" speed-up {r['speedup']['median']:.2f}x [{r['speedup']['min']:.2f}, {r['speedup']['max']:.2f}]"
                   + (f", {same['median']:.2f}x against full k on the same experts path" if same else "")
                   + f"; bound {result['ideal_speedup'][name]:.2f}x, {result['achieved_fraction'][name]:.0%} of it",
                   err=True)


@cli.command("families")
@click.option("--markdown", is_flag=True, help="Print docs/families.md (supported and unsupported families).")
def families_command(markdown: bool) -> None:
    """List the supported model families (config.model_type)."""
    from allocplan.runtime.families import FAMILIES, families_markdown

    if markdown:
        click.echo(families_markdown(), nl=False)
    else:
        for name in sorted(FAMILIES):
            click.echo(name)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="allocplan")


if __name__ == "__main__":
    main()
