"""Sweeps: the file format and its grids, content-addressed jobs, and resuming after kill -9."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from quantlab.errors import RecipeError, UsageError
from quantlab.sweep.spec import load_spec


def _write(path, text):
    path.write_text(text)
    return path


def test_grid_expands_with_distinct_names(tmp_path):
    spec = load_spec(_write(tmp_path / "s.yaml", """
models: [smollm2-135m]
recipes:
  - fp
  - {method: rtn, bits: [4, 8], group_size: [32, 64]}
  - {method: gptq, bits: 4, group_size: 64, calibration: [self, c4_calibration]}
  - {method: gptq, bits: 4, group_size: 64, damp_percent: [0.01, 0.05]}
"""))
    assert [r.name for r in spec.recipes] == [
        "fp", "rtn-w4-g32", "rtn-w4-g64", "rtn-w8-g32", "rtn-w8-g64", "gptq-w4-g64 calibration=self",
        "gptq-w4-g64 calibration=c4_calibration", "gptq-w4-g64 damp_percent=0.05"]  # damp 0.01 = c4 default: once
    assert spec.models == ("smollm2-135m",) and spec.threads == 1


@pytest.mark.parametrize("text, message", [
    ("models: [a]\nrecipes: [fp]\nrecipies: [x]\n", "unknown key(s) recipies — allowed: description, models"),
    ("recipes: [fp]\nevaluation: {txt: self}\n", "evaluation: unknown key(s) txt — allowed: text"),
    ("recipes: [fp]\nmeasure: {reps: 2}\n", "measure: unknown key(s) reps"),
    ("model: a\nmodels: [b]\nrecipes: [fp]\n", "'models' (a list) or 'model', not both"),
    ("recipes: []\n", "non-empty list"),
    ("recipes: [{method: rtn, bits: [4], group_sise: 32}]\n", "unknown key(s) group_sise for method 'rtn'"),
    ("recipes: [{name: x, method: rtn, bits: [4, 8]}]\n", "cannot carry one 'name'"),
    ("recipes: [fp]\nmeasure: {batch_sizes: [1, 0]}\n", "batch_sizes must be a non-empty list of positive integers"),
    ("recipes: [fp]\nmeasure: {warmup: -1}\n", "measure: warmup must be an integer ≥ 0 (got -1)"),
    ("recipes: [fp]\nevaluation: {suite: [quick]}\n", "evaluation: suite must be a non-empty string"),
    ("recipes: !!python/object/apply:os.system ['true']\n", "Sweep file"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, text, message):
    with pytest.raises((UsageError, RecipeError)) as info:
        load_spec(_write(tmp_path / "s.yaml", text))
    assert message in str(info.value)


@pytest.fixture()
def tiny_sweep(tiny_dir, tiny_text, tmp_path):
    return _write(tmp_path / "tiny.yaml", f"""
description: two cheap jobs on the tiny model
models: ["{tiny_dir}"]
recipes: [rtn-w4-g32]
evaluation: {{text: "{tiny_text}", chunks: 4, chunk_tokens: 32}}
measure: {{batch_sizes: [1], repetitions: 1, decode_tokens: 2}}
""")


def _rows(db):
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT run_set, recipe, job_key FROM runs").fetchall()
        except sqlite3.OperationalError:  # the driver has created the file but not migrated it yet
            return []


@pytest.mark.slow  # minutes: several sweep processes
def test_kill_9_midway_then_rerun_finishes_only_the_missing_jobs(tiny_sweep, tmp_path, quantlab_home):
    db = tmp_path / "runs.db"
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "quantlab.cli", "sweep", str(tiny_sweep), "--store", str(db), "--json", "--out", str(out)]
    scratch = tmp_path / "tmp"  # the system temp dir of the sweep and its steps
    scratch.mkdir()
    env = {**os.environ, "QUANTLAB_HOME": str(quantlab_home), "TMPDIR": str(scratch)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    kept = quantlab_home / "jobs"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:  # kill the driver and its workers once one job is
        # stored and the other has finished its fidelity step (so it is in its bench)
        if db.exists() and _rows(db) and list(kept.glob("*/*.steps/fidelity/result.json")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = _rows(db)
    assert len(first) == 1
    [fidelity] = [json.loads(p.read_text())["result"] for p in kept.glob("*/*.steps/fidelity/result.json")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["jobs"] == 2 and summary["already_stored"] == 1 and summary["stored"] == 1
    rows = _rows(db)
    assert len(rows) == 2 and len({r[2] for r in rows}) == 2 and {r[1] for r in rows} == {"fp", "rtn-w4-g32"}
    leftovers = [p for p in quantlab_home.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    assert not list(scratch.iterdir()), list(scratch.iterdir())  # the killed driver's step dir is gone too
    # the killed job resumed at its bench: its fidelity step is the one kept, and kept steps go with the job
    stored = json.loads((out / "results.json").read_text())["runs"][1]["fidelity"]
    assert stored["step"]["wall_s"] == fidelity["step"]["wall_s"] and stored["kld_mean"] == fidelity["kld_mean"]
    assert not list(kept.glob("*/*.steps")), list(kept.glob("*/*.steps"))
    assert all((d / "quantlab.json").is_file() for d in (quantlab_home / "artifacts").glob("*/*") if d.is_dir())
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["already_stored"] == 2 and len(_rows(db)) == 2
    manifest = next((quantlab_home / "artifacts").glob("*/rtn-w4-g32-*")) / "quantlab.json"
    built = manifest.read_text()
    forced = subprocess.run(cmd + ["--force"], env=env, capture_output=True, text=True, timeout=300)
    summary = json.loads(forced.stdout)
    assert summary["computed"] == 2 and summary["run_set"] != rows[0][0] and manifest.read_text() != built
    assert len(_rows(db)) == 4
    out.joinpath("results.json").unlink()  # the forced run set was published last; republish the first below
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["already_stored"] == 2
    results = json.loads((out / "results.json").read_text())  # a results.json like quantize-and-compare's
    assert [r["recipe"] for r in results["runs"]] == ["fp", "rtn-w4-g32"] and results["run_set"] == rows[0][0]
    assert (out / "per_token" / "rtn-w4-g32.npz").is_file() and (out / "report.html").is_file()


@pytest.mark.slow  # a local Ray cluster starts
@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="needs ray (setup installs it)")
def test_ray_executor_stores_into_the_one_store(tiny_sweep, tmp_path):
    from quantlab.sweep.commands import run_sweep
    from quantlab.sweep.driver import RunOptions

    db = str(tmp_path / "runs.db")
    summary = run_sweep(str(tiny_sweep), RunOptions(executor="ray", max_parallel=2, store=db, out=str(tmp_path / "out")))
    assert summary["computed"] == 2 and summary["stored"] == 2
    rows = _rows(db)
    assert {r[1] for r in rows} == {"fp", "rtn-w4-g32"} and {r[0] for r in rows} == {summary["run_set"]}
    local = run_sweep(str(tiny_sweep), RunOptions(store=db, out=str(tmp_path / "out")))  # same jobs, same set
    assert local["run_set"] == summary["run_set"] and local["already_stored"] == 2 and len(_rows(db)) == 2


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="needs ray (setup installs it)")
def test_an_unreachable_ray_cluster_is_one_line_naming_its_address(tiny_sweep, tmp_path):
    import socket
    import time

    from click.testing import CliRunner

    from quantlab.cli import cli

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    started = time.perf_counter()
    res = CliRunner().invoke(cli, ["sweep", str(tiny_sweep), "--executor", "ray", "--address", address,
                                   "--store", str(tmp_path / "s.db"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(f"Error: Cannot reach the Ray cluster at {address} (Connection refused)")
    assert time.perf_counter() - started < 30 and not (tmp_path / "out").exists() and not (tmp_path / "s.db").exists()
    res = CliRunner().invoke(cli, ["sweep", str(tiny_sweep), "--executor", "ray", "--address", "head-node"])
    assert res.exit_code == 2 and "--address head-node is not HOST:PORT" in res.output


def test_sweep_options_are_checked():
    from quantlab.sweep.driver import RunOptions

    with pytest.raises(UsageError, match="--address joins a Ray cluster"):
        RunOptions(address="ray://head:10001")
    with pytest.raises(UsageError, match="--max-parallel"):
        RunOptions(max_parallel=0)


def test_the_shipped_calibration_grid_names_each_point():
    from pathlib import Path

    spec = load_spec(Path(__file__).resolve().parents[1] / "experiments" / "sweep-gptq-calibration.yaml")
    assert [r.name for r in spec.recipes][2:] == [
        "gptq-w4-g64 calibration=self", "gptq-w4-g64 calibration=c4_calibration",
        "gptq-w4-g64 calibration=wikitext2_raw"]


@pytest.mark.slow  # minutes: several sweep processes
def test_sweeps_running_at_once_share_jobs_and_lose_nothing(tiny_sweep, tmp_path, quantlab_home):
    """Two drivers of one sweep and a third sweep sharing its artifacts, all at once into one store: each job
    is computed once (the other driver waits and reuses it), each run set holds each job once, and every
    results.json is whole."""
    other = _write(tmp_path / "other.yaml", tiny_sweep.read_text().replace("chunks: 4", "chunks: 3"))
    assert other.read_text() != tiny_sweep.read_text()
    db = tmp_path / "runs.db"
    env = {**os.environ, "QUANTLAB_HOME": str(quantlab_home)}
    cmds = [[sys.executable, "-m", "quantlab.cli", "sweep", str(path), "--store", str(db), "--json", "--out",
             str(tmp_path / out)] for path, out in ((tiny_sweep, "a"), (tiny_sweep, "a"), (other, "b"))]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    same = [json.loads(out) for out, _ in outputs[:2]]
    assert same[0]["run_set"] == same[1]["run_set"]
    assert sum(s["computed"] for s in same) == 2 and sum(s["stored"] for s in same) == 2
    rows = _rows(db)
    by_set = {}
    for run_set, recipe, _ in rows:
        by_set.setdefault(run_set, []).append(recipe)
    assert len(by_set) == 2 and all(sorted(v) == ["fp", "rtn-w4-g32"] for v in by_set.values()), by_set
    artifacts = list((quantlab_home / "artifacts").glob("*/rtn-w4-g32-*"))
    assert len(artifacts) == 1 and (artifacts[0] / "quantlab.json").is_file()
    for out in ("a", "b"):
        assert [r["recipe"] for r in json.loads((tmp_path / out / "results.json").read_text())["runs"]] == \
            ["fp", "rtn-w4-g32"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".publish-")]


def test_a_scratch_dir_left_by_a_killed_process_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """SIGKILL leaves a process's scratch dir behind; the next scratch dir of the same prefix removes it, and
    keeps one whose process is alive."""
    import tempfile

    from quantlab.fsutil import scratch_dir

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    code = ("import os, signal, sys, time\nfrom quantlab.fsutil import scratch_dir\n"
            "with scratch_dir('quantlab-t-') as d:\n    (d / 'payload.json').write_text('{}')\n"
            "    print(d, flush=True)\n    if sys.argv[1] == 'kill':\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    time.sleep(60)\n")
    killed = subprocess.run([sys.executable, "-c", code, "kill"], capture_output=True, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    assert killed.returncode == -signal.SIGKILL
    dead = tmp_path / os.path.basename(killed.stdout.strip())
    assert (dead / "payload.json").is_file()
    live = subprocess.Popen([sys.executable, "-c", code, "wait"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        alive = tmp_path / os.path.basename(live.stdout.readline().strip())
        with scratch_dir("quantlab-t-") as mine:
            assert mine.parent == tmp_path and not dead.exists() and alive.is_dir()
        assert not mine.exists()
    finally:
        live.kill()
        live.wait()
