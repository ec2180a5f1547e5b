"""Results in SQLite: one row per run, one row per trial, committed as each batch finishes; sweeps
link their conditions' runs (a run, such as a sweep's base, can belong to several sweeps).

The file's schema is versioned (PRAGMA user_version) and every sqlite3 or OS error becomes a one-line
LabError that names the file. Store(path, readonly=True) reads without creating or changing anything.
A run records the process that runs it: a 'running' run whose process is gone is listed as 'interrupted'
(its row is left as it is; running it again resumes it).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from lab.errors import LabError

# MIGRATIONS[v] takes a file from schema version v to v + 1. Version 0 is an empty file or one written
# before the schema was versioned, which holds version 1's tables already (hence IF NOT EXISTS).
MIGRATIONS = [(
    """CREATE TABLE IF NOT EXISTS runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        fingerprint TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        plan TEXT NOT NULL,
        preset TEXT NOT NULL,
        versions TEXT NOT NULL,
        started REAL NOT NULL,
        finished REAL,
        status TEXT NOT NULL DEFAULT 'running')""",
    """CREATE TABLE IF NOT EXISTS trials (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        probe TEXT NOT NULL,
        key TEXT NOT NULL,
        data TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (run_id, probe, key))""",
), (
    """CREATE TABLE sweeps (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        fingerprint TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        model TEXT NOT NULL,
        axis TEXT NOT NULL,
        options TEXT NOT NULL,
        preset TEXT NOT NULL,
        conditions INTEGER NOT NULL,
        started REAL NOT NULL,
        finished REAL,
        status TEXT NOT NULL DEFAULT 'running')""",
    """CREATE TABLE sweep_runs (
        sweep_id INTEGER NOT NULL REFERENCES sweeps(id),
        position INTEGER NOT NULL,
        run_id INTEGER NOT NULL REFERENCES runs(id),
        label TEXT NOT NULL,
        value TEXT NOT NULL,
        control INTEGER NOT NULL,
        PRIMARY KEY (sweep_id, position))""",
), (  # 3: the process that runs a run or sweep, so that one whose process is gone is listed as interrupted
    "ALTER TABLE runs ADD COLUMN pid INTEGER",
    "ALTER TABLE runs ADD COLUMN host TEXT",
    "ALTER TABLE sweeps ADD COLUMN pid INTEGER",
    "ALTER TABLE sweeps ADD COLUMN host TEXT",
), (  # 4: when that process claimed it, so that another process given the same id later is not taken for it
    "ALTER TABLE runs ADD COLUMN claimed REAL",
    "ALTER TABLE sweeps ADD COLUMN claimed REAL",
)]
SCHEMA_VERSION = len(MIGRATIONS)
# the columns lab reads: a file whose tables lack them belongs to another application
COLUMNS = {"runs": {"id", "fingerprint", "name", "model", "plan", "preset", "versions", "started", "finished",
                    "status"},
           "trials": {"run_id", "probe", "key", "data", "created"}}
PERMISSIONS = "check the permissions of the file and its folder, or choose another with --db"
HINTS = {"SQLITE_READONLY": PERMISSIONS, "SQLITE_CANTOPEN": PERMISSIONS,
         "SQLITE_FULL": "free some space or choose another file with --db",
         "SQLITE_BUSY": "another process is writing to it"}
SQLITE_INTEGER = range(-2 ** 63, 2 ** 63)


def default_path() -> Path:
    """$LAB_DB, else $XDG_DATA_HOME/lab/results.sqlite (~/.local/share/lab/results.sqlite)."""
    if os.environ.get("LAB_DB"):
        return Path(os.environ["LAB_DB"]).expanduser()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "lab" / "results.sqlite"


def _reason(error: Exception) -> str:
    """What went wrong, in one line, with a hint where one helps."""
    text = (error.strerror if isinstance(error, OSError) and error.strerror else str(error)) or type(error).__name__
    name = getattr(error, "sqlite_errorname", "")
    hint = next((hint for prefix, hint in HINTS.items() if name.startswith(prefix)), None)
    return " ".join(text.split()) + (f" ({hint})" if hint else "")


def _alive(pid: int, claimed: float | None = None) -> bool:
    """Whether the process that claimed a row at `claimed` still runs on this machine (one of another user
    counts): a process with this id exists and, where its start time can be read, started by then (an id is
    given again to later processes)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        pass
    started = _process_started(pid) if claimed is not None else None
    return started is None or started <= claimed + CLOCK_SLACK


CLOCK_SLACK = 2.0  # seconds: the boot time in /proc/stat is whole seconds


def _process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, from Linux's /proc), or None where unknown."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _as_listed(row: sqlite3.Row) -> dict:
    """A run's or sweep's row as a dict, 'running' shown as 'interrupted' when the process that runs it
    (recorded since schema version 3) is gone from this machine: a full disk or a kill -9 could not mark it.
    Rows of another host, and older rows without a pid, keep their status."""
    found = dict(row)
    gone = (found.get("pid") and found.get("host") == socket.gethostname()
            and not _alive(found["pid"], found.get("claimed")))
    if found["status"] == "running" and gone:
        found["status"] = "interrupted"
    return found


@contextmanager
def _transaction(db: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT: the write lock is taken first, so two writers never interleave."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:  # sqlite rolls some errors (a full disk) back by itself
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Store:
    def __init__(self, path: str | Path | None = None, readonly: bool = False):
        """Open for writing (made and migrated as needed), or read-only: lab runs, lab export."""
        self.path = Path(path).expanduser() if path else default_path()
        self.readonly = readonly
        with self._errors("open"):
            self.db = self._connect()
        self.db.row_factory = sqlite3.Row

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _errors(self, action: str):
        """sqlite3 and OS errors, and rows that are not JSON, as one line naming the file."""
        try:
            yield
        except json.JSONDecodeError as error:
            raise LabError(f"cannot {action} the results database {self.path}: a stored row is not valid JSON "
                           f"({error.msg}); the file was changed outside lab") from None
        except (sqlite3.Error, OSError) as error:
            if getattr(error, "sqlite_errorname", "") == "SQLITE_NOTADB":
                raise LabError(f"{self.path} is not a lab results database (not an SQLite file)") from None
            raise LabError(f"cannot {action} the results database {self.path}: {_reason(error)}") from None

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            db, prepare = self._read_only_connection(), self._check_version
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db, prepare = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None), self._migrate
        try:
            prepare(db)
        except BaseException:
            db.close()
            raise
        return db

    def _read_only_connection(self) -> sqlite3.Connection:
        """mode=ro. A WAL file in a folder lab cannot write (no -shm can be made there) is opened as
        immutable, which is safe when it has no -wal file: then no writer is active and every trial is in it."""
        if not self.path.exists():
            raise LabError(f"no results database at {self.path} yet; lab run creates it")
        uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
        db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA user_version")
        except sqlite3.Error as error:
            db.close()
            wal = Path(f"{self.path}-wal")
            if getattr(error, "sqlite_errorname", "") != "SQLITE_READONLY_DIRECTORY" or wal.exists():
                raise
            db = sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False, isolation_level=None)
        return db

    def _check_version(self, db: sqlite3.Connection) -> int:
        """The file's schema version; refuses newer versions and other applications' files."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")} for table in COLUMNS}
        empty = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
        if version > SCHEMA_VERSION:
            raise LabError(f"{self.path} has results schema version {version}, this lab knows up to "
                           f"{SCHEMA_VERSION}: upgrade lab to use it")
        if empty and self.readonly:
            raise LabError(f"no results in {self.path} yet; lab run writes them")
        if not empty and any(not COLUMNS[table] <= columns for table, columns in tables.items()):
            raise LabError(f"{self.path} is not a lab results database (it has no lab runs and trials tables)")
        return version

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the file to SCHEMA_VERSION, then to WAL (readers go on while a run writes). Stamping the
        version is a write, so a file that lab cannot write fails here, before a model loads."""
        with _transaction(db):
            version = self._check_version(db)
            for migration in MIGRATIONS[version:]:
                for statement in migration:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("PRAGMA journal_mode=WAL")

    def close(self) -> None:
        with self._errors("close"):
            self.db.close()

    def open_run(self, fingerprint: str, name: str, model: str, plan: dict, preset: str, versions: dict) -> int:
        """The run with this fingerprint (resumed), or a new one."""
        return self._open("runs", "run", fingerprint, dict(name=name, model=model, plan=json.dumps(plan),
                                                             preset=preset, versions=json.dumps(versions)))

    def _open(self, table: str, noun: str, fingerprint: str, fields: dict) -> int:
        """The row of `table` with this fingerprint, marked running again, or a new one; in one write transaction,
        so openers never race. One that another live process on this machine computes is refused: both would
        compute every trial."""
        pid, host = os.getpid(), socket.gethostname()
        with self._errors("write to"), _transaction(self.db):
            found = self.db.execute(f"SELECT id, name, status, pid, host, claimed FROM {table} WHERE fingerprint = ?",
                                    (fingerprint,)).fetchone()
            now = time.time()
            if found is None:
                row = dict(fingerprint=fingerprint, **fields, started=now, pid=pid, host=host, claimed=now)
                return self.db.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))}) "
                                       "RETURNING id", tuple(row.values())).fetchone()["id"]
            if found["status"] == "running" and found["host"] == host and found["pid"] not in (None, pid) \
                    and _alive(found["pid"], found["claimed"]):
                raise LabError(f"{noun} #{found['id']} ({found['name']}) is running in process {found['pid']} on "
                               "this machine: wait for it, or stop it and run again to resume")
            self.db.execute(f"UPDATE {table} SET status = 'running', finished = NULL, pid = ?, host = ?, claimed = ? "
                            "WHERE id = ?", (pid, host, now, found["id"]))
            return found["id"]

    def finish_run(self, run_id: int, status: str) -> None:
        """Mark the run finished. Runners call this in a `finally`: while an exception is in flight, a
        failure here is dropped, so the original error is the one reported."""
        in_flight = sys.exc_info()[1]
        try:
            with self._errors("write to"):
                self.db.execute("UPDATE runs SET status = ?, finished = ? WHERE id = ?", (status, time.time(), run_id))
        except LabError:
            if in_flight is None:
                raise

    def done_keys(self, run_id: int, probe: str) -> set[str]:
        with self._errors("read"):
            rows = self.db.execute("SELECT key FROM trials WHERE run_id = ? AND probe = ?", (run_id, probe)).fetchall()
        return {r["key"] for r in rows}

    def add_trials(self, run_id: int, probe: str, rows: list[dict]) -> None:
        """Write one batch atomically."""
        now = time.time()
        with self._errors("write to"), _transaction(self.db):
            self.db.executemany("INSERT OR REPLACE INTO trials (run_id, probe, key, data, created) VALUES (?,?,?,?,?)",
                                [(run_id, probe, r["key"], json.dumps(r), now) for r in rows])

    def trials(self, run_id: int, probe: str | None = None) -> list[dict]:
        query = "SELECT probe, data FROM trials WHERE run_id = ?" + (" AND probe = ?" if probe else "")
        args = (run_id, probe) if probe else (run_id,)
        with self._errors("read"):
            rows = self.db.execute(query + " ORDER BY rowid", args).fetchall()
            return [{"probe": r["probe"], **json.loads(r["data"])} for r in rows]

    def runs(self) -> list[dict]:
        with self._errors("read"):
            rows = self.db.execute("SELECT r.*, (SELECT COUNT(*) FROM trials t WHERE t.run_id = r.id) AS trials "
                                   "FROM runs r ORDER BY r.id").fetchall()
        return [_as_listed(r) for r in rows]

    def run(self, run_id: int) -> dict:
        row = None
        if run_id in SQLITE_INTEGER:
            with self._errors("read"):
                row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise LabError(f"no run {run_id} in {self.path} (see lab runs)")
        return _as_listed(row)

    def run_by_fingerprint(self, fingerprint: str) -> dict | None:
        with self._errors("read"):
            row = self.db.execute("SELECT * FROM runs WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return _as_listed(row) if row else None

    # ---- sweeps (schema version 2) -------------------------------------------------------------
    def open_sweep(self, fingerprint: str, name: str, model: str, axis: str, options: dict, preset: str,
                   conditions: int) -> int:
        """The sweep with this fingerprint (resumed), or a new one."""
        return self._open("sweeps", "sweep", fingerprint, dict(name=name, model=model, axis=axis,
                                                                 options=json.dumps(options), preset=preset,
                                                                 conditions=conditions))

    def link_run(self, sweep_id: int, position: int, run_id: int, label: str, value, control: int) -> None:
        """Record that condition `position` of a sweep is run `run_id` (`control`: 0, or its n-th random control)."""
        with self._errors("write to"):
            self.db.execute("INSERT OR REPLACE INTO sweep_runs (sweep_id, position, run_id, label, value, control) "
                            "VALUES (?,?,?,?,?,?)", (sweep_id, position, run_id, label, json.dumps(value), control))

    def finish_sweep(self, sweep_id: int, status: str) -> None:
        """Mark the sweep finished; like finish_run, quiet while another error is in flight."""
        in_flight = sys.exc_info()[1]
        try:
            with self._errors("write to"):
                self.db.execute("UPDATE sweeps SET status = ?, finished = ? WHERE id = ?",
                                (status, time.time(), sweep_id))
        except LabError:
            if in_flight is None:
                raise

    def _has_sweeps(self) -> bool:
        """Files older than schema version 2, opened read-only, have no sweep tables (and so no sweeps)."""
        with self._errors("read"):
            return self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'sweeps'").fetchone() is not None

    def sweeps(self) -> list[dict]:
        if not self._has_sweeps():
            return []
        with self._errors("read"):
            rows = self.db.execute("SELECT s.*, (SELECT COUNT(*) FROM sweep_runs l WHERE l.sweep_id = s.id) AS linked "
                                   "FROM sweeps s ORDER BY s.id").fetchall()
            return [{**_as_listed(r), "options": json.loads(r["options"])} for r in rows]

    def sweep(self, sweep_id: int) -> dict:
        """One sweep's row, with "runs": its linked conditions in order (label, value, control, run's plan...)."""
        row = None
        if sweep_id in SQLITE_INTEGER and self._has_sweeps():
            with self._errors("read"):
                row = self.db.execute("SELECT * FROM sweeps WHERE id = ?", (sweep_id,)).fetchone()
        if row is None:
            raise LabError(f"no sweep {sweep_id} in {self.path} (see lab sweeps)")
        with self._errors("read"):
            links = self.db.execute(
                "SELECT l.position, l.run_id, l.label, l.value, l.control, r.plan, r.status FROM sweep_runs l "
                "JOIN runs r ON r.id = l.run_id WHERE l.sweep_id = ? ORDER BY l.position", (sweep_id,)).fetchall()
            runs = [{**dict(link), "value": json.loads(link["value"]), "plan": json.loads(link["plan"])} for link in links]
            return {**_as_listed(row), "options": json.loads(row["options"]), "runs": runs}
