"""Device, dtype and "auto" policies shared by every command, and the peak memory of a block of work.

- device: `pick_device` is the one default of every `--device` option (cuda when present, else cpu), and refuses a
  name that is no device or a device torch does not see;
- dtype: `native_bfloat16` says whether a device multiplies bfloat16 in hardware; `dtype_name` spells a dtype as the
  options and the provenance do; `named_dtype` checks a dtype option;
- "auto": `calibration_dtype` resolves `--calib-dtype auto` on a device;
- `PeakMemory` measures peak RSS and CUDA memory of a block.
"""

from __future__ import annotations

import contextlib

import resource
from pathlib import Path

import torch

from .errors import HFCompressError

CALIBRATION_DTYPES = ("auto", "float32", "bfloat16")
# The dtypes a model is loaded or saved in (`ppl --dtype`, `convert --save-dtype`).
MODEL_DTYPES = ("float32", "bfloat16", "float16")


# --- device -----------------------------------------------------------------------------------------------------


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a `torch.device`; None (the default of every `--device`) is cuda when present, else cpu.

    A name that is no device (`gpu`) or a GPU torch does not see is refused here, in one line, so that every command
    fails before its model loads rather than at the first `.to(device)`.
    """
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        return device
    try:
        target = torch.device(device)
    except RuntimeError:
        raise HFCompressError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, mps, ...)") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise HFCompressError(
                f"--device {device} asks for a GPU, but torch sees none (CUDA_VISIBLE_DEVICES, driver?)")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise HFCompressError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s)")
    if target.type == "mps" and not torch.backends.mps.is_available():
        raise HFCompressError(f"--device {device}: torch sees no Apple GPU (mps)")
    return target


# --- dtype ------------------------------------------------------------------------------------------------------


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: CUDA GPUs from Ampere on, CPUs with AVX512-BF16 or
    AMX (elsewhere bfloat16 is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # oneDNN runs the bfloat16 products. The probes are private but long-standing; a torch without them is
        # treated as lacking the instructions.
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return torch.backends.mkldnn.is_available() and any(getattr(torch.cpu, p, lambda: False)() for p in probes)
    return False


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`, as `--calib-dtype` and the provenance spell it."""
    return str(dtype).removeprefix("torch.")


def named_dtype(name: str, flag: str, allowed: tuple[str, ...] = MODEL_DTYPES) -> str:
    """`name` if it is one of `allowed`; otherwise the one-line error of option `flag`, listing the allowed names."""
    if name not in allowed:
        raise HFCompressError(f"{flag} must be one of {', '.join(allowed)}; got {name!r}.")
    return name


# --- "auto" policies --------------------------------------------------------------------------------------------


def calibration_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the calibration forwards: `"auto"` is bfloat16 where the device has native bfloat16 matrix
    products and float32 elsewhere."""
    if named_dtype(name, "--calib-dtype", CALIBRATION_DTYPES) == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return getattr(torch, name)


# --- peak memory ------------------------------------------------------------------------------------------------


def _read_status(field: str) -> int | None:
    """A byte count of `/proc/self/status` (e.g. `VmHWM`), or None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_rss_bytes() -> int:
    hwm = _read_status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Context manager measuring the peak RSS (and peak CUDA allocation) inside its block, in MiB.

    On Linux the kernel's high-water mark is reset on entry (`/proc/self/clear_refs`), so the figure belongs to the
    block; elsewhere it falls back to the process-lifetime peak. Blocks nest: an inner block's reset would hide the
    outer block's peak so far, so the peak reached before the reset, and the inner block's own, are passed up to
    every enclosing block.
    """

    _active: list[PeakMemory] = []

    def __enter__(self) -> PeakMemory:
        self.peak_mb = 0.0
        self.cuda_peak_mb = 0.0
        self._carried_mb = 0.0
        if PeakMemory._active:
            self._carry(_peak_rss_bytes() / 2**20)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        if torch.cuda.is_available() and not PeakMemory._active:
            torch.cuda.reset_peak_memory_stats()
        PeakMemory._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        PeakMemory._active.remove(self)
        self.peak_mb = max(_peak_rss_bytes() / 2**20, self._carried_mb)
        self._carry(self.peak_mb)
        if torch.cuda.is_available():
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    @staticmethod
    def _carry(mb: float) -> None:
        for outer in PeakMemory._active:
            outer._carried_mb = max(outer._carried_mb, mb)


class MemoryPhases:
    """Peak resident memory of the consecutive phases of one job (load, calibration, decomposition, save, ...), in MiB.

    `with phases("load"): ...` measures one phase (a `PeakMemory`: on Linux the kernel's high-water mark is reset at
    the start of each phase, so each figure belongs to its phase); a phase entered twice keeps its larger peak.
    `peak_mb` is the largest of them, the job's peak.
    """

    def __init__(self) -> None:
        self.peaks_mb: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        with PeakMemory() as peak:
            yield
        self.peaks_mb[name] = max(self.peaks_mb.get(name, 0.0), peak.peak_mb)

    @property
    def peak_mb(self) -> float:
        return max(self.peaks_mb.values(), default=0.0)

