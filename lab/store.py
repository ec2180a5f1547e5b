"""Results in SQLite: one row per run, one row per trial, committed as each batch finishes."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

from lab.errors import LabError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    model TEXT NOT NULL,
    plan TEXT NOT NULL,
    preset TEXT NOT NULL,
    versions TEXT NOT NULL,
    started REAL NOT NULL,
    finished REAL,
    status TEXT NOT NULL DEFAULT 'running'
);
CREATE TABLE IF NOT EXISTS trials (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    probe TEXT NOT NULL,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, probe, key)
);
"""


def default_path() -> Path:
    """$LAB_DB, else $XDG_DATA_HOME/lab/results.sqlite (~/.local/share/lab/results.sqlite)."""
    if os.environ.get("LAB_DB"):
        return Path(os.environ["LAB_DB"]).expanduser()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "lab" / "results.sqlite"


class Store:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as error:
            raise LabError(f"cannot open the results database {self.path}: {error}") from None
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    def open_run(self, fingerprint: str, name: str, model: str, plan: dict, preset: str, versions: dict) -> int:
        """The run with this fingerprint (resumed), or a new one."""
        row = self.db.execute("SELECT id FROM runs WHERE fingerprint = ?", (fingerprint,)).fetchone()
        if row:
            self.db.execute("UPDATE runs SET status = 'running', finished = NULL WHERE id = ?", (row["id"],))
            return row["id"]
        cur = self.db.execute(
            "INSERT INTO runs (fingerprint, name, model, plan, preset, versions, started) VALUES (?,?,?,?,?,?,?)",
            (fingerprint, name, model, json.dumps(plan), preset, json.dumps(versions), time.time()))
        return cur.lastrowid

    def finish_run(self, run_id: int, status: str) -> None:
        self.db.execute("UPDATE runs SET status = ?, finished = ? WHERE id = ?", (status, time.time(), run_id))

    def done_keys(self, run_id: int, probe: str) -> set[str]:
        rows = self.db.execute("SELECT key FROM trials WHERE run_id = ? AND probe = ?", (run_id, probe))
        return {r["key"] for r in rows}

    def add_trials(self, run_id: int, probe: str, rows: list[dict]) -> None:
        """Write one batch atomically."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR REPLACE INTO trials (run_id, probe, key, data, created) VALUES (?,?,?,?,?)",
                                [(run_id, probe, r["key"], json.dumps(r), now) for r in rows])

    def trials(self, run_id: int, probe: str | None = None) -> list[dict]:
        query = "SELECT probe, data FROM trials WHERE run_id = ?" + (" AND probe = ?" if probe else "")
        args = (run_id, probe) if probe else (run_id,)
        return [{"probe": r["probe"], **json.loads(r["data"])} for r in self.db.execute(query + " ORDER BY rowid", args)]

    def runs(self) -> list[dict]:
        rows = self.db.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM trials t WHERE t.run_id = r.id) AS trials FROM runs r ORDER BY r.id")
        return [dict(r) for r in rows]

    def run(self, run_id: int) -> dict:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise LabError(f"no run {run_id} in {self.path} (see lab runs)")
        return dict(row)
