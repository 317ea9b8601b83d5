"""Where jobs run: threads of this process driving fresh step processes (``local``), or Ray tasks.

Either way ``execute`` yields (job, record) as jobs finish, in the driver, so the store has one writer per
sweep and a killed driver loses at most the jobs still running.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterator

from quantlab.errors import MissingExtraError, UsageError
from quantlab.sweep.compute import run_job

EXECUTORS = ("local", "ray")
_NEEDS_RAY = "--executor ray needs Ray — pip install 'ray[default]' (or quantlab[ray])"


def check_executor(executor: str, address: str | None, timeout: float = 5.0) -> None:
    """Before any work: Ray is installed, and the cluster ``--address`` names answers on its port (ray.init
    retries an unreachable one for minutes). ``ray://HOST[:PORT]`` is Ray Client (port 10001), ``auto`` a local
    cluster Ray finds itself."""
    if executor != "ray":
        return
    if importlib.util.find_spec("ray") is None:
        raise MissingExtraError(_NEEDS_RAY)
    if not address or address == "auto":
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep:  # Ray Client has a default port; a cluster's GCS address needs its own
        host, port = target, ("10001" if address.startswith("ray://") else "")
    if not host or not port.isdigit():
        raise UsageError(f"--address {address} is not HOST:PORT (or ray://HOST:PORT) — e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"Cannot reach the Ray cluster at {address} ({exc.strerror or exc}) — start it there "
                         "(ray start --head), or fix --address") from None


def execute(jobs: list, executor: str, address: str | None, max_parallel: int, force: bool) -> Iterator[tuple]:
    if not jobs:
        return iter(())
    return _ray(jobs, address, max_parallel, force) if executor == "ray" else _local(jobs, max_parallel, force)


def _local(jobs: list, max_parallel: int, force: bool) -> Iterator[tuple]:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    with ThreadPoolExecutor(max_workers=max_parallel) as pool:
        running = {pool.submit(run_job, job.payload(), force): job for job in jobs}
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield running.pop(future), future.result()


def _ray(jobs: list, address: str | None, max_parallel: int, force: bool) -> Iterator[tuple]:
    """Each job a Ray task asking for its threads as CPUs and, on CUDA, one GPU. ``ray.init()`` starts a
    local cluster (``--max-parallel`` CPUs' worth of workers); ``--address`` joins an existing one, whose
    nodes need quantlab installed and the same QUANTLAB_HOME / data dir paths."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError(_NEEDS_RAY) from None
    env = {k: v for k, v in os.environ.items() if k.startswith(("QUANTLAB_", "HF_")) or k == "PYTHONPATH"}
    started = not ray.is_initialized()
    if started:
        init = {"address": address} if address else {"num_cpus": max_parallel * jobs[0].threads}
        try:
            ray.init(**init, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as exc:
            raise UsageError(f"Cannot join the Ray cluster at {address or 'a local cluster'}: "
                             f"{str(exc).strip().splitlines()[0][:200]} — start it, or fix --address") from None
    try:
        gpus = 1 if jobs[0].device.startswith("cuda") else 0
        task = ray.remote(num_cpus=jobs[0].threads, num_gpus=gpus, max_retries=0)(run_job)
        running = {task.remote(job.payload(), force): job for job in jobs}
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                yield running.pop(ref), ray.get(ref)
    finally:
        if started:
            ray.shutdown()
