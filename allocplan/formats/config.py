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
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import AllocplanError
from .allocation import RENORMALIZE_MODES, TOKEN_PREFERENCES, TOKEN_SCOPES, TokenLevel, Weights
from .budget import BudgetRequest
from .provenance import is_jsonl
from ..standins import STAND_IN_KINDS, get_stand_in_kind
from .records import atomic_write_text, dump_yaml, from_data, load_yaml_file, to_data

RECIPE_KIND = "allocplan-recipe"
RECIPE_SCHEMA_VERSION = 1

# Profiling strategies and metrics a user can choose (data-free profiles are a baseline's, not a choice).
PROFILE_STRATEGIES = ("isolated", "paper", "anchored")
PROFILE_METRICS = ("kl", "nll")
K_STEPS = (1.0, 0.5)
# What a user may ask for; a profile records what was done (formats/profile.py, WEIGHT_FIT_RECORDS).
WEIGHT_FIT_CHOICES = ("auto", "off")


def compensation_choices() -> tuple[str, ...]:
    """``--compensation`` values: ``auto``, every registered stand-in kind, ``off``."""
    return ("auto", *STAND_IN_KINDS, "off")


def stand_in_kinds() -> tuple[str, ...]:
    """Every registered stand-in kind (allocplan/standins/)."""
    return tuple(STAND_IN_KINDS)

# A linear stand-in (2 * rank * hidden multiply-adds per dropped pair) costs at most this share of one
# expert's multiply-adds when its rank is left to allocplan. Chosen on calibration folds only
# (planner/treatments.py, "Stand-in rank"): 0.05 -> 0.10 closed more of the gap on all three
# references, more than the same work spent on one more expert; beyond it the gains shrink.
STAND_IN_SHARE = 0.10
DTYPES = ("float32", "bfloat16", "float16", "auto")
# What a timed model runs in (a dtype, not "auto": a preset has no checkpoint dtype of its own).
BENCH_DTYPES = ("float32", "bfloat16", "float16")
# The ways ``allocplan eval`` scores text, mode -> sequences per forward. Alloc-T pools a layer's budget
# over the tokens of one forward, so a plan's quality depends on it: ``prefill`` runs windows whole in
# batches of 8; ``decode-b1`` and ``decode-b8`` feed 1 or 8 independent windows token by token through
# the KV cache, as generation does (allocplan/evaluation/metrics.py).
EVAL_MODES: dict[str, int] = {"prefill": 8, "decode-b1": 1, "decode-b8": 8}


def setting(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
            minimum: float | None = None, maximum: float | None = None, above: float | None = None,
            path: bool = False) -> Any:
    """A config field: its default and, in its metadata, how the CLI and validation treat it.

    Args:
        default: the one place this default is written.
        help: the option's help text.
        flag: the command-line flag (default ``--field-name``); booleans that default to
            true give ``--x/--no-x``.
        choices: the allowed values, or a function giving them (a registry's names, read when checked).
        minimum: the smallest allowed value of a number.
        maximum: the largest allowed value of a number.
        above: a number must be strictly greater than this (a budget ratio: above 0).
        path: the value names an existing file.
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "minimum": minimum,
                                             "maximum": maximum, "above": above, "path": path})


def flag_of(item: dataclasses.Field) -> str:
    """The command-line flag of a config field (``--calib-tokens`` for ``calib_tokens``)."""
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def check_settings(config: Any) -> None:
    """Check every field of ``config`` against its metadata's choices, minimum and maximum.

    Raises:
        AllocplanError: naming the field, its flag, the value and what is allowed.
    """
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if value is None:
            continue
        name = f"{item.name} ({flag_of(item).split('/')[0]})"
        choices, minimum, maximum, above = (item.metadata.get(key) for key in ("choices", "minimum", "maximum",
                                                                                 "above"))
        if isinstance(value, float) and not math.isfinite(value):
            raise AllocplanError(f"{name} must be a finite number, got {value!r}")
        if callable(choices):
            choices = choices()
        if choices is not None and value not in choices:
            raise AllocplanError(f"{name} is {value!r}; choose one of {', '.join(map(str, choices))}")
        if minimum is not None and value < minimum:
            raise AllocplanError(f"{name} must be at least {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise AllocplanError(f"{name} must be at most {maximum}, got {value!r}")
        if above is not None and value <= above:
            raise AllocplanError(f"{name} must be above {above}, got {value!r}")


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str]:
    """A ``--calib-dataset`` value, ``NAME[:CONFIG]:SPLIT``, as ``(name, config, split)``.

    Raises:
        AllocplanError: not two or three non-empty parts.
    """
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise AllocplanError(f"--calib-dataset {spec[:80]!r} must be NAME:SPLIT or NAME:CONFIG:SPLIT, e.g."
                             " wikitext:wikitext-2-raw-v1:train")
    return parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]


@dataclass(frozen=True)
class ProfileConfig:
    """How sensitivities S[l, k] are measured (see :mod:`allocplan.planner.profiling`).

    Attributes:
        calib: calibration text: a UTF-8 text file, or a ``.jsonl`` file whose lines are
            JSON objects (the ``text_field`` of each); None (and no ``calib_dataset``) means
            the text bundled with allocplan.
        calib_dataset: a ``datasets`` dataset as ``NAME[:CONFIG]:SPLIT`` to read calibration
            text from instead (the optional ``datasets`` extra), its ``text_field`` column.
        text_field: the field holding the text in a ``.jsonl`` file or a dataset.
        calib_tokens: tokens of calibration text to score (cut into full windows).
        seq_len: tokens per packed window.
        strategy: ``isolated`` (other layers at their original k), ``paper`` (later
            layers at k_min, deepest layer first) or ``anchored`` (other layers at their original k;
            each layer's probes carry its change straight to the head, corrected by two anchor
            probes measured exactly: time linear in depth but for the anchors, S approximate;
            see :mod:`allocplan.planner.profiling`).
        metric: ``kl`` (KL divergence from the full model) or ``nll`` (NLL increase).
        k_min: smallest top-k a layer may be given.
        k_step: candidate grid: 1.0 (whole experts) or 0.5 (halves, realised by Alloc-T).
        batch_size: calibration windows per forward pass. Under token-level allocation (batch
            scope) a forward's tokens pool each layer's budget, so the measured sensitivities,
            fitted gains and stand-ins depend on it slightly; plans do not record it.
        weight_fit: ``auto``: for every (layer, k), fit the layer's weight treatment on
            calibration tokens (the normaliser width k2 of decoupled renormalisation for a
            family that renormalises, a gain on the routed output for one that does not)
            and measure S with it in place, where the family supports treatments; ``off``: none.
        compensation: a dropped candidate adds its routing weight times a stand-in for its
            expert's output, fitted on calibration tokens: ``expert``, the expert's mean output
            (MoNE); ``layer``, the layer's mean expert output; ``linear``, the expert's mean
            output plus a low-rank least-squares linear map of the input;
            ``off``: nothing; ``auto``: ``linear`` where the family supports it, else ``off``.
            Measured with it in place.
        compensation_rank: rank of the ``linear`` stand-ins; None: per layer, the largest rank
            whose stand-in costs at most ``compensation_share`` of one expert's multiply-adds.
        compensation_share: the cost cap that chooses that rank. At budget 0.5 the stand-ins
            then cost about this share of the kept experts' work (twice it at 0.33); lower it
            where batch-1 latency matters more than quality (docs/benchmarks.md).
        stand_in_choice: with compensation, measure S[l, k, r] for every stand-in option of
            each layer (none, the constant, the rank within ``compensation_share`` and the one
            within twice it), so that the solver chooses per layer between experts and
            stand-ins under the charged budget; off: the one rank, on every layer.
        drop_order: with compensation, rank each token's candidates by selection score times
            a per-expert factor that grows with how far the expert's stand-in misses its
            output, so the candidates dropped are those whose stand-ins serve best.
    """

    calib: str | None = setting(None, "Calibration text: a UTF-8 text file, or .jsonl (one JSON object per line)"
                                      " [default: the text bundled with allocplan].", path=True)
    calib_dataset: str | None = setting(None, "Read calibration text from a datasets dataset, NAME[:CONFIG]:SPLIT"
                                              " (pip install 'allocplan[datasets]').")
    text_field: str = setting("text", "Field holding the text in a .jsonl calibration file or a dataset.")
    calib_tokens: int = setting(16384, "Tokens of calibration text to score.", minimum=2)
    seq_len: int = setting(256, "Tokens per packed calibration window.", minimum=2)
    strategy: str = setting("isolated", "What the other layers do while one layer is profiled (anchored: an"
                                        " approximate S for deep models: a probe skips the later layers).",
                            choices=PROFILE_STRATEGIES)
    metric: str = setting("kl", "Sensitivity metric: KL divergence from the full model, or NLL increase.",
                          choices=PROFILE_METRICS)
    k_min: int = setting(1, "Smallest top-k a layer may be given.", minimum=1)
    k_step: float = setting(1.0, "Candidate grid: whole experts, or halves realised by token-level allocation.",
                            choices=K_STEPS)
    batch_size: int = setting(8, "Calibration windows per forward pass; with token-level allocation also the"
                                 " tokens that pool a layer's budget while measuring, so it moves the plan"
                                 " slightly (keep it fixed to reproduce a plan).", minimum=1)
    weight_fit: str = setting("auto", "Fit each layer's weight treatment (normaliser width or gain) per k on"
                                      " calibration text, and profile with it.", choices=WEIGHT_FIT_CHOICES)
    compensation: str = setting("auto", "Compensate dropped experts with stand-ins fitted on calibration text"
                                        " (mean output per expert or per layer, or mean plus a low-rank linear"
                                        " map), and profile with them.", choices=compensation_choices)
    compensation_rank: int | None = setting(None, "Rank of the linear stand-ins of --compensation linear"
                                                  " [default: the largest within --compensation-share].",
                                            minimum=1)
    compensation_share: float = setting(STAND_IN_SHARE, "Without --compensation-rank, each layer's linear stand-ins"
                                                        " take the largest rank costing at most this share of one"
                                                        " expert's multiply-adds.", minimum=0.01, maximum=1.0)
    stand_in_choice: bool = setting(True, "Profile each layer without stand-ins and with every stand-in rank"
                                          " offered (the constant, the rank within --compensation-share and"
                                          " twice it), and let the solver choose per layer where the charged"
                                          " work goes; --fixed-stand-ins: the one rank on every layer.",
                                    flag="--stand-in-choice/--fixed-stand-ins")
    drop_order: bool = setting(True, "With compensation, drop first the candidates whose stand-ins miss their"
                                     " expert's output least (a per-expert factor on the selection score).",
                               flag="--drop-order/--no-drop-order")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.calib_tokens < self.seq_len:
            raise AllocplanError(f"--calib-tokens {self.calib_tokens} is smaller than --seq-len {self.seq_len};"
                                 " raise it")
        if self.calib is not None and self.calib_dataset is not None:
            raise AllocplanError("--calib and --calib-dataset both name calibration text; give one")
        if self.calib_dataset is not None:
            parse_dataset_spec(self.calib_dataset)
        if not self.text_field or len(self.text_field) > 200:
            raise AllocplanError("--text-field must be a field name of 1 to 200 characters")
        # Settings that nothing would read are refused rather than ignored, so nobody believes they were used.
        if self.text_field != "text" and self.calib_dataset is None and not is_jsonl(self.calib):
            raise AllocplanError(f"--text-field {self.text_field} names the field of a .jsonl --calib or a"
                                 " --calib-dataset; plain calibration text has none: leave it out")
        if self.compensation == "off" or (self.compensation != "auto"
                                          and not get_stand_in_kind(self.compensation).low_rank):
            if self.compensation_rank is not None or self.compensation_share != STAND_IN_SHARE:
                flag = "--compensation-rank" if self.compensation_rank is not None else "--compensation-share"
                raise AllocplanError(f"{flag} shapes linear stand-ins, which --compensation {self.compensation} does"
                                     f" not fit; leave it out or use --compensation linear")
            if not self.drop_order and self.compensation == "off":
                raise AllocplanError("--no-drop-order changes the order of stand-ins, which --compensation off does"
                                     " not fit; leave it out")
            if not self.stand_in_choice and self.compensation == "off":
                raise AllocplanError("--fixed-stand-ins fixes the rank of stand-ins, which --compensation off does"
                                     " not fit; leave it out")
        elif self.compensation_rank is not None and self.compensation_share != STAND_IN_SHARE:
            raise AllocplanError("--compensation-share chooses the rank that --compensation-rank gives; give one")
        if self.strategy == "anchored" and self.metric != "kl":
            # The anchor's scale is a ratio of two losses; an NLL increase can be 0 or negative, a KL cannot.
            raise AllocplanError(f"--strategy anchored scales each probe by a ratio of KL divergences; --metric"
                                 f" {self.metric} can be 0 or negative there: use --metric kl")


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
        scope: which tokens share a layer's Alloc-T budget: ``batch`` (all tokens of a
            forward) or ``sequence`` (each sequence alone: batch-invariant outputs, for
            continuous batching).
        prefer: which remaining candidates Alloc-T runs: ``score`` (the best) or ``active``
            (first those whose expert already runs in the same pool: fewer distinct experts
            per batched decode step at the same number of pairs).
    """

    token_level: bool = setting(True, "Alloc-T: redistribute each layer's activations between the tokens of"
                                      " a forward pass.", flag="--token-level/--no-token-level")
    k_base: int = setting(1, "Experts every token keeps under token-level allocation.", minimum=0)
    k_max: int | None = setting(None, "Most experts one token can get [default: the layer's original top-k].",
                                minimum=1)
    renormalize: str = setting("model", "How the kept experts' weights are normalised.", choices=RENORMALIZE_MODES)
    reference_k: int | None = setting(None, "k' of --renormalize decoupled [default: the layer's original top-k].",
                                      minimum=1)
    scope: str = setting("batch", "Tokens that share a layer's Alloc-T budget: all of a forward pass (batch) or"
                                  " each sequence alone (sequence: outputs do not depend on batch-mates).",
                         choices=TOKEN_SCOPES)
    prefer: str = setting("score", "Which remaining candidates Alloc-T runs: the best-scoring (score) or first"
                                   " those whose expert already runs in the same pool (active: fewer distinct"
                                   " experts per batched decode step).", choices=TOKEN_PREFERENCES)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.k_max is not None and self.k_max < self.k_base:
            raise AllocplanError(f"--k-max {self.k_max} is below --k-base {self.k_base}")
        if self.reference_k is not None and self.renormalize != "decoupled":
            raise AllocplanError("--reference-k is only used with --renormalize decoupled; leave it out")
        if not self.token_level:
            defaults = RoutingConfig.__dataclass_fields__
            for name in ("k_base", "scope", "prefer"):
                if getattr(self, name) != defaults[name].default:
                    raise AllocplanError(f"{flag_of(defaults[name])} {getattr(self, name)} applies to token-level"
                                         " allocation (Alloc-T), which is off here (--no-token-level, or a profile"
                                         " measured with plain top-k); leave it out or add --token-level")

    def check_fits(self, originals: list[int]) -> None:
        """Refuse a ``k_max`` or ``reference_k`` above the smallest original top-k of a model's MoE layers
        (``originals``), in the flags' words (a plan would refuse the same in its fields').

        Raises:
            AllocplanError: naming the flag and the largest value the model allows.
        """
        smallest = min(originals, default=None)
        for flag, value in (("--k-max", self.k_max), ("--reference-k", self.reference_k)):
            if value is not None and smallest is not None and value > smallest:
                raise AllocplanError(f"{flag} {value} is above the smallest original top-k of the model's MoE"
                                     f" layers, {smallest}; give at most {smallest}, or leave {flag} out")

    def token_level_record(self) -> TokenLevel:
        """The plan's ``token_level`` record."""
        return TokenLevel(enabled=self.token_level, k_base=self.k_base, k_max=self.k_max, scope=self.scope,
                          prefer=self.prefer)

    def weights_record(self) -> Weights:
        """The plan's ``weights`` record."""
        return Weights(renormalize=self.renormalize, reference_k=self.reference_k)


@dataclass(frozen=True)
class RefineConfig:
    """The measured refinement after the DP (see :mod:`allocplan.planner.refine`).

    Attributes:
        refine: run it: a local search over one-expert exchanges between layers, each
            candidate run whole on calibration windows and scored by KL from the full model.
        refine_steps: most exchanges taken.
        refine_tokens: calibration tokens each candidate is scored on (the first ones of the
            profiling windows).
    """

    refine: bool = setting(False, "After the DP, move experts between layers while the measured calibration"
                                 " KL of the whole plan falls.", flag="--refine/--no-refine")
    refine_steps: int = setting(8, "Most one-expert exchanges the refinement takes.", minimum=1)
    refine_tokens: int = setting(4096, "Calibration tokens each refinement candidate is scored on.", minimum=2)

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class LoadConfig:
    """How a model named by the user is loaded (see :func:`allocplan.load_model`).

    The fields beyond ``device`` go to transformers' ``from_pretrained`` as they are.

    Attributes:
        device: torch device to run the model on (ignored with ``device_map``).
        dtype: dtype to load the weights in; ``auto`` (the default) keeps the checkpoint's
            own, so a bf16 checkpoint is not inflated to float32.
        device_map: transformers' ``device_map`` (e.g. ``auto``: spread over the GPUs, CPU
            memory and disk; needs the accelerate package); None loads onto ``device``.
        max_memory: per-device memory caps for ``device_map``, as ``DEVICE=SIZE`` pairs joined
            by commas (``0=70GiB,cpu=200GiB``).
        offload_folder: where ``device_map`` offloads the layers that fit nowhere else.
        revision: hub branch, tag or commit to load; the commit it resolves to is recorded
            in the plan (``model.revision``).
        attn_implementation: transformers' attention implementation (``eager``, ``sdpa``,
            ``flash_attention_2``, ...); None lets transformers choose.
        trust_remote_code: allow a checkpoint's own Python code (off unless asked).
        pickle_weights: also load weights stored as pickle (``pytorch_model.bin``), through
            torch's weights-only unpickler; off: safetensors only, so no checkpoint file is
            unpickled unless asked.
    """

    device: str = setting("cpu", "torch device to run the model on (ignored with --device-map).")
    dtype: str = setting("auto", "dtype to load the weights in (auto: the checkpoint's own).", choices=DTYPES)
    device_map: str | None = setting(None, "transformers device_map, e.g. auto (needs accelerate) [default: all on"
                                           " --device].")
    max_memory: str | None = setting(None, "Memory caps for --device-map, e.g. 0=70GiB,cpu=200GiB.")
    offload_folder: str | None = setting(None, "Folder for the layers --device-map offloads to disk.")
    revision: str | None = setting(None, "Hub branch, tag or commit to load (recorded in the plan as a commit).")
    attn_implementation: str | None = setting(None, "transformers attention implementation: eager, sdpa,"
                                                    " flash_attention_2, ... [default: transformers' choice].")
    trust_remote_code: bool = setting(False, "Allow a checkpoint's own Python code (off by default).")
    pickle_weights: bool = setting(False, "Also load weights stored as pickle (pytorch_model.bin) through torch's"
                                          " weights-only unpickler [default: safetensors only].")

    def __post_init__(self) -> None:
        check_settings(self)
        for name in ("device", "device_map", "revision", "attn_implementation", "max_memory", "offload_folder"):
            value = getattr(self, name)
            if value is not None and (not value or len(value) > 200 or not value.isprintable() or " " in value):
                raise AllocplanError(f"{name} (--{name.replace('_', '-')}) {value[:40]!r} must be one word of 1 to 200"
                                     " printable characters")
        if self.max_memory is not None:
            self.max_memory_map()
            if self.device_map is None:
                raise AllocplanError("--max-memory caps what --device-map places; give --device-map too")
        if self.offload_folder is not None and self.device_map is None:
            raise AllocplanError("--offload-folder is where --device-map offloads layers; give --device-map too")

    def max_memory_map(self) -> dict[int | str, str] | None:
        """``max_memory`` as transformers takes it: GPU indices as ints, ``cpu``/``disk`` as names."""
        if self.max_memory is None:
            return None
        caps: dict[int | str, str] = {}
        for item in self.max_memory.split(","):
            device, _, size = item.partition("=")
            if not device or not size or not re.fullmatch(r"[0-9]+(\.[0-9]+)?\s*([KMGT]i?B)?", size, re.IGNORECASE):
                raise AllocplanError(f"--max-memory {self.max_memory[:60]!r}: each item must be DEVICE=SIZE, e.g."
                                     " 0=70GiB,cpu=200GiB")
            caps[int(device) if device.isdigit() else device] = size
        return caps

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for transformers' ``from_pretrained`` (dtype as its name; the
        loader turns it into a torch dtype)."""
        kwargs: dict[str, Any] = {"dtype": self.dtype, "trust_remote_code": self.trust_remote_code}
        if not self.pickle_weights:
            kwargs["use_safetensors"] = True  # transformers would otherwise fall back to pytorch_model.bin
        for name in ("device_map", "revision", "attn_implementation", "offload_folder"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory_map()
        return kwargs


@dataclass(frozen=True)
class EvalConfig:
    """What ``allocplan eval`` scores and how (see :func:`allocplan.run_eval`).

    Exactly one of ``plan`` and ``method`` says what is evaluated; the rest says on what text and in
    which mode. Which inputs a method reads (a profile, calibration text, a seed) is the method
    registry's to say, so ``run_eval`` refuses the ones it would not read.

    Attributes:
        data: UTF-8 text the NLL is measured on (never calibrated on).
        plan: a plan file to apply.
        method: a registered routing method to evaluate at ``budget`` instead of a plan.
        budget: the budget ratio of ``method``.
        arith: arithmetic problems, one ``a+b=c`` per line, scored by greedy generation.
        calib: calibration text for the methods that profile or calibrate; None: the bundled text.
        profile_file: a stored sensitivity profile for the methods that solve one; None: profile
            ``calib`` now, with plain top-k probes and no treatment, as the paper does.
        seed: the seed of the methods that draw at random; None: the methods' default seed.
        seq_len: tokens per scored window.
        max_tokens: tokens of ``data`` to score.
        mode: how ``data`` is scored (:data:`EVAL_MODES`).
        exact_decode: in the decode modes, one forward per token instead of the equivalent
            forward per window.
    """

    data: str | None = setting(None, "UTF-8 text for NLL (never calibrate on it).", path=True)
    plan: str | None = setting(None, "Evaluate with this plan applied.", path=True)
    method: str | None = setting(None, "Evaluate a registered routing method at --budget instead of a plan"
                                       " (docs/results.md).")
    budget: float | None = setting(None, "Budget ratio for --method.", above=0.0, maximum=1.0)
    arith: str | None = setting(None, "Arithmetic problems, one 'a+b=c' per line.", path=True)
    calib: str | None = setting(None, "Calibration text for methods that need it [default: the bundled calibration"
                                      " text].", path=True)
    profile_file: str | None = setting(None, "Sensitivity profile for alloc-l / alloc-lt [default: profile --calib"
                                             " now, plain top-k with no treatment or compensation, as the paper"
                                             " does].", flag="--profile", path=True)
    seed: int | None = setting(None, "Seed of --method random and of lexi's Gaussian inputs [default: 0].")
    seq_len: int = setting(256, "Tokens per scored window.", minimum=2)
    max_tokens: int = setting(16384, "Tokens of --data to score.", minimum=2)
    mode: str = setting("prefill", "How --data is scored: windows in batches of 8, one forward each (prefill), or"
                                   " token by token through the KV cache at batch 1 or 8 (decode-b1, decode-b8: the"
                                   " tokens Alloc-T pools in generation).", choices=tuple(EVAL_MODES))
    exact_decode: bool = setting(False, "Decode modes: run one forward per token instead of the equivalent forward"
                                        " per window.")

    def __post_init__(self) -> None:
        check_settings(self)
        if self.exact_decode and self.mode == "prefill":
            raise AllocplanError("--exact-decode applies to the decode modes only; add --mode decode-b1 or decode-b8,"
                                 " or leave it out")


@dataclass(frozen=True)
class BenchConfig:
    """What ``allocplan bench`` times and how (see :func:`allocplan.run_bench`).

    Either a plan on its trained model, or a preset shape (random weights) under a uniform
    budget; the untouched model is timed beside it in the same process.

    Attributes:
        plan: a plan file to time against the untouched model.
        model: the trained model a ``plan`` is timed on; None: the one the plan names.
        preset: a preset shape (``allocplan.BENCH_PRESETS``) to time instead of a plan.
        budget: the uniform plan's budget for ``preset``; None: the presets' budget.
        token_level: Alloc-T for the ``preset`` plan (fractional budgets always use it); None: off.
        compensation: also time the ``preset`` plan with stand-ins of this kind for its dropped experts.
        batch: prefill batch size.
        prompt_len: prompt tokens of each prefill.
        new_tokens: decode steps timed.
        repeat: interleaved rounds.
        decode_batch: batch of the batched decode measure.
        profile_cost: also time profiling with allocplan's reuse and naively.
        solver_cost: also time the DP and the ILP on a 60-layer, k<=16 instance.
        breakdown: also split prefill and decode time into router, expert matmuls, other expert
            work and the rest.
        threads: torch threads; None: torch's.
        device: torch device to time on.
        dtype: dtype to run the model in.
    """

    plan: str | None = setting(None, "Plan to time against the untouched model.", path=True)
    model: str | None = setting(None, "Trained model to time (with --plan) [default: the one named in the plan].")
    preset: str | None = setting(None, "Time a randomly initialised model of this shape, planned uniformly at"
                                       " --budget.", flag="--config")
    budget: float | None = setting(None, "Budget of the uniform plan for --config.", above=0.0, maximum=1.0)
    token_level: bool | None = setting(None, "Alloc-T for the --config plan (fractional budgets always use it)"
                                             " [default: off].", flag="--token-level/--no-token-level")
    compensation: str | None = setting(None, "Also time the --config plan with stand-ins of this kind for its"
                                             " dropped experts.", choices=stand_in_kinds)
    batch: int = setting(1, "Prefill batch size.", minimum=1)
    prompt_len: int = setting(256, "Prompt tokens of each prefill.", minimum=2)
    new_tokens: int = setting(32, "Decode steps timed.", minimum=1)
    repeat: int = setting(5, "Interleaved rounds.", minimum=1)
    decode_batch: int = setting(8, "Batch of the batched decode measure.", minimum=2)
    profile_cost: bool = setting(False, "Also time profiling with allocplan's reuse and naively (a full forward per"
                                        " (layer, k)).")
    solver_cost: bool = setting(False, "Also time the DP and the ILP on a 60-layer, k<=16 instance.")
    breakdown: bool = setting(False, "Also split prefill and decode time into router, expert matmuls, other expert"
                                     " work and the rest.")
    threads: int | None = setting(None, "torch threads [default: torch's].", minimum=1)
    device: str = setting("cpu", "torch device to time on; on cuda every reading waits for the queued kernels.")
    dtype: str = setting("float32", "dtype to run the model in.", choices=BENCH_DTYPES)

    def __post_init__(self) -> None:
        check_settings(self)
        if not self.device or len(self.device) > 200 or not self.device.isprintable() or " " in self.device:
            raise AllocplanError(f"device (--device) {self.device[:40]!r} must be one word of 1 to 200 printable"
                                 " characters")


@dataclass(frozen=True)
class Recipe:
    """A compile's settings as one reviewable YAML document (no model: one recipe serves many).

    Attributes:
        budget: the budget, or None to take it from the command line.
        profile: how sensitivities are measured.
        routing: how the plan routes at runtime (and the probes route while profiling).
        refine: the measured refinement after the DP.
        eval: what ``allocplan eval --recipe`` scores and how.
        bench: what ``allocplan bench --recipe`` times and how.
    """

    budget: BudgetRequest | None = None
    profile: ProfileConfig = ProfileConfig()
    routing: RoutingConfig = RoutingConfig()
    refine: RefineConfig = RefineConfig()
    eval: EvalConfig = EvalConfig()
    bench: BenchConfig = BenchConfig()

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
    try:
        return from_data(Recipe, body, where, defaults=True)
    except AllocplanError as exc:
        # A setting's own check speaks in flags (--metric ...); in a recipe, name the file as well.
        message = str(exc)
        raise AllocplanError(message if message.startswith(where) else f"{where}: {message}") from None


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Load a recipe file strictly (unknown keys and wrong types are errors)."""
    return recipe_from_data(load_yaml_file(path, "recipe"), where=f"recipe {os.fspath(path)!r}")


def save_recipe(recipe: Recipe, path: str | os.PathLike[str]) -> None:
    """Write a recipe atomically as canonical YAML."""
    atomic_write_text(path, recipe.to_yaml())
