"""SQLite results store: numbered migrations, one transaction per run.

Default location QUANTLAB_HOME/quantlab.db. JSON columns hold the nested records; the scalar columns
are what ``quantlab runs`` lists and what later queries filter on.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import sqlite3
import uuid
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from quantlab.errors import StoreError
from quantlab.fsutil import ensure_dir, free_bytes
from quantlab.home import quantlab_home

#: PRAGMA application_id of a quantlab store ("qtlb"): how a store is told from another application's database
APPLICATION_ID = 0x71746C62

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
    # 2: suite accuracy per run, and its per-sample scores (gzip JSON, one row per task) for the gate
    """
    ALTER TABLE runs ADD COLUMN accuracy TEXT;
    CREATE TABLE samples (
        run_id TEXT NOT NULL REFERENCES runs (id),
        task TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (run_id, task)
    );
    """,
    # 3: sweep jobs: the content key of the job a run came from; one row per (run set, job)
    """
    ALTER TABLE runs ADD COLUMN job_key TEXT;
    CREATE UNIQUE INDEX runs_run_set_job ON runs (run_set, job_key) WHERE job_key IS NOT NULL;
    """,
    # 4: each step's wall seconds (quantlab.records.WALL)
    """
    ALTER TABLE runs ADD COLUMN step_wall_s TEXT;
    """,
    # 5: the schema marker: a database with tables and without it is another application's, never migrated
    f"""
    PRAGMA application_id = {APPLICATION_ID};
    """,
    # 6: what chose a fit recipe's allocation (quantlab.steps.fit.resolve_fit); NULL for every other run
    """
    ALTER TABLE runs ADD COLUMN fit TEXT;
    """,
]

_JSON_COLUMNS = ("params", "fidelity", "memory", "latency", "cost", "provenance", "accuracy", "step_wall_s",
                 "fit")


def default_store_path() -> Path:
    return quantlab_home() / "quantlab.db"


def connect(path: str | Path | None = None) -> sqlite3.Connection:
    path = Path(path or default_store_path())
    ensure_dir(path.parent)
    if path.is_dir():
        raise StoreError(f"The store {path} is a folder — pass --store a file, e.g. {path / 'quantlab.db'}")
    try:
        conn = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        try:
            check_ours(conn, path)  # before anything writes: another application's database stays byte-identical
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=30000")
            migrate(conn, path)
        except BaseException:
            conn.close()
            raise
    except sqlite3.DatabaseError as exc:
        if _is_full(exc):
            raise disk_full(path, exc) from None
        if _is_damaged(exc):
            raise damaged(path, exc) from None
        raise StoreError(f"Cannot open store {path}: {exc} — it is not a quantlab store; pass a new file with --store "
                         "(quantlab did not change it)") from None
    except OSError as exc:
        if _is_full(exc):
            raise disk_full(path, exc) from None
        raise StoreError(f"Cannot create store {path}: {exc.strerror} — pass a writable --store") from None
    return conn


def check_ours(conn: sqlite3.Connection, path: Path) -> None:
    """A new (empty) database, or a quantlab store: its application_id, or from before there was one, schema
    version ≥ 1 with a ``runs`` table. Anything else with tables is another application's: refused, untouched."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                         "AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    legacy = app_id == 0 and schema_version(conn) >= 1 and "runs" in tables
    if app_id not in (0, APPLICATION_ID) or (tables and app_id != APPLICATION_ID and not legacy):
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise StoreError(f"{path} is not a quantlab store (another application's database"
                         f"{f' with tables {shown}' if tables else ''}) — pass a new file with --store; "
                         "quantlab did not change it")


def _is_full(exc: BaseException) -> bool:
    """A full filesystem, as SQLite (SQLITE_FULL) or the OS (ENOSPC) reports it."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorname", "") == "SQLITE_FULL"
                                               or "disk is full" in str(exc))


def _is_damaged(exc: BaseException) -> bool:
    """Pages SQLite cannot read (SQLITE_CORRUPT: "database disk image is malformed"). A file that is no SQLite
    database at all (SQLITE_NOTADB) is not a damaged store but someone else's file: connect says so."""
    return isinstance(exc, sqlite3.DatabaseError) and (
        getattr(exc, "sqlite_errorname", "") == "SQLITE_CORRUPT" or "malformed" in str(exc))


def damaged(path: Path | None, exc: Exception) -> StoreError:
    """A store whose pages are damaged: the error names it and how to recover its runs; nothing was changed."""
    path = path or default_store_path()
    return StoreError(f"The store {path} is damaged ({exc}) — quantlab changed nothing in it; recover its runs with "
                      f"`sqlite3 {path} .recover | sqlite3 NEW.db` and pass --store NEW.db, or move {path.name} aside "
                      "to start a new store")


@contextlib.contextmanager
def opened(path: str | Path | None = None):
    """A connection to the store at ``path`` (default QUANTLAB_HOME/quantlab.db), closed after the block. Any
    failure of SQLite on the way, opening or in a statement, leaves as a one-line StoreError: a full disk
    or damaged pages named as such."""
    path = Path(path or default_store_path())
    with closing(connect(path)) as conn:
        try:
            yield conn
        except sqlite3.DatabaseError as exc:
            if _is_full(exc):
                raise disk_full(path, exc) from None
            if _is_damaged(exc):
                raise damaged(path, exc) from None
            raise


def check_store(path: str | Path | None = None) -> None:
    """Before a run's work: the store opens, and SQLite's quick_check finds every page readable (a damaged
    store would otherwise fail only when the first finished job is stored)."""
    path = Path(path or default_store_path())
    if not path.exists():  # a new store: nothing to check, and nothing created before the run's own checks
        return
    with opened(path) as conn:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(3)").fetchall()]
    if problems != ["ok"]:
        raise damaged(path, " ".join(" ".join(problems).split())[:200])


def disk_full(path: Path | None, exc: Exception) -> StoreError:
    """The store's filesystem is full: the error names it, the free space left and the fix."""
    path = path or default_store_path()
    return StoreError(f"The filesystem holding the store {path} is full ({exc}; {free_bytes(path) / 1e6:.0f} MB "
                      "free) — free space there, or pass --store on another disk; the store is unchanged")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, path: Path | None = None):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. SQLite rolls some failures back itself (a full
    disk): then there is nothing to roll back, and the original error is the one raised, as a StoreError."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if _is_full(exc):
            raise disk_full(path, exc) from None
        raise


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection, path: Path | None = None) -> None:
    """Apply each pending migration in its own transaction, bumping PRAGMA user_version."""
    current = schema_version(conn)
    if current > len(MIGRATIONS):
        raise StoreError(f"Store schema v{current} is newer than this quantlab (v{len(MIGRATIONS)}) — upgrade quantlab")
    for number, sql in enumerate(MIGRATIONS[current:], start=current + 1):
        with transaction(conn, path):
            if schema_version(conn) >= number:  # another process migrated it while this one waited for the lock
                continue
            for statement in filter(str.strip, sql.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")


def insert_run(path: str | Path | None, record: dict, samples: dict | None = None,
               unique_job: bool = False) -> str | None:
    """Insert one run and its per-sample scores (task -> rows) in one transaction; returns its id.

    With ``unique_job``, a run whose (run set, job key) is already stored is not stored again: None."""
    run_id = record.get("id") or uuid.uuid4().hex
    row = {
        "id": run_id, "run_set": record["run_set"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model_ref": record["model"]["ref"], "model_fingerprint": record["model"]["fingerprint"],
        "recipe": record["recipe"], "method": record["method"], "bits": record["bits"],
        "artifact": record["artifact"], "job_key": record.get("job_key"),
    }
    row.update({c: json.dumps(record.get(c), default=str) for c in _JSON_COLUMNS})
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    path = Path(path or default_store_path())
    with opened(path) as conn:
        try:
            with transaction(conn, path):
                conn.execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", list(row.values()))
                for task, rows in (samples or {}).items():
                    blob = gzip.compress(json.dumps(rows, separators=(",", ":")).encode(), mtime=0)
                    conn.execute("INSERT INTO samples (run_id, task, data) VALUES (?, ?, ?)", (run_id, task, blob))
        except sqlite3.IntegrityError as exc:
            if unique_job and record.get("job_key") and _job_stored(conn, row["run_set"], row["job_key"]):
                return None  # another driver stored this job first: the unique (run set, job key) index held
            raise StoreError(f"Cannot store run {run_id} ({row['recipe']}) in {path}: {exc} — nothing was stored; a "
                             "record the store's schema refuses is a quantlab bug: report it with --debug's output") from exc
    return run_id


def _job_stored(conn: sqlite3.Connection, run_set: str, job_key: str) -> bool:
    return conn.execute("SELECT 1 FROM runs WHERE run_set = ? AND job_key = ?", (run_set, job_key)).fetchone() is not None


def update_runs(path: str | Path | None, updates: dict[str, dict]) -> None:
    """Replace JSON columns of stored runs (run id -> {column: value}) in one transaction: the values a run
    set's jobs only have once all of them are in (the garbage guard against its peers, recoveries)."""
    path = Path(path or default_store_path())
    with opened(path) as conn, transaction(conn, path):
        for run_id, columns in updates.items():
            bad = set(columns) - set(_JSON_COLUMNS)
            if bad:
                raise StoreError(f"Cannot update column(s) {', '.join(sorted(bad))} of a stored run")
            sets = ", ".join(f"{c} = ?" for c in columns)
            conn.execute(f"UPDATE runs SET {sets} WHERE id = ?",
                         [json.dumps(v, default=str) for v in columns.values()] + [run_id])


def list_runs(path: str | Path | None = None, run_set: str | None = None, limit: int | None = None) -> list[dict]:
    return _select(path, "WHERE run_set = ?" if run_set else "", [run_set] if run_set else [], limit)


def find_runs(path: str | Path | None, ref: str) -> list[dict]:
    """Runs whose id (or an unambiguous id prefix of ≥ 8 characters) or run set is ``ref``, oldest first."""
    runs = _select(path, "WHERE run_set = ?", [ref], None)
    if not runs and len(ref) >= 8:
        runs = _select(path, "WHERE id LIKE ?", [ref.replace("%", "") + "%"], None)
        if len(runs) > 1:
            raise StoreError(f"Run id prefix '{ref}' matches {len(runs)} runs — give more characters")
    return runs[::-1]


def read_samples(path: str | Path | None, run_id: str) -> dict:
    if not Path(path or default_store_path()).exists():  # reading never creates a store (nor its folders)
        return {}
    with opened(path) as conn:
        rows = conn.execute("SELECT task, data FROM samples WHERE run_id = ?", (run_id,)).fetchall()
    return {task: json.loads(gzip.decompress(data)) for task, data in rows}


def _select(path, where: str, args: list, limit: int | None) -> list[dict]:
    if not Path(path or default_store_path()).exists():  # reading never creates a store (nor its folders)
        return []
    sql = f"SELECT * FROM runs {where} ORDER BY created_at DESC, rowid DESC"
    if limit:
        sql += f" LIMIT {int(limit)}"
    with opened(path) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(sql, args).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        for c in _JSON_COLUMNS:
            d[c] = json.loads(d[c]) if d[c] else None
        out.append(d)
    return out
