"""What building an artifact cost: wall and CPU seconds and peak memory of the process that built it."""

from __future__ import annotations

import contextlib
import resource
import time
from pathlib import Path

from quantlab.device import as_device, current_rss_bytes, peak_rss_bytes

DEFINITIONS = {
    "quantize_wall_s": "wall seconds of load + quantize + save in a fresh process (0 for the fp baseline)",
}

COST_DEFINITION = ("wall/CPU seconds of load+quantize+save in a fresh process; peak RSS of that process "
                   "(includes the Python and library baseline given as process_rss_before_bytes, taken "
                   "after the method's libraries are imported); quantize_peak_over_baseline_x_source = "
                   "(peak - baseline) / bytes of the source model's safetensors")

NO_COST = {"quantize_wall_s": 0.0, "quantize_cpu_s": 0.0, "quantize_peak_rss_bytes": None}


@contextlib.contextmanager
def measure_cost(source_dir: str | Path, device: str):
    """Yields a dict that, when the block ends, holds the block's cost (see COST_DEFINITION)."""
    cost: dict = {}
    rss_before = current_rss_bytes()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    yield cost
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = peak_rss_bytes()
    source_bytes = sum(f.stat().st_size for f in Path(source_dir).glob("*.safetensors"))
    cost.update({
        "quantize_wall_s": time.perf_counter() - t0,
        "quantize_cpu_s": (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
        "quantize_peak_rss_bytes": peak,
        "process_rss_before_bytes": rss_before,
        "source_weights_bytes": source_bytes,
        "quantize_peak_over_baseline_x_source": (peak - rss_before) / source_bytes if source_bytes else None,
        "quantize_peak_gpu_bytes": as_device(device).memory.allocated_peak(),  # None on CPU
        "definition": COST_DEFINITION,
    })


def training_cost(notes: dict) -> dict | None:
    """A trained method's training cost, from its notes, beside the whole step's."""
    if "training" not in notes:
        return None
    t = notes["training"]
    out = {k: t[k] for k in ("steps", "tokens_seen", "train_wall_s", "teacher_forward_s")}
    curve = notes.get("heldout_curve") or []
    out["train_cpu_s"] = curve[-1]["train_cpu_s"] if curve else None
    return out
