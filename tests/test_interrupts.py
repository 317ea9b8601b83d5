"""Ctrl-C and SIGTERM on real processes: the CLI runs in a session of its own and is signalled as a terminal
does (SIGINT to the whole process group) or as a supervisor does (SIGTERM to the driver alone). Each ends with
one line and exit 130 or 143, every step process ended within STEPS_GONE_S of the signal, no temp dir
left (scratch dirs under the system temp dir, atomic-write temps in QUANTLAB_HOME and --out), nothing
half-written, and the same command again finishes, reusing what was finished."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from quantlab import store

STEPS_GONE_S = 3.0  # every step process ends within this of the signal
DRIVER_GONE_S = 5.0  # and the driver (its interpreter's exit, torch loaded, takes a second on a busy 2-core CPU)
FAST = ["--chunk-tokens", "32", "--chunks", "4", "--repetitions", "1", "--decode-tokens", "2", "--batch-sizes", "1"]
LINE = " — nothing half-written; run the same command again to continue: finished work is reused"


@pytest.fixture()
def env(tmp_path, quantlab_home):
    scratch = tmp_path / "tmp"  # the system temp dir of the driver and its steps
    scratch.mkdir()
    # progress bars off, so that stderr holds only what the interrupt prints
    return {**os.environ, "QUANTLAB_HOME": str(quantlab_home), "TMPDIR": str(scratch), "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1"}


def _default_sigint() -> None:
    """In the child: SIGINT's default disposition, as a terminal's foreground job has it. A test runner started in
    the background by a non-interactive shell ignores SIGINT, and every process it starts would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "quantlab.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint, **kwargs)


def _session(sid: int) -> list:
    """The processes of session ``sid`` still running (a zombie has ended; it only waits to be reaped)."""
    alive = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


def _steps(proc) -> list[str]:
    """The steps (quantize, fidelity, bench...) the driver's step processes run now."""
    out = []
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:  # the driver has ended
        return out
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "quantlab.steps" in cmd:
            out.append(cmd[cmd.index("quantlab.steps") + 1])
    return out


def _signal_when(proc, ready, sig: int, group: bool, timeout: float = 300):
    """Once ``ready()``, send ``sig`` to the process group (a terminal's Ctrl-C) or to the driver alone; returns
    (stdout, stderr, seconds until every step process had ended, seconds until the driver had)."""
    deadline = time.monotonic() + timeout
    steps_s = driver_s = None
    try:
        while not ready():
            assert proc.poll() is None, f"it ended before it could be signalled: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "it never got where it is signalled"
            time.sleep(0.02)
        (os.killpg if group else os.kill)(proc.pid, sig)
        sent = time.monotonic()
        while (steps_s is None or driver_s is None) and time.monotonic() - sent < 30:
            if driver_s is None and proc.poll() is not None:
                driver_s = time.monotonic() - sent
            if steps_s is None and not [p for p in _session(proc.pid) if p.pid != proc.pid]:
                steps_s = time.monotonic() - sent
            time.sleep(0.02)
        out, err = proc.communicate(timeout=30)
    finally:
        left = _session(proc.pid)
        for p in left:  # never leave a process behind, even when the test fails
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert not left, f"still running 30 s after the signal: {left}"
    return out, err, steps_s, driver_s


def _assert_clean(proc, err: str, times: tuple, code: int, name: str, env: dict, *dirs):
    assert proc.returncode == code, err
    assert err.splitlines() == [name + LINE], err  # no traceback, no "Aborted!", no KeyboardInterrupt
    steps_s, driver_s = times
    assert steps_s is not None and steps_s < STEPS_GONE_S, f"the step processes ended after {steps_s} s"
    assert driver_s is not None and driver_s < DRIVER_GONE_S, f"the driver ended after {driver_s} s"
    scratch = [p.name for p in os.scandir(env["TMPDIR"]) if p.name.startswith("quantlab-")]
    assert not scratch, scratch
    temps = [str(p) for d in dirs if d.exists() for p in d.rglob("*") if p.name.endswith(".tmp")]
    assert not temps, temps


def test_ctrl_c_during_quantize_and_compare_ends_everything_and_the_rerun_resumes(
        tiny_dir, tiny_text, tmp_path, quantlab_home, env):
    """Ctrl-C while the second job's quantize step writes its artifact: the step removes its temp dir, the
    driver says one line, and the same command again reuses the first job and computes only the second."""
    out, db = tmp_path / "out", tmp_path / "runs.db"
    args = ["quantize-and-compare", "--model", str(tiny_dir), "--recipes", "rtn-w4-g32", "--text", str(tiny_text),
            "--out", str(out), "--store", str(db), "--json", *FAST]
    proc = _cli(args, env, start_new_session=True)
    writing = lambda: list(quantlab_home.glob("artifacts/*/.rtn-w4-g32-*.tmp"))  # noqa: E731
    _, err, *times = _signal_when(proc, lambda: "quantize" in _steps(proc) and writing(), signal.SIGINT, group=True)
    _assert_clean(proc, err, times, 130, "Interrupted (SIGINT)", env, quantlab_home, out)
    assert not list(quantlab_home.glob("artifacts/*/rtn-w4-g32-*"))  # no artifact, whole or not
    assert not (out / "results.json").exists()
    assert not db.exists() or [r["recipe"] for r in store.list_runs(db)] in ([], ["fp"])  # the first job, if stored

    again = _cli(args, env)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr
    jobs = json.loads(stdout)["jobs"]
    assert jobs["computed"] == 1 and jobs["already_stored"] + jobs["from_cache"] == 1, jobs
    assert [r["recipe"] for r in json.loads((out / "results.json").read_text())["runs"]] == ["fp", "rtn-w4-g32"]


def test_sigterm_to_the_driver_alone_ends_the_step_it_waits_on(tiny_dir, tmp_path, quantlab_home, env):
    """``quantlab quantize`` waits on its step in its main thread; SIGTERM reaches only the driver, which ends
    the step (its temp dir removed) and exits 143. The same command again builds the artifact."""
    args = ["quantize", "rtn-w4-g32", "--model", str(tiny_dir)]
    proc = _cli(args, env, start_new_session=True)
    writing = lambda: list(quantlab_home.glob("artifacts/*/.rtn-w4-g32-*.tmp"))  # noqa: E731
    _, err, *times = _signal_when(proc, writing, signal.SIGTERM, group=False)
    _assert_clean(proc, err, times, 143, "Terminated (SIGTERM)", env, quantlab_home)
    assert not list(quantlab_home.glob("artifacts/*/rtn-w4-g32-*"))

    again = _cli(args, env)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr
    assert os.path.isfile(os.path.join(stdout.strip(), "quantlab.json"))


def test_sigterm_to_a_sweep_driver_ends_the_steps_of_every_running_job(tiny_dir, tiny_text, tmp_path, quantlab_home,
                                                                       env):
    """Two jobs at once (threads of the driver, each waiting on a step process): SIGTERM to the driver alone
    ends both steps and cancels the rest; nothing is stored or published."""
    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(f'models: ["{tiny_dir}"]\nrecipes: [rtn-w4-g32, rtn-w8]\n'
                     f'evaluation: {{text: "{tiny_text}", chunks: 4, chunk_tokens: 32}}\n'
                     "measure: {batch_sizes: [1], repetitions: 1, decode_tokens: 2}\n")
    out, db = tmp_path / "out", tmp_path / "runs.db"
    args = ["sweep", str(sweep), "--max-parallel", "2", "--store", str(db), "--out", str(out), "--json"]
    proc = _cli(args, env, start_new_session=True)
    _, err, *times = _signal_when(proc, lambda: len(_steps(proc)) == 2, signal.SIGTERM, group=False)
    _assert_clean(proc, err, times, 143, "Terminated (SIGTERM)", env, quantlab_home, out)
    assert not (out / "results.json").exists()
    assert not db.exists() or store.list_runs(db) == []


def test_ctrl_c_while_a_step_process_starts_is_handled_the_same(tiny_dir, quantlab_home, env):
    """Ctrl-C the moment a step process exists, while it is still importing: the launcher starts it with the
    signals held back until its handler is in place, so it too ends quietly (no KeyboardInterrupt traceback
    from an import)."""
    proc = _cli(["bench", str(tiny_dir)], env, start_new_session=True)
    _, err, *times = _signal_when(proc, lambda: _steps(proc), signal.SIGINT, group=True)
    _assert_clean(proc, err, times, 130, "Interrupted (SIGINT)", env, quantlab_home)
