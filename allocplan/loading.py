"""Load models, configs and tokenizers by the name a user gives, with one-line errors.

A name is a local directory, ``bundled:<name>`` for a model shipped inside the
allocplan package, or a Hugging Face hub id. ``trust_remote_code`` stays off
unless the caller asks for it (:class:`~allocplan.formats.config.LoadConfig`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .bundled import BUNDLED_DIR, BUNDLED_PREFIX, bundled_model_names
from .errors import AllocplanError, first_line
from .formats.config import LoadConfig


def resolve_model_source(name: str) -> str:
    """Local directory path or hub id that transformers should load for ``name``.

    Raises:
        AllocplanError: an empty name, an unknown bundled name, or a path-like name that is not a directory.
    """
    if not name.strip():  # Path("") is the current directory, which would be blamed instead
        raise AllocplanError("the model name is empty; give a checkpoint directory, a hub id or bundled:<name>")
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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout`` (and offline mode is off)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline(offline: bool = True) -> Iterator[None]:
    """With ``offline``, datasets and huggingface_hub in offline mode (their own switches, read at each
    call; the environment variables are read only at import), restored afterwards: how
    ``from_cache_or_hub`` asks datasets for its local cache only, and how ``allocplan lm-eval`` keeps
    an unreachable hub from costing half a minute of retries per dataset."""
    if not offline:
        yield
        return
    import datasets
    import huggingface_hub

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def pad_token_id(tokenizer: Any) -> int | None:
    """The id to pad a batch with: the tokenizer's pad token, else its eos (Llama-style tokenizers have no
    pad token), else None."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), None)


def from_cache_or_hub(name: str, source: str, load: Any, unreachable: str | None = None) -> Any:
    """``load(local_files_only)`` for a hub id: the local cache first, then the hub if it answers.

    transformers and datasets would retry an unreachable hub for half a minute; this fails in a few
    seconds, with ``unreachable`` as the message (default: a model's).
    """
    if source != name or Path(source).is_dir():  # a local directory or a bundled model
        return load(False)
    try:
        return load(True)
    except (OSError, ValueError):
        if not hub_reachable():
            raise AllocplanError(unreachable or (
                f"{name!r} is not a local directory, not in the Hugging Face cache, and the hub cannot be reached"
                " (offline?); download it where the hub is reachable, or pass a local checkpoint directory"
            )) from None
    return load(False)


def _load_error(name: str, exc: Exception) -> AllocplanError:
    return AllocplanError(f"cannot load model {name!r}: {first_line(exc)}")


def load_config(name: str, load: LoadConfig | None = None) -> Any:
    """The model's config alone (no weights), e.g. for ``allocplan validate``."""
    from transformers import AutoConfig

    load = load or LoadConfig()
    source = resolve_model_source(name)
    try:
        return from_cache_or_hub(name, source, lambda local: AutoConfig.from_pretrained(
            source, trust_remote_code=load.trust_remote_code, revision=load.revision, local_files_only=local))
    except AllocplanError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, exc) from None


def loaded_revision(name: str, source: str, revision: str | None) -> str | None:
    """The hub commit a hub id was loaded from (its cache snapshot's name), else the revision asked
    for; None for a local directory."""
    if source != name or Path(source).is_dir():
        return None
    from transformers.utils import cached_file

    try:
        path = Path(cached_file(source, "config.json", revision=revision, local_files_only=True))
    except (OSError, ValueError):
        return revision
    parts = path.parts
    if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
        return parts[parts.index("snapshots") + 1]
    return revision


def _may_hold_pickle(source: str) -> bool:
    """Whether ``source`` may hold pickled weights: a hub id (unknown until asked), or a local folder that
    holds a ``*.bin`` or ``*.pt`` file."""
    folder = Path(source)
    return not folder.is_dir() or any(folder.glob("*.bin")) or any(folder.glob("*.pt"))


def load_model(name: str, load: LoadConfig | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode as ``load`` says (device or device_map, dtype,
    revision, attention implementation, remote code).

    The hub commit the weights came from is remembered for the model's identity record
    (``model.revision`` in a plan or profile compiled from it).

    Raises:
        AllocplanError: missing model, or a checkpoint transformers cannot read.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from allocplan.runtime.layers import record_revision

    load = load or LoadConfig()
    source = resolve_model_source(name)
    kwargs = load.from_pretrained_kwargs()
    if kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    try:
        tokenizer = from_cache_or_hub(name, source, lambda local: AutoTokenizer.from_pretrained(
            source, trust_remote_code=load.trust_remote_code, revision=load.revision, local_files_only=local))
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except AllocplanError:
        raise
    except ImportError as exc:  # e.g. device_map without accelerate, an attention kernel not installed
        raise _load_error(name, exc) from None
    except SafetensorError as exc:  # a truncated or damaged weights file
        raise AllocplanError(f"cannot load model {name!r}: a safetensors weights file is damaged ({first_line(exc)});"
                             " download or convert the checkpoint again") from None
    except (OSError, ValueError, KeyError) as exc:
        if not load.pickle_weights and "model.safetensors" in str(exc) and _may_hold_pickle(source):
            raise AllocplanError(
                f"{name!r} has no safetensors weights, and allocplan does not unpickle checkpoint files unless asked;"
                " convert its weights to safetensors, or pass --pickle-weights (torch's weights-only unpickler)"
            ) from None
        raise _load_error(name, exc) from None
    if load.device_map is None:
        try:
            model.to(load.device)
        except (RuntimeError, AssertionError) as exc:
            raise AllocplanError(f"cannot move the model to device {load.device!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    _check_forward(name, model)
    record_revision(model, loaded_revision(name, source, load.revision))
    return model, tokenizer


def _check_forward(name: str, model: Any) -> None:
    """Two tokens through the model as loaded, before any plan touches it.

    A checkpoint transformers loads but cannot run (a config its modelling code does not support,
    such as an odd rotary head size) would otherwise fail deep inside profiling or generation with
    a traceback that reads like allocplan's; this names the model as the cause, in one line.
    """
    import torch

    from allocplan.runtime.layers import input_device

    ids = torch.zeros(1, 2, dtype=torch.long, device=input_device(model))  # [1, 2]
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise AllocplanError(
            f"model {name!r} loads but its own forward pass fails before any plan is applied"
            f" ({type(exc).__name__}: {first}); check that transformers can run this checkpoint") from None
