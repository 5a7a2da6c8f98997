"""Generate docs/scale.md: what profiling a real MoE costs, on 1, 8 and 64 GPUs.

The cost model is allocplan/bench/cost_model.py and the protocol (checked on CPU against counted
FLOPs and measured profiling time on the bench presets, then carried to real models built on the
meta device) allocplan/bench/scale.py; this script runs it and writes the files.

Run:  python scripts/make_scale.py        (about 6 minutes on 2 CPU cores)
      python scripts/make_scale.py --render-only   (keep the measurements, recompute the estimates)
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from allocplan.bench.scale import estimate, measure_preset, real_configs, render

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    presets = [measure_preset(name) for name in ("dsv2-lite-small", "mixtral-small")]
    overhead = {"probes": max(1.0, max(p["probes_fe_measured"] / p["probes_fe_model"] for p in presets)),
                "fitting": max(1.0, max(p["fitting_fe_measured"] / p["fitting_fe_model"] for p in presets))}
    models = [estimate(name, config, nbytes, overhead) for name, (config, nbytes) in real_configs().items()]
    data = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
                       f" torch {torch.__version__}",
            "presets": presets, "overhead": overhead, "models": models}
    (ROOT / "docs" / "scale.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (ROOT / "docs" / "scale.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    if "--render-only" in sys.argv:
        # The measured part stays; the estimates (no measurement, meta-device models) are recomputed.
        loaded = json.loads((ROOT / "docs" / "scale.json").read_text())
        loaded["models"] = [estimate(name, config, nbytes, loaded["overhead"])
                            for name, (config, nbytes) in real_configs().items()]
        (ROOT / "docs" / "scale.json").write_text(json.dumps(loaded, indent=2, sort_keys=True) + "\n")
        (ROOT / "docs" / "scale.md").write_text(render(loaded))
    else:
        main()
