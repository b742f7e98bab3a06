"""Peak memory of a block of work: resident set size of this process and, where present, CUDA memory."""

from __future__ import annotations

import resource
from pathlib import Path

import torch


def _read_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Context manager measuring the peak RSS (and peak CUDA allocation) inside its block.

    On Linux the kernel's high-water mark is reset on entry (`/proc/self/clear_refs`), so the figure belongs to the
    block; elsewhere it falls back to the process-lifetime peak.
    """

    def __enter__(self) -> "PeakMemory":
        self.peak_mb = 0.0
        self.cuda_peak_mb = 0.0
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        hwm = _read_status("VmHWM")
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_mb = hwm / 2**20
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20
