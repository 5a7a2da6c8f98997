"""Write docs/benchmarks-gpu.md from the bench runs of scripts/gpu_check.sh.

Run by scripts/gpu_check.sh:  python scripts/make_benchmarks_gpu.py OUT_DIR docs/benchmarks-gpu.md
Every number on the page is read from the JSON that ``allocplan bench`` wrote in OUT_DIR.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path


def gpu_name() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"


def cell(run: dict, measure: str) -> str:
    r = run[measure]
    same = r.get("speedup_same_path")
    text = (f"{r['untouched']['median'] * 1e3:.2f} → {r['planned']['median'] * 1e3:.2f} ms,"
            f" {r['speedup']['median']:.2f}× [{r['speedup']['min']:.2f}, {r['speedup']['max']:.2f}]")
    if same:
        text += f" ({same['median']:.2f}× same path)"
    return text + f"; bound {run['ideal_speedup'][measure]:.2f}×"


def render(runs: dict[str, dict], machine: str) -> str:
    lines = ["# GPU benchmarks", "", f"Machine: {machine}; {platform.python_implementation()} {platform.python_version()}.",
             "Written by `bash scripts/gpu_check.sh` (scripts/make_benchmarks_gpu.py) from the JSON of each",
             "`allocplan bench --device cuda --dtype bfloat16` run; untouched and planned models alternate in one",
             "process, every reading after a CUDA synchronise; median of 5 rounds with the min–max of the per-round",
             "speed-ups. Bound: 1 / (1 − f·(1 − b)), f the routed experts' share (docs/benchmarks.md).", "",
             "| preset | Alloc-T | prefill batch | prefill | decode b1 | decode b16 |", "| --- | --- | --- | --- | --- | --- |"]
    for name in sorted(runs):
        run = runs[name]
        preset, level, batch = name.rsplit("_b", 1)[0].split("_", 1)[0], "on" if "_token-level" in name else "off", \
            name.rsplit("_b", 1)[1]
        decode_batched = next(key for key in run["ideal_speedup"] if key.startswith("decode_b") and "b1_" not in key)
        lines.append(f"| {preset} | {level} | {batch} | {cell(run, 'prefill_s')} | {cell(run, 'decode_b1_s_per_token')} |"
                     f" {cell(run, decode_batched)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    out, page = Path(sys.argv[1]), Path(sys.argv[2])
    runs = {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*.json"))}
    if not runs:
        sys.exit(f"make_benchmarks_gpu: no bench JSON in {out}")
    page.write_text(render(runs, gpu_name()))
    print(f"wrote {page} ({len(runs)} runs)")


if __name__ == "__main__":
    main()
