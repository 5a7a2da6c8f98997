"""Load models, configs and tokenizers by the name a user gives, with one-line errors.

A name is a local directory, ``bundled:<name>`` for a model shipped inside the
allocplan package, or a Hugging Face hub id. ``trust_remote_code`` stays off
unless the caller asks for it (:class:`~allocplan.formats.config.LoadConfig`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundled import BUNDLED_DIR, BUNDLED_PREFIX, bundled_model_names
from .errors import AllocplanError
from .formats.config import LoadConfig


def resolve_model_source(name: str) -> str:
    """Local directory path or hub id that transformers should load for ``name``.

    Raises:
        AllocplanError: unknown bundled name, or a path-like name that is not a directory.
    """
    if name.startswith(BUNDLED_PREFIX):
        short = name[len(BUNDLED_PREFIX) :]
        if short not in bundled_model_names():
            raise AllocplanError(
                f"no bundled model {short!r}; bundled models: {', '.join(bundled_model_names()) or 'none'}"
            )
        return str(BUNDLED_DIR / short)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AllocplanError(f"model directory {name!r} has no config.json; point --model at a saved checkpoint")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise AllocplanError(f"model directory {name!r} does not exist; pass a checkpoint directory or a hub id")
    return name  # a hub id


def _load_error(name: str, exc: Exception) -> AllocplanError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return AllocplanError(f"cannot load model {name!r}: {first}")


def load_config(name: str, load: LoadConfig | None = None) -> Any:
    """The model's config alone (no weights), e.g. for ``allocplan validate``."""
    from transformers import AutoConfig

    load = load or LoadConfig()
    source = resolve_model_source(name)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=load.trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, exc) from None


def load_model(name: str, load: LoadConfig | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode as ``load`` says (device, dtype, remote code).

    Raises:
        AllocplanError: missing model, or a checkpoint transformers cannot read.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = load or LoadConfig()
    source = resolve_model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=load.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=getattr(torch, load.dtype), trust_remote_code=load.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, exc) from None
    try:
        model.to(load.device)
    except (RuntimeError, AssertionError) as exc:
        raise AllocplanError(f"cannot move the model to device {load.device!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, tokenizer
