"""SQLite results store: numbered migrations, one transaction per run.

Default location QUANTLAB_HOME/quantlab.db. JSON columns hold the nested records; the scalar columns
are what ``quantlab runs`` lists and what later queries filter on.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from quantlab.errors import StoreError

MIGRATIONS: list[str] = [
    # 1: runs, with the record of each (model, recipe) evaluation
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        run_set TEXT NOT NULL,
        created_at TEXT NOT NULL,
        model_ref TEXT NOT NULL,
        model_fingerprint TEXT NOT NULL,
        recipe TEXT NOT NULL,
        method TEXT NOT NULL,
        bits INTEGER NOT NULL,
        params TEXT NOT NULL,
        artifact TEXT NOT NULL,
        fidelity TEXT,
        memory TEXT,
        latency TEXT,
        cost TEXT,
        provenance TEXT NOT NULL
    );
    CREATE INDEX runs_model_recipe ON runs (model_fingerprint, recipe);
    CREATE INDEX runs_run_set ON runs (run_set);
    """,
]

_JSON_COLUMNS = ("params", "fidelity", "memory", "latency", "cost", "provenance")


def default_store_path() -> Path:
    from quantlab.models import quantlab_home

    return quantlab_home() / "quantlab.db"


def connect(path: str | Path | None = None) -> sqlite3.Connection:
    path = Path(path or default_store_path())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA busy_timeout=30000")
        migrate(conn)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"Cannot open store {path}: {exc} — pass another --store or move the file aside") from None
    except OSError as exc:
        raise StoreError(f"Cannot create store {path}: {exc.strerror} — pass a writable --store") from None
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> None:
    """Apply each pending migration in its own transaction, bumping PRAGMA user_version."""
    current = schema_version(conn)
    if current > len(MIGRATIONS):
        raise StoreError(f"Store schema v{current} is newer than this quantlab (v{len(MIGRATIONS)}) — upgrade quantlab")
    for number, sql in enumerate(MIGRATIONS[current:], start=current + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, sql.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def new_run_set() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def insert_run(path: str | Path | None, record: dict) -> str:
    """Insert one run in one transaction; returns its id."""
    run_id = record.get("id") or uuid.uuid4().hex
    row = {
        "id": run_id, "run_set": record["run_set"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_ref": record["model"]["ref"], "model_fingerprint": record["model"]["fingerprint"],
        "recipe": record["recipe"], "method": record["method"], "bits": record["bits"],
        "artifact": record["artifact"],
    }
    row.update({c: json.dumps(record.get(c), default=str) for c in _JSON_COLUMNS})
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    with closing(connect(path)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", list(row.values()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return run_id


def list_runs(path: str | Path | None = None, run_set: str | None = None, limit: int | None = None) -> list[dict]:
    sql = "SELECT * FROM runs"
    args: list = []
    if run_set:
        sql += " WHERE run_set = ?"
        args.append(run_set)
    sql += " ORDER BY created_at DESC, rowid DESC"
    if limit:
        sql += f" LIMIT {int(limit)}"
    with closing(connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(sql, args).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        for c in _JSON_COLUMNS:
            d[c] = json.loads(d[c]) if d[c] else None
        out.append(d)
    return out
