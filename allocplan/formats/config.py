"""Settings: frozen config dataclasses, each default written once, and YAML recipes.

Every setting a user can change is a field of one config class here, with its
default, its command-line flag, its help text and its bounds (choices or a
minimum) in the field's metadata, like PEFT's config fields. The CLI builds its
options from these fields (so a default is written nowhere else), the Python API
takes the configs themselves, and :func:`check_settings` validates any config from
the same metadata::

    plan = allocplan.compile_plan(model, 0.5, profile=ProfileConfig(metric="nll"),
                                  routing=RoutingConfig(token_level=False))

A :class:`Recipe` bundles a budget and the configs; it round-trips through YAML
(``allocplan recipe`` writes one, ``allocplan compile --recipe r.yaml`` reads it),
as llm-compressor's recipes do. Pure data: no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import AllocplanError
from .allocation import RENORMALIZE_MODES, TokenLevel, Weights
from .budget import BudgetRequest
from .records import atomic_write_text, dump_yaml, from_data, load_yaml_file, to_data

RECIPE_KIND = "allocplan-recipe"
RECIPE_SCHEMA_VERSION = 1

# Profiling strategies and metrics a user can choose (data-free profiles are a baseline's, not a choice).
PROFILE_STRATEGIES = ("isolated", "paper")
PROFILE_METRICS = ("kl", "nll")
K_STEPS = (1.0, 0.5)
DTYPES = ("float32", "bfloat16", "float16")


def setting(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
            minimum: int | None = None, path: bool = False) -> Any:
    """A config field: its default and, in its metadata, how the CLI and validation treat it.

    Args:
        default: the one place this default is written.
        help: the option's help text.
        flag: the command-line flag (default ``--field-name``); booleans that default to
            true give ``--x/--no-x``.
        choices: the allowed values.
        minimum: the smallest allowed value of a number.
        path: the value names an existing file.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices,
                                             "minimum": minimum, "path": path})


def flag_of(item: dataclasses.Field) -> str:
    """The command-line flag of a config field (``--calib-tokens`` for ``calib_tokens``)."""
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def check_settings(config: Any) -> None:
    """Check every field of ``config`` against its metadata's choices and minimum.

    Raises:
        AllocplanError: naming the field, its flag, the value and what is allowed.
    """
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if value is None:
            continue
        name = f"{item.name} ({flag_of(item).split('/')[0]})"
        choices, minimum = item.metadata.get("choices"), item.metadata.get("minimum")
        if isinstance(value, float) and not math.isfinite(value):
            raise AllocplanError(f"{name} must be a finite number, got {value!r}")
        if choices is not None and value not in choices:
            raise AllocplanError(f"{name} is {value!r}; choose one of {', '.join(map(str, choices))}")
        if minimum is not None and value < minimum:
            raise AllocplanError(f"{name} must be at least {minimum}, got {value!r}")


@dataclass(frozen=True)
class ProfileConfig:
    """How sensitivities S[l, k] are measured (see :mod:`allocplan.planner.profiling`).

    Attributes:
        calib: UTF-8 calibration text file; None means the text bundled with allocplan.
        calib_tokens: tokens of calibration text to score (cut into full windows).
        seq_len: tokens per packed window.
        strategy: ``isolated`` (other layers at their original k) or ``paper`` (later
            layers at k_min, deepest layer first).
        metric: ``kl`` (KL divergence from the full model) or ``nll`` (NLL increase).
        k_min: smallest top-k a layer may be given.
        k_step: candidate grid: 1.0 (whole experts) or 0.5 (halves, realised by Alloc-T).
        batch_size: calibration windows per forward pass.
    """

    calib: str | None = setting(None, "UTF-8 calibration text [default: the text bundled with allocplan].",
                                path=True)
    calib_tokens: int = setting(16384, "Tokens of calibration text to score.", minimum=2)
    seq_len: int = setting(256, "Tokens per packed calibration window.", minimum=2)
    strategy: str = setting("isolated", "What the other layers do while one layer is profiled.",
                            choices=PROFILE_STRATEGIES)
    metric: str = setting("kl", "Sensitivity metric: KL divergence from the full model, or NLL increase.",
                          choices=PROFILE_METRICS)
    k_min: int = setting(1, "Smallest top-k a layer may be given.", minimum=1)
    k_step: float = setting(1.0, "Candidate grid: whole experts, or halves realised by token-level allocation.",
                            choices=K_STEPS)
    batch_size: int = setting(8, "Calibration windows per forward pass.", minimum=1)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.calib_tokens < self.seq_len:
            raise AllocplanError(f"--calib-tokens {self.calib_tokens} is smaller than --seq-len {self.seq_len};"
                                 " raise it")

    @property
    def token_level(self) -> bool:
        """A half-expert grid is measured (and run) with Alloc-T routing."""
        return self.k_step != 1.0


@dataclass(frozen=True)
class RoutingConfig:
    """How the runtime routes under a plan (recorded in the plan; see docs/runtime.md).

    Attributes:
        token_level: Alloc-T: redistribute each layer's activations between the tokens
            of a forward pass.
        k_base: experts every real token keeps under Alloc-T.
        k_max: most experts one token can get; None means each layer's original top-k.
        renormalize: weight mode of the kept experts (``model``, ``none``, ``renorm``,
            ``decoupled``).
        reference_k: k' of ``decoupled``; None means each layer's original top-k.
    """

    token_level: bool = setting(True, "Alloc-T: redistribute each layer's activations between the tokens of"
                                      " a forward pass.", flag="--token-level/--no-token-level")
    k_base: int = setting(1, "Experts every token keeps under token-level allocation.", minimum=0)
    k_max: int | None = setting(None, "Most experts one token can get [default: the layer's original top-k].",
                                minimum=1)
    renormalize: str = setting("model", "How the kept experts' weights are normalised.", choices=RENORMALIZE_MODES)
    reference_k: int | None = setting(None, "k' of --renormalize decoupled [default: the layer's original top-k].",
                                      minimum=1)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.k_max is not None and self.k_max < self.k_base:
            raise AllocplanError(f"--k-max {self.k_max} is below --k-base {self.k_base}")
        if self.reference_k is not None and self.renormalize != "decoupled":
            raise AllocplanError("--reference-k is only used with --renormalize decoupled; leave it out")

    def token_level_record(self) -> TokenLevel:
        """The plan's ``token_level`` record."""
        return TokenLevel(enabled=self.token_level, k_base=self.k_base, k_max=self.k_max)

    def weights_record(self) -> Weights:
        """The plan's ``weights`` record."""
        return Weights(renormalize=self.renormalize, reference_k=self.reference_k)


@dataclass(frozen=True)
class LoadConfig:
    """How a model named by the user is loaded (see :func:`allocplan.load_model`).

    Attributes:
        device: torch device to run the model on.
        dtype: dtype to load the weights in.
        trust_remote_code: allow a checkpoint's own Python code (off unless asked).
    """

    device: str = setting("cpu", "torch device to run the model on.")
    dtype: str = setting("float32", "dtype to load the weights in.", choices=DTYPES)
    trust_remote_code: bool = setting(False, "Allow a checkpoint's own Python code (off by default).")

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class Recipe:
    """A compile's settings as one reviewable YAML document (no model: one recipe serves many).

    Attributes:
        budget: the budget, or None to take it from the command line.
        profile: how sensitivities are measured.
        routing: how the plan routes at runtime.
    """

    budget: BudgetRequest | None = None
    profile: ProfileConfig = ProfileConfig()
    routing: RoutingConfig = RoutingConfig()

    def to_yaml(self) -> str:
        """Canonical YAML text, every setting written out (defaults included)."""
        return dump_yaml({"kind": RECIPE_KIND, "schema_version": RECIPE_SCHEMA_VERSION, **to_data(self)})


def recipe_from_data(data: object, where: str = "recipe") -> Recipe:
    """Build a recipe from parsed YAML; a missing section or setting takes its default."""
    if not isinstance(data, dict):
        raise AllocplanError(f"{where}: expected a mapping of recipe settings")
    if data.get("kind") != RECIPE_KIND:
        raise AllocplanError(f"{where}: kind is {data.get('kind')!r}, not {RECIPE_KIND!r}; is this a recipe?")
    if data.get("schema_version") != RECIPE_SCHEMA_VERSION:
        raise AllocplanError(f"{where}: schema_version {data.get('schema_version')!r} is not supported (this"
                             f" allocplan reads version {RECIPE_SCHEMA_VERSION})")
    body = {key: value for key, value in data.items() if key not in ("kind", "schema_version")}
    return from_data(Recipe, body, where, defaults=True)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Load a recipe file strictly (unknown keys and wrong types are errors)."""
    return recipe_from_data(load_yaml_file(path, "recipe"), where=f"recipe {os.fspath(path)!r}")


def save_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> None:
    """Write a recipe atomically as canonical YAML."""
    atomic_write_text(path, recipe.to_yaml())
