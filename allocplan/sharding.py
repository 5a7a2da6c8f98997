"""Sharded profiling: one slice of the (layer, k) grid per process, GPU or node, merged into one profile.

``allocplan profile --shard I/N -o part.yaml`` measures shard I's cells and writes a
part (:mod:`allocplan.formats.profile_part`); ``allocplan profile merge PARTS... -o
profile.yaml`` checks and joins them. ``--shard auto`` reads the rank and world size that
``torchrun`` and ``accelerate launch`` set (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``):
every rank profiles its shard on its own device (``cuda`` becomes ``cuda:LOCAL_RANK``),
writes ``<output stem>.part-<rank>-of-<N><suffix>`` beside the output, waits for the
others at a ``torch.distributed`` barrier (gloo, which runs on CPUs as well as beside
GPUs), and rank 0 merges the parts into the output and removes them. Across nodes (a
Slurm job array, Ray tasks), run ``--shard $I/$N`` per task and merge once all are done
(``allocplan profile merge``; docs/scale.md shows it as a Slurm job array).
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import AllocplanError
from .formats.config import LoadConfig, ProfileConfig, RoutingConfig
from .formats.profile import SensitivityProfile, save_profile
from .formats.profile_part import Shard, load_part, merge_parts, parse_shard, save_part

# A rank waits at most this long for the slowest shard (profiling a large MoE takes hours).
BARRIER_TIMEOUT = timedelta(days=7)


def shard_from_environment() -> Shard:
    """The shard of this process from ``RANK`` and ``WORLD_SIZE`` (torchrun, accelerate launch).

    Raises:
        AllocplanError: the variables are missing or not integers.
    """
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        raise AllocplanError("--shard auto reads RANK and WORLD_SIZE, which are not set; launch with torchrun or"
                             " accelerate launch, or give --shard I/N")
    if not (rank.isdigit() and world.isdigit()):
        raise AllocplanError(f"--shard auto: RANK {rank[:20]!r} and WORLD_SIZE {world[:20]!r} must be integers")
    return Shard(int(rank), int(world))


def part_path(output: str | os.PathLike[str], shard: Shard) -> Path:
    """Where ``--shard auto`` writes shard ``shard``'s part, beside ``output``."""
    path = Path(output)
    return path.with_name(f"{path.stem}.part-{shard.index}-of-{shard.count}{path.suffix or '.yaml'}")


def merge_profile_parts(paths: list[str | os.PathLike[str]], output: str | os.PathLike[str] | None = None
                        ) -> SensitivityProfile:
    """Load, check and merge profile parts; write the profile to ``output`` when given.

    Raises:
        AllocplanError: an unreadable part, or parts that do not make one profile.
    """
    parts = [load_part(path) for path in paths]
    profile = merge_parts(parts, [f"part {os.fspath(path)!r}" for path in paths])
    if output is not None:
        save_profile(profile, output)
    return profile


def profile_shard(model_name: str, output: str | os.PathLike[str], shard: str, *,
                  profile: ProfileConfig | None = None, routing: RoutingConfig | None = None,
                  load: LoadConfig | None = None) -> list[str]:
    """Profile one shard (``I/N``) or, with ``auto``, this rank's shard and merge on rank 0.

    Returns:
        What was written, as lines for the user.
    """
    from .loading import load_model
    from allocplan.planner.profiling import profile_part

    automatic = shard == "auto"
    chosen = shard_from_environment() if automatic else parse_shard(shard)
    if str(output) == "-":
        raise AllocplanError("--shard writes a part file (and its sidecar); give -o a file name, not -")
    load = load or LoadConfig()
    if automatic and load.device_map is None and load.device.startswith("cuda") and ":" not in load.device:
        load = dataclasses.replace(load, device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    target = part_path(output, chosen) if automatic else Path(output)
    model, tokenizer = load_model(model_name, load)
    part = profile_part(model, tokenizer, chosen, profile, routing, model_name=model_name)
    save_part(part, target)
    lines = [f"wrote {target}: shard {chosen}, {len(part.cells())} (layer, k) cells"]
    if automatic and chosen.count > 1:
        _barrier()
        try:
            if chosen.index == 0:
                paths = [part_path(output, Shard(i, chosen.count)) for i in range(chosen.count)]
                merge_profile_parts(paths, output)
                for path in paths:
                    path.unlink()
                lines.append(f"merged {chosen.count} parts into {output}")
        finally:
            _barrier()  # every rank ends after the merge (or its failure): none waits forever
            _finish()
    elif automatic:
        merge_profile_parts([target], output)
        target.unlink()
        lines.append(f"wrote {output}")
    return lines


def _barrier() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    dist.barrier()


def _finish() -> Any:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
