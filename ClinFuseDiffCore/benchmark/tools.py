"""Measuring tools the benchmark's parts share: machine and load, peak memory, timing.

Times are wall-clock seconds (CUDA synchronised); ``interleaved`` runs variants round-robin so a
change of machine load hits every variant alike, which is what makes ratios measured in one run
comparable.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device) -> dict[str, Any]:
    """CPU model, cores, torch version/threads, and the GPU name when ``device`` is CUDA."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class PeakRSS:
    """Peak resident memory of this process over a section.

    Linux: the kernel's high-water mark ``VmHWM`` is reset (``/proc/self/clear_refs`` <- 5) at
    ``reset()`` so the peak belongs to the section; elsewhere ``ru_maxrss`` (whole process).
    """

    def __init__(self) -> None:
        self.isolated = False

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.isolated = True
        except OSError:
            self.isolated = False

    def peak_bytes(self) -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device) -> float:
    """Seconds of one call of ``fn`` (CUDA synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device) -> dict[str, list[float]]:
    """Time each of ``fns`` ``repeats`` times, round-robin (so a change of machine load hits every
    variant alike). Returns name -> seconds per call."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            out[k].append(timed(fn, device))
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else math.nan


def amp_context(cfg, device):
    """The training config's autocast on CUDA (``training.amp``); nothing on a CPU (the demo
    config has ``amp: none``; CPU bf16 autocast is slower than fp32 on most CPUs)."""
    from ..training.trainer import autocast_context

    if device.type != "cuda":
        return contextlib.nullcontext()
    return autocast_context(cfg.training.amp, device)

