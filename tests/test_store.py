import json
import sqlite3

import pytest

from quantlab import store


def _record(run_set="rs1", recipe="bnb-nf4"):
    return {"run_set": run_set, "model": {"ref": "m", "fingerprint": "abc"}, "recipe": recipe, "method": "bnb",
            "bits": 4, "params": {"quant_type": "nf4"}, "artifact": "/a", "fidelity": {"kld_mean": 0.1},
            "memory": {"weights_bytes": 10}, "latency": {}, "cost": {}, "provenance": {"git_sha": "x"}}


def test_schema_after_migrations(tmp_path):
    conn = store.connect(tmp_path / "q.db")
    assert store.schema_version(conn) == len(store.MIGRATIONS)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(runs)")]
    assert cols == ["id", "run_set", "created_at", "model_ref", "model_fingerprint", "recipe", "method", "bits",
                    "params", "artifact", "fidelity", "memory", "latency", "cost", "provenance", "accuracy", "job_key",
                    "step_wall_s", "fit"]
    assert [r[1] for r in conn.execute("PRAGMA table_info(samples)")] == ["run_id", "task", "data"]
    assert "runs_run_set_job" in [r[1] for r in conn.execute("PRAGMA index_list(runs)")]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.migrate(conn)  # idempotent
    assert store.schema_version(conn) == len(store.MIGRATIONS)


def test_a_job_is_stored_once_per_run_set(tmp_path):
    db = tmp_path / "q.db"
    first = store.insert_run(db, {**_record(), "job_key": "k1"}, unique_job=True)
    assert first and store.insert_run(db, {**_record(), "job_key": "k1"}, unique_job=True) is None
    assert store.insert_run(db, {**_record(run_set="other"), "job_key": "k1"}, unique_job=True)
    assert len(store.list_runs(db)) == 2


def test_insert_and_list_round_trip(tmp_path):
    db = tmp_path / "q.db"
    run_id = store.insert_run(db, _record())
    store.insert_run(db, _record(run_set="rs2", recipe="rtn-w8"))
    rows = store.list_runs(db)
    assert [r["recipe"] for r in rows] == ["rtn-w8", "bnb-nf4"]
    only = store.list_runs(db, run_set="rs1")
    assert len(only) == 1 and only[0]["id"] == run_id and only[0]["fidelity"] == {"kld_mean": 0.1}


def test_failed_insert_leaves_no_row(tmp_path):
    db = tmp_path / "q.db"
    bad = _record()
    del bad["recipe"]
    with pytest.raises(KeyError):
        store.insert_run(db, bad)
    run_id = store.insert_run(db, _record())
    with pytest.raises(store.StoreError, match="UNIQUE constraint failed: runs.id"):
        store.insert_run(db, {**_record(), "id": run_id})
    assert len(store.list_runs(db)) == 1


@pytest.mark.parametrize("bad, message", [
    ({"id": "same"}, "UNIQUE constraint failed: runs.id"),  # another job's run id
    ({"model": {"ref": "m", "fingerprint": None}}, "NOT NULL constraint failed: runs.model_fingerprint"),
])
def test_a_constraint_other_than_the_job_index_is_raised_with_unique_job(tmp_path, bad, message):
    db = tmp_path / "q.db"
    store.insert_run(db, {**_record(), "id": "same", "job_key": "k1"}, unique_job=True)
    with pytest.raises(store.StoreError, match=message):
        store.insert_run(db, {**_record(), "job_key": "k2", **bad}, unique_job=True)
    assert [r["job_key"] for r in store.list_runs(db)] == ["k1"]


def _capped(monkeypatch):
    """Each store connection may not grow the file beyond its size now: SQLite's own SQLITE_FULL, as on a
    full disk, without filling one."""
    connect = store.connect

    def capped(path=None):
        conn = connect(path)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(store, "connect", capped)


def test_a_full_disk_is_a_store_error_naming_it_and_the_transaction_is_undone(tmp_path, monkeypatch):
    import random

    db = tmp_path / "q.db"
    kept = store.insert_run(db, _record())
    rng = random.Random(0)
    samples = {"arc_easy": [{"doc_id": i, "ll": [rng.random() for _ in range(4)]} for i in range(5000)]}
    _capped(monkeypatch)
    with pytest.raises(store.StoreError) as err:
        store.insert_run(db, {**_record(run_set="full"), "job_key": "k"}, samples, unique_job=True)
    message = str(err.value)
    assert f"filesystem holding the store {db} is full" in message and "database or disk is full" in message
    assert "MB free" in message and "cannot rollback" not in message and "\n" not in message
    with pytest.raises(store.StoreError, match="is full"):
        store.update_runs(db, {kept: {"fidelity": {"kld_mean": 0.2, "pad": "x" * 200_000}}})
    monkeypatch.undo()
    rows = store.list_runs(db)
    assert [r["id"] for r in rows] == [kept] and rows[0]["fidelity"] == {"kld_mean": 0.1}


def _foreign_db(path):
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); "
                       "INSERT INTO notes (body) VALUES ('keep me');")
    conn.close()
    return path


def test_another_applications_database_is_refused_and_left_byte_identical(tmp_path):
    from click.testing import CliRunner

    from quantlab.cli import cli

    db = _foreign_db(tmp_path / "app.db")
    before = db.read_bytes()
    res = CliRunner().invoke(cli, ["runs", "--store", str(db)])
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(f"Error: {db} is not a quantlab store") and "tables notes" in res.output
    with pytest.raises(store.StoreError, match="not a quantlab store"):
        store.insert_run(db, _record())
    assert db.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]


def test_an_empty_file_becomes_a_store_marked_as_quantlabs(tmp_path):
    db = tmp_path / "new.db"
    db.touch()
    store.insert_run(db, _record())
    conn = store.connect(db)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == store.APPLICATION_ID
    assert len(store.list_runs(db)) == 1


def test_newer_schema_is_refused(tmp_path):
    db = tmp_path / "q.db"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {len(store.MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(store.StoreError, match="newer than this quantlab"):
        store.connect(db)


def test_v1_store_migrates_and_keeps_its_runs(tmp_path):
    db = tmp_path / "q.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(store.MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO runs VALUES ('old', 'rs0', 't', 'm', 'f', 'fp', 'fp', 16, '{}', '/a', '{}', '{}', "
                 "'{}', '{}', '{}')")
    conn.close()
    rows = store.list_runs(db)
    assert [r["id"] for r in rows] == ["old"] and rows[0]["accuracy"] is None and rows[0]["fit"] is None
    assert store.read_samples(db, "old") == {}


FIT = {"sensitivity_table": "/h/sensitivity/k/table.json", "sensitivity_cost": {"forwards_wall_s": 2.0},
       "budget_bytes": 204800,
       "sensitivity": {"units": [{"name": "model.layers.0", "block": 0, "modules": ["model.layers.0.mlp.up_proj"]},
                                 {"name": "model.layers.1", "block": 1, "modules": ["model.layers.1.mlp.up_proj"]}],
                       "formats": ["fp", "gptq-w8"], "granularity": "block",
                       "kld": {"model.layers.0": {"fp": 0.0, "gptq-w8": 0.002},
                               "model.layers.1": {"fp": 0.0, "gptq-w8": 0.003}},
                       "text": {"name": "c4_calibration", "sha256": "0" * 64, "windows": 8, "window_tokens": 256}},
       "predicted_bytes": 190000, "predicted_kld": 0.002, "units_per_format": {"fp": 1, "gptq-w8": 1},
       "unit_formats": {"model.layers.0": "gptq-w8", "model.layers.1": "fp"}, "fp_units": 1}


def test_v5_store_migrates_to_a_fit_column_that_round_trips(tmp_path):
    """A store written before fits (schema v5) gains the fit column; its runs read back with fit None."""
    db = tmp_path / "q.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(";".join(store.MIGRATIONS[:5]) + "; PRAGMA user_version = 5;")
    conn.execute("INSERT INTO runs (id, run_set, created_at, model_ref, model_fingerprint, recipe, method, bits, "
                 "params, artifact, provenance) VALUES ('old', 'rs0', 't', 'm', 'f', 'fp', 'fp', 16, '{}', '/a', '{}')")
    conn.close()
    assert store.schema_version(store.connect(db)) == len(store.MIGRATIONS)
    fit_id = store.insert_run(db, {**_record(recipe="fit-200KiB"), "method": "fit", "fit": FIT})
    plain_id = store.insert_run(db, _record())
    rows = {r["id"]: r for r in store.list_runs(db)}
    assert rows["old"]["fit"] is None and rows[plain_id]["fit"] is None
    assert rows[fit_id]["fit"] == FIT
    conn = store.connect(db)
    assert conn.execute("SELECT fit FROM runs WHERE id = ?", (plain_id,)).fetchone()[0] == "null"
    assert json.loads(conn.execute("SELECT fit FROM runs WHERE id = ?", (fit_id,)).fetchone()[0]) == FIT


def test_samples_round_trip_in_the_run_transaction(tmp_path):
    db = tmp_path / "q.db"
    samples = {"arc_easy": [{"doc_id": 0, "acc": 1.0, "ll": [-1.0, -2.0], "gold": 0}]}
    run_id = store.insert_run(db, {**_record(), "accuracy": {"tasks": {}}}, samples)
    assert store.read_samples(db, run_id) == samples
    assert [r["id"] for r in store.find_runs(db, "rs1")] == [run_id]
    assert [r["id"] for r in store.find_runs(db, run_id[:10])] == [run_id]
    bad = {"arc_easy": [{"doc_id": 0}], "piqa": [{"doc_id": object()}]}  # fails after the run row is inserted
    with pytest.raises(TypeError):
        store.insert_run(db, {**_record(run_set="rs9"), "id": "half"}, bad)
    assert store.find_runs(db, "rs9") == [] and store.read_samples(db, "half") == {}


def test_update_runs_replaces_json_columns_in_one_transaction(tmp_path):
    from quantlab.errors import StoreError

    db = tmp_path / "q.db"
    a, b = store.insert_run(db, _record()), store.insert_run(db, _record(recipe="rtn-w8"))
    guard = {"ok": False, "reasons": ["top-1 agreement 0.1 is below 0.25"]}
    store.update_runs(db, {a: {"fidelity": {"kld_mean": 0.1, "guard": guard}}})
    rows = {r["id"]: r for r in store.list_runs(db)}
    assert rows[a]["fidelity"]["guard"] == guard and rows[b]["fidelity"] == {"kld_mean": 0.1}
    with pytest.raises(StoreError, match="Cannot update column"):  # a bad column rolls back the whole update
        store.update_runs(db, {b: {"fidelity": {"kld_mean": 9.0}}, a: {"recipe": "x"}})
    assert {r["id"]: r for r in store.list_runs(db)}[b]["fidelity"] == {"kld_mean": 0.1}


def test_processes_opening_a_new_store_at_once_migrate_it_once(tmp_path):
    """Sweeps started together all open (and migrate) the same fresh store."""
    import subprocess
    import sys

    db = tmp_path / "q.db"
    code = "import sys; from quantlab import store; store.connect(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db)], stderr=subprocess.PIPE, text=True) for _ in range(6)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert store.schema_version(store.connect(db)) == len(store.MIGRATIONS)
