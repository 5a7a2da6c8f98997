"""Find a loaded model's MoE layers through the family registry, set their top-k, and name the model."""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

from allocplan.errors import AllocplanError
from allocplan.formats.provenance import ModelIdentity
from .families import MoEFamily, config_value, get_family, model_fingerprint


@dataclass(frozen=True)
class MoELayer:
    """One MoE block of a loaded model.

    Attributes:
        path: exact module path of the block (``model.layers.3.mlp``).
        index: decoder layer index.
        block: the MoE block module.
        router: the router module.
        experts: the routed experts module as loaded (receives ``top_k_index`` [T, k]).
        top_k_attr: name of the attribute holding k.
        top_k_on: where that attribute lives: ``router``, ``block`` or ``router_config``.
        experts_attr: attribute of ``block`` holding the experts (a plan may swap the module).
    """

    path: str
    index: int
    block: Any
    router: Any
    experts: Any
    top_k_attr: str
    top_k_on: str = "router"
    experts_attr: str = "experts"

    def _owner(self) -> Any:
        if self.top_k_on == "block":
            return self.block
        if self.top_k_on == "router_config":
            return self.router.config
        return self.router

    @property
    def top_k(self) -> int:
        return getattr(self._owner(), self.top_k_attr)

    def set_top_k(self, k: int, *, own_holder: bool = False) -> None:
        """Route each token of this layer to its top-k experts from the next forward on.

        ``own_holder``: an earlier call already gave this router its own config copy
        (per-forward changes under a plan skip the copy).
        """
        if self.top_k_on == "router_config" and not own_holder:
            # Every layer's router reads one shared model config: give this router its own copy.
            self.router.config = copy.copy(self.router.config)
        setattr(self._owner(), self.top_k_attr, k)

    def snapshot(self) -> Any:
        """State that ``restore`` puts back exactly (the config object itself where k lives there)."""
        return self.router.config if self.top_k_on == "router_config" else self.top_k

    def restore(self, snapshot: Any) -> None:
        if self.top_k_on == "router_config":
            self.router.config = snapshot
        else:
            setattr(self._owner(), self.top_k_attr, snapshot)


def model_family(model: Any) -> MoEFamily:
    """Registry entry for a loaded model (error lists supported families)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise AllocplanError("the model has no config.model_type; pass a Hugging Face transformers model")
    return get_family(model_type)


def find_moe_layers(model: Any) -> list[MoELayer]:
    """Every MoE block of ``model``, sorted by layer index.

    A decoder layer is MoE when its block has the family's router with a top-k
    attribute; dense layers (e.g. DeepSeek's first layers) are skipped.

    Raises:
        AllocplanError: unknown family, or a layout that does not match the registry.
    """
    family = model_family(model)
    try:
        decoder_layers = model.get_submodule(family.layers_path)
    except AttributeError:
        raise AllocplanError(
            f"{family.model_type} model has no {family.layers_path!r}; is this a causal-LM checkpoint"
            " of that family (AutoModelForCausalLM)?"
        ) from None
    found = []
    for index, decoder_layer in enumerate(decoder_layers):
        block = getattr(decoder_layer, family.block_attr, None) if family.block_attr else decoder_layer
        router = getattr(block, family.router_attr, None)
        experts = getattr(block, family.experts_attr, None)
        if router is None or experts is None:
            continue  # a dense layer
        layer = MoELayer(
            path=f"{family.layers_path}.{index}" + (f".{family.block_attr}" if family.block_attr else ""),
            index=index,
            block=block,
            router=router,
            experts=experts,
            top_k_attr=family.top_k_attr,
            top_k_on=family.top_k_on,
            experts_attr=family.experts_attr,
        )
        if getattr(layer._owner(), family.top_k_attr, None) is None:
            continue
        found.append(layer)
    if not found:
        raise AllocplanError(f"found no MoE layers in this {family.model_type} model")
    return found


def expert_multiply_adds(layer: MoELayer) -> float:
    """One routed expert's multiply-adds per token: its parameter count (every weight is used once). The
    unit of work a charged budget counts in (expert-equivalents)."""
    return sum(p.numel() for p in layer.experts.parameters()) / layer.experts.num_experts


def module_device(module: Any) -> Any:
    """Where ``module`` computes: accelerate's execution device for a module placed by a
    ``device_map`` (its weights may sit offloaded on the meta device), else the device of
    its first parameter that holds data (the CPU when it has none)."""
    import torch

    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for parameter in module.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def input_device(model: Any) -> Any:
    """Where a model's input ids go: its input embedding's device."""
    return module_device(model.get_input_embeddings())


# The hub revision each loaded model came from, as the loader resolved it (a weak map: the
# model instance stays untouched and nothing outlives it).
_REVISIONS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def record_revision(model: Any, revision: str | None) -> None:
    """Remember the hub revision ``model`` was loaded from, for its identity record."""
    if revision is not None:
        _REVISIONS[model] = revision


def identity_mismatch(identity: ModelIdentity, model: Any) -> str | None:
    """None when ``identity`` (a plan's or profile's model record) describes ``model``'s architecture,
    else "'<name>' (<family>, <fingerprint>) but the model is <family> with fingerprint <fingerprint>"."""
    model_type = model_family(model).model_type
    fingerprint = model_fingerprint(model.config.to_dict())
    if model_type == identity.model_type and fingerprint == identity.fingerprint:
        return None
    return (f"{identity.name!r} ({identity.model_type}, {identity.fingerprint}) but the model is {model_type}"
            f" with fingerprint {fingerprint}")


def model_identity(model: Any, name: str) -> ModelIdentity:
    """Identity record (name, revision, family, fingerprint, sizes) of a loaded model."""
    family = model_family(model)
    config = model.config.to_dict()
    return ModelIdentity(
        name=name,
        revision=_REVISIONS.get(model),
        model_type=family.model_type,
        fingerprint=model_fingerprint(config),
        num_moe_layers=len(find_moe_layers(model)),
        num_experts=int(config_value(config, family.num_experts_keys, "number of routed experts")),
    )
