"""The compensation sidecar: a safetensors file beside a plan (or profile) that the YAML names by hash.

A plan that compensates dropped experts (docs/runtime.md) needs one vector per
routed expert of every MoE layer: too many numbers for a reviewed YAML file. They
go in a sidecar file in the same directory, named after its own content
(``compensation-<16 hex>.safetensors``), and the plan records its name, its
sha256 and what the vectors are. Reading checks the hash before anything uses
the bytes; a missing or changed file is a one-line error. Plans without a
sidecar stay valid. This module moves bytes only (no torch): encoding the
tensors is the planner's job, decoding the runtime's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AllocplanError
from ..standins import STAND_IN_KINDS, get_stand_in_kind
from .records import atomic_write_bytes, sha256_bytes

# The stand-in kinds registered when allocplan is imported (allocplan/standins/); a kind registered later
# is valid as well: records check the registry itself.
COMPENSATION_KINDS = tuple(STAND_IN_KINDS)


@dataclass(frozen=True)
class CompensationRecord:
    """The sidecar a plan or profile carries.

    Attributes:
        file: the sidecar's base name, in the plan's directory.
        sha256: ``sha256:<hex>`` of the file's bytes; a file that differs is refused.
        kind: a registered stand-in kind (allocplan/standins/: ``expert``, one vector per
            routed expert; ``layer``, one vector per layer; ``linear``, one vector per routed
            expert plus a low-rank linear map of the input). Tensors are keyed by layer path
            (the vectors) and ``<path>.down`` / ``<path>.up`` (the linear maps), as the kind's
            terms say (``allocplan.standins.sidecar_shapes``).
    """

    file: str
    sha256: str
    kind: str

    def __post_init__(self) -> None:
        if Path(self.file).name != self.file or not self.file.endswith(".safetensors") or self.file.startswith("."):
            raise AllocplanError(f"compensation.file {self.file!r} must be a plain *.safetensors file name"
                                 " beside the plan, without a directory")
        if not self.sha256.startswith("sha256:") or len(self.sha256) != 71:
            raise AllocplanError(f"compensation.sha256 must be sha256: and 64 hex digits, got {self.sha256[:80]!r}")
        try:
            get_stand_in_kind(self.kind)
        except AllocplanError as exc:
            raise AllocplanError(f"compensation.kind: {exc}") from None


def _header(data: bytes) -> tuple[dict, int]:
    """A safetensors file's header and where its data begin.

    Raises:
        AllocplanError: the bytes do not start with a safetensors header.
    """
    import json

    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size]) if 0 < size <= len(data) - 8 else None
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise AllocplanError("the compensation sidecar is not a safetensors file; recompile the plan")
    return header, 8 + size


def sidecar_tensor_names(data: bytes) -> list[str]:
    """The tensor names in a sidecar's safetensors header, read without torch (sorted).

    Raises:
        AllocplanError: the bytes do not start with a safetensors header.
    """
    return sorted(name for name in _header(data)[0] if name != "__metadata__")


def sidecar_arrays(data: bytes) -> dict[str, Any]:
    """A sidecar's tensors as numpy arrays, read without torch: float32 and float16 as stored,
    bfloat16 widened to float32 exactly (numpy has no bfloat16, and ``safetensors.numpy`` refuses it).

    Raises:
        AllocplanError: not a safetensors file, or a tensor of another dtype or outside the data.
    """
    import numpy as np

    arrays = {}
    for name, (dtype, values) in _read_tensors(data, ("F32", "F16", "BF16"),
                                               "cannot be read as float32, float16 or bfloat16").items():
        # bfloat16 is the top half of a float32: shifted back, the same value exactly.
        arrays[name] = (values.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else values
    return arrays


# safetensors dtype names and the numpy types that hold their bits (bfloat16 as its raw 16 bits).
_RAW_TYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def sidecar_raw(data: bytes) -> dict[str, tuple[str, Any]]:
    """A sidecar's tensors as (safetensors dtype, numpy array of the stored bits), read without torch.

    Raises:
        AllocplanError: not a safetensors file, or a tensor of another dtype or outside the data.
    """
    return _read_tensors(data, tuple(_RAW_TYPES), "is not a float tensor within the file")


def _read_tensors(data: bytes, dtypes: tuple[str, ...], unreadable: str) -> dict[str, tuple[str, Any]]:
    """Each tensor of a safetensors file as (dtype, numpy array of its stored bits), for the dtypes in ``dtypes``.

    Raises:
        AllocplanError: not a safetensors file, a malformed entry, or a tensor of another dtype or outside the
            data (``unreadable`` says which, after the tensor's name and dtype).
    """
    import numpy as np

    header, start = _header(data)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise AllocplanError(f"the compensation sidecar's entry {name!r} is malformed; recompile the plan") from None
        stored = _RAW_TYPES.get(dtype) if dtype in dtypes else None
        raw = data[start + begin:start + end] if 0 <= begin <= end <= len(data) - start else None
        if stored is None or raw is None or len(raw) != np.dtype(stored).itemsize * int(np.prod(shape)):
            raise AllocplanError(f"the compensation sidecar's tensor {name!r} ({dtype}) {unreadable}; recompile"
                                 " the plan")
        tensors[name] = (dtype, np.frombuffer(raw, dtype=np.dtype(stored)).reshape(shape))
    return tensors


def encode_raw(tensors: dict[str, tuple[str, Any]]) -> bytes:
    """safetensors bytes of (dtype, array of the stored bits) tensors: names sorted, data in that order, the
    header padded with spaces to 8 bytes, as the safetensors library writes it. The same tensors give the
    same bytes on every machine."""
    import json

    import numpy as np

    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, array = tensors[name]
        raw = np.ascontiguousarray(array, dtype=np.dtype(_RAW_TYPES[dtype])).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def rank_bias_name(path: str, rank: int) -> str:
    """A profile sidecar's name for layer ``path``'s stand-in constant at rank ``rank`` (refitted per rank)."""
    return f"{path}.r{rank}"


def plan_sidecar(profile_data: bytes, ranks: dict[str, int | None]) -> bytes | None:
    """The plan's sidecar cut from a profile's: per layer path, the stand-ins at its chosen rank (None: none).

    A profile's sidecar holds each layer's factors at its largest rank (``<path>.down`` [E, H, R],
    ``<path>.up`` [E, R, H], directions most explained first), one constant per rank
    (:func:`rank_bias_name`) and the drop order. A plan's holds, for each layer that runs stand-ins,
    the constant of its rank as ``<path>``, the first r columns of the factors (none at rank 0) and
    the drop order: exactly what the runtime serves (runtime/apply.load_compensation). None when no
    layer runs stand-ins. Pure bytes (no torch).

    Raises:
        AllocplanError: the profile's sidecar lacks a layer's tensors at the chosen rank.
    """
    source = sidecar_raw(profile_data)
    tensors = {}
    for path, rank in sorted(ranks.items()):
        if rank is None:
            continue
        bias = source.get(rank_bias_name(path, rank))
        if bias is None:
            raise AllocplanError(f"the profile's compensation sidecar has no stand-ins of rank {rank} for {path};"
                                 " re-profile with this allocplan")
        tensors[path] = bias
        if rank > 0:
            (down_type, down), (up_type, up) = source[f"{path}.down"], source[f"{path}.up"]
            if down.shape[-1] < rank:
                raise AllocplanError(f"the profile's stand-ins for {path} have rank {down.shape[-1]}, below {rank};"
                                     " re-profile with this allocplan")
            tensors[f"{path}.down"] = (down_type, down[..., :rank])
            tensors[f"{path}.up"] = (up_type, up[:, :rank])
        if f"{path}.order" in source:
            tensors[f"{path}.order"] = source[f"{path}.order"]
    return encode_raw(tensors) if tensors else None


def record_for(data: bytes, kind: str) -> CompensationRecord:
    """The record naming ``data``: file name and hash both follow from the content."""
    digest = sha256_bytes(data)
    return CompensationRecord(file=f"compensation-{digest[7:23]}.safetensors", sha256=digest, kind=kind)


def write_sidecar(directory: str | Path, record: CompensationRecord, data: bytes) -> Path:
    """Write the sidecar beside a plan (atomically); returns its path."""
    if sha256_bytes(data) != record.sha256:
        raise AllocplanError("the compensation vectors do not match their record; recompile the plan")
    path = Path(directory) / record.file
    atomic_write_bytes(path, data)
    return path


def read_sidecar(directory: str | Path, record: CompensationRecord, owner: str) -> bytes:
    """The sidecar's bytes after checking its hash.

    Raises:
        AllocplanError: the file is missing, unreadable or not the one the record names.
    """
    path = Path(directory) / record.file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AllocplanError(f"{owner} names compensation file {record.file!r}, which is not beside it in"
                             f" {str(Path(directory))!r}; copy it there or recompile") from None
    except OSError as exc:
        raise AllocplanError(f"cannot read compensation file {str(path)!r}: {exc.strerror or exc}") from None
    if sha256_bytes(data) != record.sha256:
        raise AllocplanError(f"compensation file {str(path)!r} does not match the sha256 that {owner} records;"
                             " it was changed or belongs to another plan: restore it or recompile")
    return data
