"""One Device: the object quantlab asks instead of branching on a device string, its answers on CPU (and the CUDA
answers that need no GPU), its string on the wire, and a count that keeps device branching from spreading again."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from quantlab.device import CUDA_RUNTIME_BYTES, Device, as_device, device_kind, resolve_device
from quantlab.errors import UsageError

ROOT = Path(__file__).resolve().parents[1] / "quantlab"
#: the grep of issue 32: a device string, or a test of a device's type
BRANCH = re.compile(r"""['"]cuda['"]|['"]cpu['"]|\.type ?== ?|is_available\(\)""")
MAX_BRANCH_LINES = 10


def test_cpu_answers_dtype_runtime_and_loading():
    import torch

    cpu = as_device("cpu")
    assert (cpu.kind, cpu.index, cpu.is_cpu, cpu.is_cuda) == ("cpu", None, True, False)
    assert (cpu.default_dtype, cpu.default_dtype_name, cpu.default_dtype_bytes) == (torch.float32, "float32", 4)
    assert (cpu.checkpoint_dtype, cpu.device_map, cpu.runtime_bytes) == (torch.float32, None, 0)
    assert cpu.torch_device == torch.device("cpu")
    assert (cpu.describe(), cpu.gpu_name()) == ({}, None)


def test_cuda_answers_what_needs_no_gpu():
    """bf16, the checkpoint's own dtype, a device map, the CUDA context in the plan, one GPU per Ray task."""
    import torch

    gpu = as_device("cuda:1")
    assert (gpu.kind, gpu.index, gpu.is_cuda) == ("cuda", 1, True)
    assert (gpu.default_dtype, gpu.default_dtype_bytes, gpu.checkpoint_dtype) == (torch.bfloat16, 2, "auto")
    assert (gpu.device_map, gpu.runtime_bytes) == ("cuda:1", CUDA_RUNTIME_BYTES)
    assert gpu.ray_resources(4) == {"num_cpus": 4, "num_gpus": 1}
    assert gpu.clock().name == "cuda events" and gpu.memory.label == "max reserved"


def test_ray_resources_on_cpu():
    assert as_device("cpu").ray_resources(3) == {"num_cpus": 3, "num_gpus": 0}


@pytest.mark.parametrize("spec", ["cpu", "cuda", "cuda:0", "cuda:7"])
def test_the_string_on_the_wire_round_trips(spec):
    """Payloads, job keys and records carry the string; a step rebuilds the same object from it."""
    device = as_device(spec)
    assert str(device) == spec and as_device(str(device)) == device and as_device(device) is device
    assert Device(device.kind, device.index) == device and hash(Device(device.kind, device.index)) == hash(device)
    with pytest.raises(AttributeError):
        device.kind = "cpu"  # frozen: one process, one answer


def test_auto_is_resolved_once_to_what_torch_sees():
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None) == resolve_device("auto") == expected
    assert as_device(None) == as_device("auto") == as_device(expected)


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "CPU", "mps"])
def test_an_unknown_device_is_a_usage_error(spec):
    with pytest.raises(UsageError, match=f"Unknown device '{spec}' — use cpu, cuda, cuda:N or auto"):
        as_device(spec)


def test_a_record_device_reads_back_as_its_kind():
    assert [device_kind(d) for d in (None, "cpu", "cuda", "cuda:2", "None")] == ["cpu", "cpu", "cuda", "cuda", "cpu"]


def test_the_cpu_clock_is_perf_counter():
    from quantlab.measure.latency import Timer

    clock = as_device("cpu").clock()
    assert clock.name == "time.perf_counter"
    before = time.perf_counter()
    mark = clock.start()
    time.sleep(0.02)
    elapsed = clock.elapsed(mark)
    assert 0.02 <= elapsed <= time.perf_counter() - before
    timer = Timer("cpu")
    for _ in range(2):
        with timer:
            time.sleep(0.01)
    assert len(timer.samples) == 2 and all(0.01 <= s < 1.0 for s in timer.samples)


def test_the_cpu_peak_reader_is_the_process_rss():
    """Marked, then 64 MiB touched and freed: the peak rises by them and the reader's base is resident memory."""
    from quantlab.device import current_rss_bytes

    reader = as_device("cpu").memory
    assert reader.label == "peak RSS"
    base = reader.mark()
    assert abs(base - current_rss_bytes()) < 16 * 2**20
    block = bytearray(64 * 2**20)
    block[::4096] = b"\x01" * len(block[::4096])
    del block
    assert reader.peak() - base >= 60 * 2**20
    assert as_device("cpu").peak_memory() >= reader.peak() - 4096
    assert reader.held_peak(123) == 123 and reader.allocated_peak() is None and reader.peaks("the step") == {}


def test_threads_are_set_for_a_block_then_restored():
    import torch

    before = torch.get_num_threads()
    with as_device("cpu").threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_the_planner_asks_the_device():
    from quantlab.plan import terms

    assert (terms.runtime_bytes("cpu"), terms.runtime_bytes("cuda:0")) == (0, CUDA_RUNTIME_BYTES)


def branch_lines() -> list[str]:
    """Every line of quantlab/ outside device.py that names a device string or tests a device type (the grep of
    issue 32: every file, bytecode aside)."""
    files = [p for p in sorted(ROOT.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
             and p != ROOT / "device.py"]
    return [f"{path.relative_to(ROOT.parent)}:{n}: {line.strip()}" for path in files
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if BRANCH.search(line)]


def test_device_branching_stays_in_device_py():
    """Issue 32 counted 47 such lines in 28 files; what may stay: the CLI's option, a provenance key named "cpu",
    a tensor's own device, and a few defaults. A new device decision belongs to ``Device``."""
    lines = branch_lines()
    assert len(lines) <= MAX_BRANCH_LINES, "ask quantlab.device.Device instead:\n" + "\n".join(lines)


def test_the_count_finds_a_branch():
    """The pattern catches what it is meant to (so the count above can fail)."""
    samples = ['elem = 4 if device == "cpu" else 2', "if device.startswith('cuda'):", "if t.device.type == x:",
               "torch.cuda.is_available()"]
    assert all(BRANCH.search(s) for s in samples) and not BRANCH.search("elem = as_device(device).default_dtype_bytes")
