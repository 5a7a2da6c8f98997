"""The allocation: what ``apply_plan`` runs on a model.

An allocation names every MoE layer of one model by exact module path and
gives its planned experts per token, together with the token-level (Alloc-T)
and weight settings. A :class:`~allocplan.formats.plan.Plan` is an allocation
plus the budget it was solved for, the solver's record and its provenance;
an allocation on its own is what a baseline, a probe during profiling or a user
builds in code (``allocplan.allocation_for``). Pure data: no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import AllocplanError
from ..weight_treatments import WEIGHT_TREATMENTS
from .provenance import ModelIdentity
from .records import read_flat_record, transient
from .sidecar import CompensationRecord

# Which tokens share a layer's budget under Alloc-T: all tokens of a forward pass, or each sequence's own.
TOKEN_SCOPES = ("batch", "sequence")
# Which remaining candidates Alloc-T fills a layer's budget with: the best-scoring ones, or first those whose
# expert already runs for another token of the same pool (OEA-style: fewer distinct experts per decode step).
TOKEN_PREFERENCES = ("score", "active")
# Weight normalisation modes the runtime implements (see allocplan.runtime.routing.reweight).
RENORMALIZE_MODES = ("model", "none", "renorm", "decoupled")


@dataclass(frozen=True)
class LayerAllocation:
    """One MoE layer's allocation.

    Attributes:
        path: exact module path of the MoE block (``model.layers.3.mlp``).
        index: decoder layer index (the number in ``path``).
        original_k: the model's own top-k for this layer.
        planned_k: experts per token under the allocation; a whole number unless
            token-level allocation is enabled, which realises fractional averages.
        treatments: the layer's weight treatments (allocplan/weight_treatments/) as (field, value)
            pairs; a field left out keeps its neutral value. Files write every registered field
            flat in the entry, in registration order: ``normalizer_k`` (k2 of decoupled
            renormalisation; null leaves the plan's weight mode in charge) and ``gain`` (on the
            kept routed weights; 1.0 leaves them as they are).
        stand_in_rank: the rank of the stand-ins that serve this layer's dropped candidates (0:
            the constant alone), or None: none serve them. In a plan written before version 3
            every entry is None and the sidecar serves every layer at the rank it holds.
    """

    path: str
    index: int
    original_k: int
    planned_k: int | float
    treatments: tuple[tuple[str, Any], ...] = ()
    stand_in_rank: int | None = None

    def __post_init__(self) -> None:
        if self.stand_in_rank is not None and not 0 <= self.stand_in_rank <= 1_000_000:
            raise AllocplanError(f"layer {self.path}: stand_in_rank {self.stand_in_rank} is negative or absurd;"
                                 " recompile the plan")
        # One form for one meaning: neutral values left out, the rest in registration order.
        given = dict(self.treatments)
        by_field = {treatment.field: treatment for treatment in WEIGHT_TREATMENTS.values()}
        unknown = sorted(set(given) - set(by_field))
        if unknown:
            raise AllocplanError(f"layer {self.path}: unknown weight treatment field(s) {', '.join(unknown)};"
                                 f" registered: {', '.join(by_field)}")
        object.__setattr__(self, "treatments", tuple(
            (name, given[name]) for name in by_field if name in given and given[name] != by_field[name].neutral))

    def __getattr__(self, name: str) -> Any:
        # A registered treatment's field reads as an attribute (entry.gain, entry.normalizer_k).
        if name != "treatments" and name in {t.field for t in WEIGHT_TREATMENTS.values()}:
            return self.treatment(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def treatment(self, field_name: str) -> Any:
        """The value of weight treatment field ``field_name`` (its neutral value when not set)."""
        for name, value in self.treatments:
            if name == field_name:
                return value
        return next(t.neutral for t in WEIGHT_TREATMENTS.values() if t.field == field_name)

    def with_treatments(self, **values: Any) -> "LayerAllocation":
        """This entry with the given treatment fields set (``entry.with_treatments(gain=1.1)``)."""
        return dataclasses.replace(self, treatments=tuple({**dict(self.treatments), **values}.items()))

    @property
    def treated(self) -> bool:
        """Whether a weight treatment applies to this layer."""
        return bool(self.treatments)

    def to_record(self) -> dict[str, Any]:
        """The entry as files hold it: the four keys, then every registered treatment field."""
        return {"path": self.path, "index": self.index, "original_k": self.original_k, "planned_k": self.planned_k,
                "stand_in_rank": self.stand_in_rank,
                **{t.field: self.treatment(t.field) for t in WEIGHT_TREATMENTS.values()}}

    @classmethod
    def from_record(cls, value: Any, where: str, convert: Any) -> "LayerAllocation":
        """An entry from a file's mapping: the four keys, and any registered treatment field (one left out,
        as in plans written before it was registered, keeps its neutral value)."""
        base = {"path": str, "index": int, "original_k": int, "planned_k": int | float}
        extra = {"stand_in_rank": int | None, **{t.field: t.file_type for t in WEIGHT_TREATMENTS.values()}}
        values, treatments = read_flat_record(value, where, base, extra, convert)
        rank = treatments.pop("stand_in_rank", None)
        return cls(**values, treatments=tuple(treatments.items()), stand_in_rank=rank)


@dataclass(frozen=True)
class TokenLevel:
    """Alloc-T: redistribute a layer's activations between the tokens of a forward pass.

    Attributes:
        enabled: whether the runtime redistributes (otherwise plain top-k_l per token).
        k_base: experts every real token keeps before the redistribution (capped at
            floor(planned_k) in a layer).
        k_max: most experts one token can get; candidates are each token's top-k_max.
            None means each layer's original_k.
        scope: which tokens share a layer's budget: ``batch`` (every token of a forward
            pass, as Alloc-MoE does) or ``sequence`` (each sequence its own budget, as
            SeqTopK does: a sequence's output never depends on its batch-mates; in decode,
            each sequence has its own ledger).
        prefer: which remaining candidates fill the budget: ``score`` (the highest-scoring,
            as Alloc-MoE does) or ``active`` (first the candidates whose expert already runs
            for a kept pair of the same pool, then the rest, each by score: the same number
            of pairs over fewer distinct experts, which is what batched decode pays for).
    """

    enabled: bool
    k_base: int
    k_max: int | None
    scope: str = "batch"
    prefer: str = "score"


@dataclass(frozen=True)
class Weights:
    """How the combine weights of the experts that still run are normalised.

    Attributes:
        renormalize: ``model`` (as the family does when it routes to the kept set
            natively), ``none`` (the router's weights at its original k), ``renorm``
            (kept weights sum to the family's scaling factor) or ``decoupled``
            (divided by the mass of the token's top-``reference_k`` candidates).
        reference_k: k' for ``decoupled``; None means each layer's original_k.
    """

    renormalize: str
    reference_k: int | None


@dataclass(frozen=True)
class Allocation:
    """Per-layer k and routing settings for one model: the input of ``apply_plan``.

    Construction validates the invariants listed in docs/plan-format.md that do
    not involve a budget (see :func:`validate_allocation`).

    Attributes:
        model / layers / token_level / weights: as in the plan.
        compensation: the sidecar of compensation vectors (one per routed expert and layer)
            added for the dropped candidates, or None.
        compensation_data: the sidecar's bytes, held in memory (never written into the YAML;
            ``load_plan`` reads and checks them, ``save_plan`` writes them beside the plan).
    """

    model: ModelIdentity
    layers: tuple[LayerAllocation, ...]
    token_level: TokenLevel
    weights: Weights
    compensation: CompensationRecord | None = None
    compensation_data: bytes | None = transient()

    def __post_init__(self) -> None:
        validate_allocation(self)

    @property
    def ranked_stand_ins(self) -> bool:
        """Whether each layer's entry says which stand-ins serve it (``stand_in_rank``; plans from version 3),
        rather than the sidecar serving every layer (earlier plans)."""
        return any(layer.stand_in_rank is not None for layer in self.layers)

    @property
    def uses_routing_hooks(self) -> bool:
        """True when the runtime must rewrite routing (Alloc-T, a weight mode or treatment, compensation)."""
        return (self.token_level.enabled or self.weights.renormalize != "model" or self.compensation is not None
                or any(layer.treated for layer in self.layers))

    @property
    def original_activations(self) -> int:
        """Sum of the layers' original top-k."""
        return sum(layer.original_k for layer in self.layers)

    @property
    def planned_activations(self) -> int | float:
        """Sum of the layers' planned k: routed activations per token under the allocation."""
        return sum(layer.planned_k for layer in self.layers)

    def planned_k_by_path(self) -> dict[str, int | float]:
        """Module path -> planned k."""
        return {layer.path: layer.planned_k for layer in self.layers}


def _fail(where: str, message: str) -> None:
    raise AllocplanError(f"{where}: {message}")


def validate_allocation(allocation: "Allocation | Any", where: str = "allocation", k_min: int = 1) -> None:
    """Check the layers, the token-level settings and the weight settings.

    ``allocation`` is an :class:`Allocation` or anything with its four fields (a plan
    validates its own fields here, with its ``k_min`` and its file name in ``where``).

    Raises:
        AllocplanError: naming the first inconsistent field.
    """
    if not allocation.layers:
        _fail(f"{where}.layers", "is empty; a plan needs one entry per MoE layer")
    if len(allocation.layers) != allocation.model.num_moe_layers:
        _fail(f"{where}.layers", f"has {len(allocation.layers)} entries but model.num_moe_layers is"
                                 f" {allocation.model.num_moe_layers}")
    previous = -1
    seen_paths: set[str] = set()
    for i, layer in enumerate(allocation.layers):
        at = f"{where}.layers[{i}]"
        if layer.index <= previous:
            _fail(f"{at}.index", f"layers must be sorted by increasing index ({layer.index} after {previous})")
        previous = layer.index
        if layer.path in seen_paths:
            _fail(f"{at}.path", f"{layer.path!r} appears twice")
        seen_paths.add(layer.path)
        if str(layer.index) not in layer.path.split("."):
            _fail(f"{at}.path", f"{layer.path!r} does not contain its layer index {layer.index}")
        if not (k_min <= layer.planned_k <= layer.original_k):
            _fail(f"{at}.planned_k", f"{layer.planned_k} is outside [k_min={k_min}, original_k={layer.original_k}]")
        if not allocation.token_level.enabled and not float(layer.planned_k).is_integer():
            _fail(f"{at}.planned_k", f"{layer.planned_k} is fractional, which needs token_level.enabled: true")
        width = allocation.token_level.k_max or layer.original_k
        for treatment in WEIGHT_TREATMENTS.values():
            problem = treatment.check(layer.treatment(treatment.field), width)
            if problem is not None:
                _fail(f"{at}.{treatment.field}", problem)
    if allocation.compensation is None and any(layer.stand_in_rank is not None for layer in allocation.layers):
        _fail(f"{where}.compensation", "is null but a layer names a stand_in_rank; recompile the plan")
    smallest_k = min(layer.original_k for layer in allocation.layers)
    token_level = allocation.token_level
    if not (0 <= token_level.k_base <= smallest_k):
        _fail(f"{where}.token_level.k_base",
              f"{token_level.k_base} must be between 0 and the smallest original_k {smallest_k}")
    if token_level.k_max is not None:
        if not (1 <= token_level.k_max <= smallest_k):
            _fail(f"{where}.token_level.k_max",
                  f"{token_level.k_max} must be between 1 and the smallest original_k {smallest_k}")
        if token_level.k_max < token_level.k_base:
            _fail(f"{where}.token_level.k_max", f"{token_level.k_max} is below k_base {token_level.k_base}")
        for i, layer in enumerate(allocation.layers):
            if layer.planned_k > token_level.k_max:
                _fail(f"{where}.layers[{i}].planned_k",
                      f"{layer.planned_k} exceeds token_level.k_max {token_level.k_max}")
    if token_level.scope not in TOKEN_SCOPES:
        _fail(f"{where}.token_level.scope", f"{token_level.scope!r} is not one of {', '.join(TOKEN_SCOPES)}")
    if token_level.prefer not in TOKEN_PREFERENCES:
        _fail(f"{where}.token_level.prefer",
              f"{token_level.prefer!r} is not one of {', '.join(TOKEN_PREFERENCES)}")
    weights = allocation.weights
    if weights.renormalize not in RENORMALIZE_MODES:
        _fail(f"{where}.weights.renormalize",
              f"{weights.renormalize!r} is not one of {', '.join(RENORMALIZE_MODES)}")
    if weights.reference_k is not None:
        if weights.renormalize != "decoupled":
            _fail(f"{where}.weights.reference_k", "is only used with renormalize: decoupled; set it to null")
        if not (1 <= weights.reference_k <= smallest_k):
            _fail(f"{where}.weights.reference_k",
                  f"{weights.reference_k} must be between 1 and the smallest original_k {smallest_k}")
