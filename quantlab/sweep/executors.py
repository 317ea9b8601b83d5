"""Where jobs run: threads of this process driving fresh step processes (``local``), or Ray tasks.

Either way ``execute`` yields (job, record) as jobs finish, in the driver, so the store has one writer per
sweep and a killed driver loses at most the jobs still running.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from quantlab.device import as_device
from quantlab.errors import MissingExtraError, QuantlabError, UsageError
from quantlab.steps.launcher import steps_stopped
from quantlab.sweep.compute import run_job, run_job_payload

EXECUTORS = ("local", "ray")
_NEEDS_RAY = "--executor ray needs Ray — pip install 'ray[default]' (or quantlab[ray])"
#: Seconds ``--address`` may take to join (QUANTLAB_RAY_JOIN_TIMEOUT overrides): a healthy cluster answers in about
#: one; Ray itself retries a GCS that does not answer for about 14 minutes (20 tries of ~40 s), printing
#: time-outs all the while.
RAY_JOIN_TIMEOUT_S = 30.0


def check_executor(executor: str, address: str | None, timeout: float = 5.0) -> None:
    """Before any work: Ray is installed, and the cluster ``--address`` names answers on its port, both as given
    and where Ray will really connect (ray.init retries an unreachable one for minutes), and the join deadline
    (QUANTLAB_RAY_JOIN_TIMEOUT) is a number. ``ray://HOST[:PORT]`` is Ray Client (port 10001), ``auto`` a local
    cluster Ray finds itself."""
    if executor != "ray":
        return
    if importlib.util.find_spec("ray") is None:
        raise MissingExtraError(_NEEDS_RAY)
    if not address or address == "auto":
        return
    join_timeout()
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
    if not address.startswith("ray://"):
        _check_ray_target(address, timeout)


def join_timeout() -> float:
    """Seconds a join may take: QUANTLAB_RAY_JOIN_TIMEOUT if set (a positive number), else RAY_JOIN_TIMEOUT_S."""
    text = os.environ.get("QUANTLAB_RAY_JOIN_TIMEOUT", "").strip()
    if not text:
        return RAY_JOIN_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise UsageError(f"QUANTLAB_RAY_JOIN_TIMEOUT={text!r} is not a positive number of seconds — e.g. 60, or "
                         f"unset it for {RAY_JOIN_TIMEOUT_S:g}")
    return seconds


def _ray_target(address: str) -> str:
    """Where ``ray.init(address=...)`` connects: Ray replaces a loopback host (127.0.0.1, localhost, ::1) with
    this machine's own address, so a cluster that answers on loopback only is not where it seems."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) or address
    except Exception:  # a Ray without this private helper: assume it connects where it is told
        return address


def _check_ray_target(address: str, timeout: float) -> None:
    """The address Ray will really connect to answers too (a port forward or a container's port published on
    127.0.0.1 answers the check above, then Ray waits minutes on this machine's interface address)."""
    target = _ray_target(address)
    host, _, port = target.rpartition(":")
    if target == address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"Ray joins --address {address} at {target} (it replaces a loopback address with this "
                         f"machine's), where nothing answers ({exc.strerror or exc}) — pass the address the head "
                         "advertises (ray start --head prints it: ray start --address='HOST:PORT'); through a port "
                         "forward, use Ray Client (ray[client]): --address ray://HOST:10001") from None


def execute(jobs: list, executor: str, address: str | None, max_parallel: int, force: bool) -> Iterator[tuple]:
    if not jobs:
        return iter(())
    return _ray(jobs, address, max_parallel, force) if executor == "ray" else _local(jobs, max_parallel, force)


def _local(jobs: list, max_parallel: int, force: bool) -> Iterator[tuple]:
    """Each job in a thread of this process, which runs its steps as processes. Ctrl-C, SIGTERM or the driver
    dropping this generator (an interrupt while it stored a job) stop the jobs now: their step processes end,
    the pending jobs are cancelled, and the threads unwind, removing their temp dirs, before this returns."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=max_parallel)
    try:
        running = {pool.submit(run_job, job, force): job for job in jobs}  # threads: the Job itself
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield running.pop(future), future.result()
    except BaseException as exc:
        if not isinstance(exc, Exception):
            _stop(pool)
        raise
    finally:
        try:
            pool.shutdown()  # after a failed job, the other jobs still run (and are cached) first
        except BaseException:  # interrupted while waiting for them
            _stop(pool)
            raise


def _stop(pool) -> None:
    with steps_stopped():
        pool.shutdown(cancel_futures=True)


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
        init = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": False,
                "configure_logging": False}
        if address:
            _join_ray(ray, address, init)
        else:
            try:
                ray.init(num_cpus=max_parallel * jobs[0].threads, **init)
            except Exception as exc:
                raise QuantlabError(f"Could not start a local Ray cluster: {_first_line(exc)} — see Ray's logs under "
                                    "/tmp/ray, or run with --executor local") from None
    try:
        task = ray.remote(**as_device(jobs[0].device).ray_resources(jobs[0].threads), max_retries=0)(run_job_payload)
        running = {task.remote(job.payload(), force): job for job in jobs}
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                yield running.pop(ref), ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def _join_ray(ray, address: str, init: dict) -> None:
    """``ray.init(address=...)`` within ``join_timeout()`` seconds, in a thread so the wait can end: Ray's own
    retries take about 14 minutes. Ray's core prints those retries straight to file descriptor 2, so while it
    joins that goes to /dev/null; what matters is in the one-line error. A thread left joining after the deadline
    is a daemon: the process can exit."""
    import threading

    deadline, outcome = join_timeout(), {}

    def join():
        try:
            ray.init(address=address, **init)
        except BaseException as exc:  # handed to the driver's thread
            outcome["error"] = exc

    thread = threading.Thread(target=join, name="quantlab-ray-join", daemon=True)
    with _fd2_to_devnull():
        thread.start()
        thread.join(deadline)
    if thread.is_alive():
        raise UsageError(f"Ray did not join the cluster at {address} (connecting to {_ray_target(address)}) within "
                         f"{deadline:g} s — check a Ray {ray.__version__} head serves there (ray status on the head) "
                         "and pass the address it advertises, or allow longer: QUANTLAB_RAY_JOIN_TIMEOUT=SECONDS")
    if "error" in outcome:
        raise UsageError(f"Cannot join the Ray cluster at {address}: {_first_line(outcome['error'])} — start it, or "
                         f"fix --address{_token_hint()}") from None


def _token_hint() -> str:
    """Ray 2.60 starts a head with token authentication where ~/.ray/auth_token exists (a local ``ray.init()``
    writes one), but a driver joining an explicit address sends no token unless RAY_AUTH_MODE=token: the join
    then fails as if nothing listened."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" or not (Path.home() / ".ray" / "auth_token").is_file():
        return ""
    return ("; if the head uses token authentication (Ray enables it where ~/.ray/auth_token exists), set "
            "RAY_AUTH_MODE=token")


@contextlib.contextmanager
def _fd2_to_devnull():
    """File descriptor 2 (where Ray's C++ core logs) sent to /dev/null for the block, then restored."""
    import sys

    sys.stderr.flush()
    try:
        saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no stderr to keep quiet
        yield
        return
    os.dup2(null, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]
