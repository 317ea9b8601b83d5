"""Where computation runs, decided once: the device a step uses, as one object that answers what the rest asks.

A device travels as its string ("cpu", "cuda", "cuda:0"): that string is what job keys, payloads and records hold.
A step rebuilds the object with ``as_device(string)``; the object answers the unquantized dtype, the clock, the
peak-memory reader, the planner's runtime bytes, torch's threads and the resources a Ray task asks for: other
modules ask it instead of testing a device string. Adding a device kind (MPS, ROCm) means a clock and a memory
reader here.
"""

from __future__ import annotations

import contextlib
import functools
import re
import resource
import time
from dataclasses import dataclass

from quantlab.errors import UsageError

CPU, CUDA = "cpu", "cuda"
#: the device kinds a user may name, in the order the CLI offers them
DEVICE_KINDS = (CUDA, CPU)
# CUDA context + cuBLAS/cuDNN workspaces of a torch 2.x process on a recent GPU: an estimate (it is not in
# torch.cuda.max_memory_reserved); `quantlab bench` on the GPU measures the reserved part.
CUDA_RUNTIME_BYTES = 512 * 2**20
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Device:
    """One device: ``kind`` (``cpu`` or ``cuda``) and, when the string named one, the GPU ``index``."""
    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def is_cpu(self) -> bool:
        return self.kind == CPU

    @property
    def is_cuda(self) -> bool:
        return self.kind == CUDA

    @property
    def torch_device(self):
        import torch

        return torch.device(str(self))

    @property
    def default_dtype_name(self) -> str:
        """The dtype a model left unquantized runs in: fp32 on CPU (bf16 matmuls are slow there), bf16 on CUDA."""
        return "float32" if self.is_cpu else "bfloat16"

    @property
    def default_dtype(self):
        import torch

        return getattr(torch, self.default_dtype_name)

    @property
    def default_dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.default_dtype_name]

    @property
    def checkpoint_dtype(self):
        """``from_pretrained``'s ``dtype`` for a checkpoint: fp32 on CPU, the checkpoint's own ("auto") on CUDA."""
        return self.default_dtype if self.is_cpu else "auto"

    @property
    def device_map(self) -> str | None:
        """``from_pretrained``'s ``device_map``: none on CPU (transformers' default), the device on a GPU."""
        return None if self.is_cpu else str(self)

    @property
    def runtime_bytes(self) -> int:
        """Memory the runtime holds outside torch's allocator, as the planner adds it: the CUDA context."""
        return CUDA_RUNTIME_BYTES if self.is_cuda else 0

    def clock(self) -> "PerfClock | CudaClock":
        """What times a region of device work: CUDA events with a synchronize, or ``time.perf_counter``."""
        return CudaClock() if self.is_cuda else PerfClock()

    @property
    def memory(self) -> "HostMemory | CudaMemory":
        """The peak-memory reader: the process's RSS on CPU, the caching allocator's reserved bytes on CUDA."""
        return CudaMemory() if self.is_cuda else HostMemory()

    def peak_memory(self) -> int:
        """The peak since ``memory.mark()``: peak RSS on CPU, max reserved on CUDA (after a synchronize)."""
        return self.memory.peak()

    def ray_resources(self, threads: int) -> dict:
        """What a Ray task running one job on this device asks for: its threads as CPUs, and one GPU on CUDA."""
        return {"num_cpus": threads, "num_gpus": 1 if self.is_cuda else 0}

    def threads(self, threads: int):
        """torch's intra-op thread count set for a block (see ``torch_threads``)."""
        return torch_threads(threads)

    def describe(self) -> dict:
        """What provenance records of the device beyond the host: the GPU's name and memory, and CUDA's version."""
        if not self.is_cuda:
            return {}
        import torch

        props = torch.cuda.get_device_properties(self.torch_device)
        return {"gpu": props.name, "gpu_memory_bytes": props.total_memory, "cuda": torch.version.cuda}

    def gpu_name(self) -> str | None:
        """The GPU's name (the roofline looks its bandwidth up by it); None on CPU."""
        if not self.is_cuda:
            return None
        import torch

        return torch.cuda.get_device_name(self.index)


@functools.lru_cache(maxsize=None)
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str | None) -> str:
    """``auto`` (or None): ``cuda`` when torch sees a GPU (asked once per process), else ``cpu``; ``cpu``, ``cuda``
    or ``cuda:N`` as given. The string is what jobs, keys and payloads carry; ``as_device`` makes the object."""
    if device not in (None, "auto"):
        if not (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", device)):
            raise UsageError(f"Unknown device {device!r} — use cpu, cuda, cuda:N or auto")
        return device
    return CUDA if _cuda_available() else CPU


@functools.lru_cache(maxsize=None)
def _parse(spec: str) -> Device:
    kind, _, index = resolve_device(spec).partition(":")
    return Device(kind, int(index) if index else None)


def as_device(device: str | Device | None) -> Device:
    """The Device a string names (``auto`` or None resolved as ``resolve_device`` does); a Device as it is."""
    return device if isinstance(device, Device) else _parse(device)


def device_kind(device: str | None) -> str:
    """``cuda`` for a string naming a GPU, else ``cpu``: how a record's device is read back (never raises)."""
    return CUDA if str(device or CPU).startswith(CUDA) else CPU


class PerfClock:
    """Host wall time; device work on CPU is synchronous, so the host clock times it."""
    name = "time.perf_counter"

    def start(self):
        return time.perf_counter()

    def elapsed(self, mark) -> float:
        return time.perf_counter() - mark


class CudaClock:
    """CUDA events recorded on the stream around the region, then a synchronize: kernels run asynchronously, so
    the host clock would time their launches."""
    name = "cuda events"

    def start(self):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end

    def elapsed(self, mark) -> float:
        import torch

        start, end = mark
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0


class HostMemory:
    """A CPU device's memory is the process's: its RSS, and its high-water mark from the kernel."""
    label = "peak RSS"

    def mark(self) -> int:
        """Start a peak: the high-water mark set to what is resident now; returns those bytes."""
        reset_peak_rss()
        return current_rss_bytes()

    def peak(self) -> int:
        return peak_rss_bytes()

    def reset_counters(self) -> None:
        """Nothing: the host's mark is reset by whoever measures the process (``measure_memory``)."""

    def held_peak(self, host_held: int) -> int:
        """What a step held at its peak: on CPU, what the host measured (``measure_memory``)."""
        return host_held

    def allocated_peak(self) -> None:
        """No allocator of its own to read (a GPU's max allocated bytes, on CUDA)."""
        return None

    def peaks(self, scope: str) -> dict:
        """Peaks of the device's own memory beside the host's: none, the host's is the device's."""
        return {}


class CudaMemory:
    """A GPU's memory as torch's caching allocator holds it: reserved bytes (what the GPU lends the process) and
    allocated bytes (what tensors use of it); the peak is max reserved."""
    label = "max reserved"

    def mark(self) -> int:
        """Start a peak once the device is idle and the allocator's cache is emptied; returns the reserved bytes."""
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_reserved()

    def peak(self) -> int:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved()

    def reset_counters(self) -> None:
        """Reset the allocator's peak counters, at the start of a measured process."""
        import torch

        torch.cuda.reset_peak_memory_stats()

    def held_peak(self, host_held: int) -> int:
        """What a step held at its peak: on CUDA, max reserved GPU memory."""
        import torch

        return torch.cuda.max_memory_reserved()

    def allocated_peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated()

    def peaks(self, scope: str) -> dict:
        """The allocator's peaks for a record of ``scope``; max reserved is the peak it reports."""
        import torch

        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        return {"peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved,
                "peak_kind": f"torch.cuda.max_memory_reserved of {scope}", "peak_bytes": reserved}


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count set for a block run in this process, then restored."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    On Linux this is VmHWM from /proc/self/status: ru_maxrss survives fork+exec, so a fresh worker
    started by a large parent would report the parent's peak; VmHWM belongs to the new address space.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux; a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def anon_rss_bytes() -> int:
    """Resident anonymous memory of this process (Linux RssAnon; RSS elsewhere)."""
    kb = _status_kb("RssAnon")
    return kb * 1024 if kb is not None else current_rss_bytes()
