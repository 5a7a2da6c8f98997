"""A plan's way into serving: ``allocplan export`` and ``allocplan.from_pretrained``.

``export_plan`` writes a checkpoint directory (the model's weights as loaded, its
tokenizer) whose config.json carries the plan in the form engines read:

* ``uniform``: a plan that is plain top-k (no token-level allocation, no weight
  treatment or compensation) with the same k in every layer sets the family's own
  top-k key (``num_experts_per_tok`` for most): vLLM, SGLang and transformers then
  route at that k with no allocplan code at all;
* ``per-layer``: such a plan with per-layer k, on a family whose config takes a
  per-layer list (hunyuan's ``moe_topk``), sets the list;
* ``plan``: anything else (Alloc-T, treatments, compensation) needs allocplan's
  runtime; config.json gets an ``allocplan`` block naming the plan file.

The plan file (and its sidecar) is always written beside the weights, and the
``allocplan`` block says which form was used. ``from_pretrained`` loads such a
directory (or hub repository) and applies the plan the block names, so the model
runs as ``apply_plan`` on the original would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import AllocplanError
from .formats.config import LoadConfig
from .formats.plan import Plan, load_plan, save_plan
from .formats.records import atomic_write_text, sha256_bytes

PLAN_FILE = "allocplan-plan.yaml"
CONFIG_KEY = "allocplan"


def export_form(plan: Plan, family: Any) -> tuple[str, Any]:
    """(form, value): ``uniform`` and its k, ``per-layer`` and {layer index: k}, or ``plan`` and None."""
    ks = [layer.planned_k for layer in plan.layers]
    if plan.allocation.uses_routing_hooks or not all(float(k).is_integer() for k in ks):
        return "plan", None
    if len(set(ks)) == 1:
        return "uniform", int(ks[0])
    if family.per_layer_top_k_key:
        return "per-layer", {layer.index: int(layer.planned_k) for layer in plan.layers}
    return "plan", None


def _set_key(config: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        config = config.setdefault(key, {})
    config[keys[-1]] = value


def export_plan(plan: Plan | str | os.PathLike[str], model: str, output_dir: str | os.PathLike[str],
                load: LoadConfig | None = None) -> dict[str, Any]:
    """Write a checkpoint directory carrying ``plan`` for ``model`` (module docstring).

    Returns:
        What was written: the form, the config keys set, the files.

    Raises:
        AllocplanError: the plan does not fit the model, or the directory is not empty.
    """
    from .loading import load_model
    from allocplan.runtime.apply import check_allocation_matches
    from allocplan.runtime.layers import model_family

    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise AllocplanError(f"export directory {str(out)!r} is not empty; give a new or empty directory")
    loaded, tokenizer = load_model(model, load)
    check_allocation_matches(plan.allocation, loaded)  # before writing anything
    family = model_family(loaded)
    form, value = export_form(plan, family)
    out.mkdir(parents=True, exist_ok=True)
    loaded.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_plan(plan, out / PLAN_FILE)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    keys = []
    if form == "uniform":
        keys = [family.top_k_keys[0]]
        _set_key(config, keys[0], value)
    elif form == "per-layer":
        layers = config[family.layers_count_key] if family.layers_count_key in config else None
        listed = [value.get(i, _original_k(plan, i)) for i in range(layers or max(value) + 1)]
        keys = [family.per_layer_top_k_key]
        _set_key(config, keys[0], listed)
    config[CONFIG_KEY] = {
        "plan": PLAN_FILE,
        "sha256": sha256_bytes((out / PLAN_FILE).read_bytes()),
        "form": form,
        "applied_in_config": form != "plan",
        "config_keys": keys,
    }
    atomic_write_text(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"form": form, "config_keys": keys, "directory": str(out),
            "files": sorted(path.name for path in out.iterdir())}


def _original_k(plan: Plan, index: int) -> int:
    return next((layer.original_k for layer in plan.layers if layer.index == index), plan.layers[0].original_k)


def from_pretrained(path_or_id: str | os.PathLike[str], plan: Plan | str | os.PathLike[str] | None = None,
                    **hf_kwargs: Any) -> Any:
    """Load a causal LM with transformers and apply its exported plan (or ``plan``).

    ``hf_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` unchanged (``dtype``,
    ``device_map``, ``revision``, ...), with ``use_safetensors=True`` unless given: as the CLI
    does without ``--pickle-weights``, no checkpoint file is unpickled unless asked
    (``use_safetensors=False``). A checkpoint written by ``export`` names its plan in
    config.json: a ``plan``-form export gets it applied; a ``uniform`` or ``per-layer``
    export already routes at its k and runs through allocplan's experts path, which is what
    ``apply_plan`` on the original runs. ``allocplan.plan_handle(model)`` gives the handle.

    Raises:
        AllocplanError: the plan file is missing or changed, or the plan does not fit.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path_or_id, **{"use_safetensors": True, **hf_kwargs})
    attach_plan(model, path_or_id, plan, revision=hf_kwargs.get("revision"))
    model.eval()
    return model


def attach_plan(model: Any, path_or_id: str | os.PathLike[str], plan: Plan | str | os.PathLike[str] | None = None,
                revision: str | None = None) -> Any:
    """Make a model loaded from ``path_or_id`` run as its exported plan (or ``plan``) says.

    The part of :func:`from_pretrained` after loading, for code that loads the model its
    own way (lm-evaluation-harness, a serving wrapper). Returns the plan's handle, or None
    where nothing is applied at runtime.
    """
    from allocplan.runtime.apply import apply_plan
    from allocplan.runtime.experts import register

    block = getattr(model.config, CONFIG_KEY, None)
    if plan is None and isinstance(block, dict) and not block.get("applied_in_config"):
        plan = _exported_plan(path_or_id, block, {"revision": revision})
    if plan is not None:
        return apply_plan(model, plan)
    if isinstance(block, dict) and block.get("applied_in_config"):
        model.set_experts_implementation(register())
    return None


def _exported_plan(path_or_id: str | os.PathLike[str], block: dict, hf_kwargs: dict) -> Plan:
    """The plan file (and sidecar) an export names, from a local directory or the hub's cache."""
    from transformers.utils import cached_file

    def fetch(name: str) -> Path:
        if Path(path_or_id).is_dir():  # a local checkpoint: say so plainly (transformers' message points at the hub)
            if not (Path(path_or_id) / name).is_file():
                raise AllocplanError(f"{str(path_or_id)!r} names {name!r} in config.json, but the checkpoint has no"
                                     " such file; re-export the checkpoint")
            return Path(path_or_id) / name
        try:
            return Path(cached_file(str(path_or_id), name, revision=hf_kwargs.get("revision")))
        except OSError as exc:
            raise AllocplanError(f"{str(path_or_id)!r} names {name!r} in config.json but it cannot be read:"
                                 f" {str(exc).splitlines()[0][:120]}") from None

    name = block.get("plan", PLAN_FILE)
    # A file of the checkpoint itself: no directory part, so config.json cannot point outside it.
    if not isinstance(name, str) or not name.endswith(".yaml") or Path(name).name != name:
        raise AllocplanError(f"{str(path_or_id)!r}: config.json's {CONFIG_KEY}.plan {str(name)[:80]!r} must be a plain"
                             " *.yaml file name inside the checkpoint; re-export the checkpoint")
    plan_path = fetch(name)
    if sha256_bytes(plan_path.read_bytes()) != block.get("sha256"):
        raise AllocplanError(f"{plan_path.name} in {str(path_or_id)!r} does not match the sha256 its config.json"
                             " records; re-export the checkpoint")
    from .formats.plan import plan_from_data
    from .formats.records import load_yaml_file

    parsed = plan_from_data(load_yaml_file(plan_path, "plan"), where=f"plan {plan_path.name!r}")
    if parsed.compensation is not None:
        fetch(parsed.compensation.file)  # into the same (cached) directory as the plan
    return load_plan(plan_path)
