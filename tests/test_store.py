"""The results database: one-line errors, read-only commands, schema versions, races, signals, markup."""

import io
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from lab import cli, report
from lab.cli import main
from lab.errors import LabError
from lab.store import SCHEMA_VERSION, Store

from conftest import DEMO_PRESET, tiny

ROOT = Path(__file__).resolve().parent.parent

PRESET = DEMO_PRESET

# the tables as lab wrote them before the schema was versioned (user_version 0)
VERSION_0 = """
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, fingerprint TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
    model TEXT NOT NULL, plan TEXT NOT NULL, preset TEXT NOT NULL, versions TEXT NOT NULL, started REAL NOT NULL,
    finished REAL, status TEXT NOT NULL DEFAULT 'running');
CREATE TABLE trials (run_id INTEGER NOT NULL REFERENCES runs(id), probe TEXT NOT NULL, key TEXT NOT NULL,
    data TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (run_id, probe, key));
INSERT INTO runs (fingerprint, name, model, plan, preset, versions, started) VALUES ('f', 'old run', 'toy', '{}', '',
    '{}', 0);
"""


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("lab: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def open_demo_run(store: Store, fingerprint: str = "f1", name: str = "demo") -> int:
    return store.open_run(fingerprint, name, "random:jamba", {}, "", {})


def lab_db(path: Path, runs: int = 1) -> Path:
    with Store(path) as store:
        for i in range(runs):
            run_id = open_demo_run(store, f"f{i}", f"run {i}")
            store.add_trials(run_id, "needle", [{"key": "k0", "length": 300, "depth": 0, "exact": 1.0, "score": 1.0}])
            store.finish_run(run_id, "done")
    return path


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def preset_file(tmp_path: Path) -> str:
    path = tmp_path / "p.toml"
    path.write_text(PRESET)
    return str(path)


# 1. read-only files and folders, full disks: one line naming the file, never a run left `running`

def make_read_only(monkeypatch) -> None:
    """From now on every connection can read but not write, as on a read-only file."""
    connect = sqlite3.connect

    def read_only_connect(*args, **kwargs):
        db = connect(*args, **kwargs)
        db.execute("PRAGMA query_only = ON")
        return db

    monkeypatch.setattr(sqlite3, "connect", read_only_connect)


def test_read_only_database_is_one_line(tmp_path, capsys, monkeypatch):
    db = lab_db(tmp_path / "r.sqlite")
    make_read_only(monkeypatch)
    assert main(["run", preset_file(tmp_path), "--db", str(db)]) == 2
    err = one_line_error(capsys)
    assert str(db) in err and "readonly" in err
    monkeypatch.undo()
    with Store(db, readonly=True) as store:
        assert [run["status"] for run in store.runs()] == ["done"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
@pytest.mark.parametrize("read_only", ["file", "folder"])
def test_read_only_file_or_folder_is_one_line(tmp_path, capsys, read_only):
    db = lab_db(tmp_path / "data" / "r.sqlite")
    (db if read_only == "file" else db.parent).chmod(0o555 if read_only == "folder" else 0o444)
    try:
        assert main(["run", preset_file(tmp_path), "--db", str(db)]) == 2
        assert str(db) in one_line_error(capsys)
        assert main(["runs", "--db", str(db), "--json"]) == 0  # reading still works (WAL file: no -shm yet)
        assert '"run 0"' in capsys.readouterr().out
    finally:
        db.parent.chmod(0o755)
        db.chmod(0o644)


def test_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    db = tmp_path / "file" / "r.sqlite"
    assert main(["run", preset_file(tmp_path), "--db", str(db)]) == 2
    assert str(db) in one_line_error(capsys)


def test_full_disk_is_one_line_and_the_run_can_still_be_marked(tmp_path):
    store = Store(tmp_path / "r.sqlite")
    run_id = open_demo_run(store)
    store.db.execute("PRAGMA max_page_count = 1")  # never below the current size: the file cannot grow
    rows = [{"key": f"k{i}", "output": "x" * 100} for i in range(100)]
    with pytest.raises(LabError, match=f"cannot write to the results database {re.escape(str(store.path))}: "
                                       "database or disk is full"):
        store.add_trials(run_id, "needle", rows)
    store.finish_run(run_id, "failed")  # what the runner's `finally` does: an update in place still fits
    assert store.run(run_id)["status"] == "failed" and store.trials(run_id) == []


def test_finish_run_does_not_hide_the_error_in_flight(tmp_path):
    store = Store(lab_db(tmp_path / "r.sqlite", runs=0))
    run_id = open_demo_run(store)
    store.db.execute("PRAGMA busy_timeout = 0")
    other = raw(store.path)
    other.execute("BEGIN EXCLUSIVE")  # another writer holds the file: finish_run cannot write
    with pytest.raises(LabError, match="first"):
        try:
            raise LabError("first")
        finally:
            store.finish_run(run_id, "failed")
    with pytest.raises(LabError, match=f"{store.path}.*locked"):  # with nothing in flight it does raise
        store.finish_run(run_id, "failed")
    other.execute("ROLLBACK")


# 2. SIGTERM and SIGHUP cancel a run as Ctrl-C does

def start_a_run(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """`lab run` of a 60-trial toy preset in a child process, returned once its first trial is written."""
    db = tmp_path / "r.sqlite"
    preset = tmp_path / "toy.toml"
    preset.write_text('name = "toy"\n[model]\nname = "toy-recurrentgemma"\n[needle]\ntask = "passkey"\n'
                      "lengths = [256, 512]\ndepths = [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]\ntrials = 3\n"
                      "max_new_tokens = 8\nbatch_size = 1\n")
    stderr = tmp_path / "stderr.txt"
    env = {**os.environ, "LAB_DB": str(db), "HF_HUB_OFFLINE": "1"}
    with stderr.open("w") as err:
        child = subprocess.Popen([sys.executable, "-m", "lab", "run", str(preset)], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=err)
    for _ in range(3000):  # poll for the first trial (bounded: the run has 60 batches)
        if child.poll() is not None or _trial_rows(db):
            break
        time.sleep(0.05)
    if child.poll() is not None or not _trial_rows(db):
        child.kill()
        pytest.fail("the run ended before a trial was written")
    return child, db, stderr


def test_sigterm_cancels_the_run(tmp_path):
    child, db, stderr = start_a_run(tmp_path)
    try:
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=120)
    finally:
        child.kill()
    assert code in (130, 143)
    assert "Traceback" not in stderr.read_text()
    with Store(db, readonly=True) as store:
        [run] = store.runs()
    assert run["status"] == "cancelled" and 0 < run["trials"] < 60


def test_a_killed_run_is_listed_as_interrupted(tmp_path):
    """Nothing can mark a run whose process is killed (or whose disk is full): lab runs tells by its pid."""
    child, db, _ = start_a_run(tmp_path)
    child.kill()
    child.wait()
    with Store(db, readonly=True) as store:
        [run] = store.runs()
    assert run["status"] == "interrupted" and run["pid"] == child.pid and 0 < run["trials"] < 60


def _trial_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:  # tables not made yet
        return 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signals_interrupt_and_are_restored(signum):
    before = signal.getsignal(signum)
    with pytest.raises(KeyboardInterrupt), cli.signals_as_interrupts():
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the handler runs between bytecodes
            time.sleep(0.001)
    assert signal.getsignal(signum) is before


# 3. open_run: one row per fingerprint, whoever opens it at the same time

def test_open_run_has_no_race(tmp_path):
    path = lab_db(tmp_path / "r.sqlite", runs=0)
    stores = [Store(path), Store(path)]
    rounds = 200
    barrier = threading.Barrier(2)
    ids, errors = [[], []], []

    def opener(i):
        try:
            for n in range(rounds):
                barrier.wait()
                ids[i].append(open_demo_run(stores[i], f"fp{n}"))
                ids[i].append(open_demo_run(stores[i], "same"))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=opener, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and ids[0] == ids[1]
    assert len(stores[0].runs()) == rounds + 1


def test_a_run_another_live_process_computes_is_not_opened_twice(tmp_path):
    """Two `lab run`s of one preset on one file both computed the whole run; a run whose process is gone resumes."""
    with Store(tmp_path / "r.sqlite") as store:
        run_id = open_demo_run(store)
        store.db.execute("UPDATE runs SET pid = ? WHERE id = ?", (os.getppid(), run_id))  # a live process, not us
        with pytest.raises(LabError, match=rf"run #{run_id} \(demo\) is running in process {os.getppid()} on this "
                                           "machine: wait for it, or stop it and run again to resume"):
            open_demo_run(store)
        store.db.execute("UPDATE runs SET pid = ? WHERE id = ?", (_dead_pid(), run_id))
        assert open_demo_run(store) == run_id


def test_resuming_a_run_takes_no_run_id():
    """SQLite's AUTOINCREMENT spent an id on every resumed run (an upsert), so run ids skipped numbers."""
    with Store(":memory:") as store:
        first = open_demo_run(store, "f1")
        store.finish_run(first, "cancelled")
        assert open_demo_run(store, "f1") == first
        assert open_demo_run(store, "f2") == first + 1


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# 4. read-only commands: never create, never convert, say what is wrong

@pytest.mark.parametrize("command", [["runs"], ["export", "1"]])
def test_missing_database_says_so_and_creates_nothing(tmp_path, capsys, command):
    db = tmp_path / "new" / "r.sqlite"
    assert main(command + ["--db", str(db)]) == 2
    assert f"no results database at {db} yet; lab run creates it" in one_line_error(capsys)
    assert not db.parent.exists()


@pytest.mark.parametrize("tables", [
    "CREATE TABLE notes (body TEXT);",
    "CREATE TABLE runs (run_uuid TEXT PRIMARY KEY, status TEXT);",  # an MLflow store has a `runs` table too
])
@pytest.mark.parametrize("command", [["runs"], ["export", "1"], ["run", "PRESET"]])
def test_another_applications_database_is_refused_untouched(tmp_path, capsys, tables, command):
    db = tmp_path / "other.sqlite"
    raw(db).executescript(tables)
    before = db.read_bytes()
    command = [preset_file(tmp_path) if word == "PRESET" else word for word in command]
    assert main(command + ["--db", str(db)]) == 2
    assert f"{db} is not a lab results database" in one_line_error(capsys)
    assert db.read_bytes() == before
    assert raw(db).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_an_empty_file_has_no_results_yet_and_lab_run_fills_it(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    db.write_bytes(b"")  # left by a run that failed before its first commit
    assert main(["runs", "--db", str(db)]) == 2
    assert f"no results in {db} yet" in one_line_error(capsys)
    assert db.read_bytes() == b""
    with Store(db) as store:
        assert store.runs() == []


def test_a_file_that_is_not_sqlite_is_refused(tmp_path, capsys):
    db = tmp_path / "notes.txt"
    db.write_text("not a database, but long enough to have a header that sqlite reads. " * 3)
    assert main(["runs", "--db", str(db)]) == 2
    assert f"{db} is not a lab results database" in one_line_error(capsys)


def test_read_only_commands_read_an_older_file_without_changing_it(tmp_path, capsys):
    db = tmp_path / "old.sqlite"
    raw(db).executescript(VERSION_0)
    before = db.read_bytes()
    assert main(["runs", "--db", str(db), "--json"]) == 0
    assert '"old run"' in capsys.readouterr().out
    assert main(["export", "1", "--db", str(db)]) == 0
    assert db.read_bytes() == before


# 5. schema versions

def test_new_files_get_the_current_version(tmp_path):
    db = lab_db(tmp_path / "r.sqlite")
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
    assert raw(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_an_older_file_is_migrated_when_opened_for_writing(tmp_path):
    db = tmp_path / "old.sqlite"
    raw(db).executescript(VERSION_0)
    with Store(db) as store:
        assert [run["name"] for run in store.runs()] == ["old run"]
        assert open_demo_run(store, "f") == 1  # the old run, resumed
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


@pytest.mark.parametrize("command", [["runs"], ["export", "1"], ["run", "PRESET"]])
def test_a_newer_version_is_refused(tmp_path, capsys, command):
    db = tmp_path / "new.sqlite"
    raw(db).executescript(VERSION_0 + f"PRAGMA user_version = {SCHEMA_VERSION + 1};")
    command = [preset_file(tmp_path) if word == "PRESET" else word for word in command]
    assert main(command + ["--db", str(db)]) == 2
    err = one_line_error(capsys)
    assert str(db) in err and f"version {SCHEMA_VERSION + 1}" in err
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


# 6. --db before or after the command

@pytest.mark.parametrize("where", ["before", "after"])
def test_db_option_before_or_after_the_command(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setenv("LAB_DB", str(tmp_path / "elsewhere.sqlite"))
    db = str(lab_db(tmp_path / "r.sqlite", runs=2))
    for command in (["runs", "--json"], ["export", "2", "--format", "json"]):
        argv = ["--db", db] + command if where == "before" else command + ["--db", db]
        assert main(argv) == 0, capsys.readouterr().err
        assert "run 1" in capsys.readouterr().out
    assert cli.build_parser().parse_args(["--db", db, "run", "p.toml"]).db == db
    assert not (tmp_path / "elsewhere.sqlite").exists()


# 7. run ids sqlite cannot hold

@pytest.mark.parametrize("run_id", ["99999999999999999999999", "-99999999999999999999999"])
def test_export_of_a_huge_run_id_is_one_line(tmp_path, capsys, run_id):
    db = str(lab_db(tmp_path / "r.sqlite"))
    assert main(["export", run_id, "--db", db]) == 2
    assert f"no run {run_id}" in one_line_error(capsys)


# 8. user text is printed as text, never as markup

MARKUP = "ablation [/oops] v2 [bold]"


def test_runs_table_prints_names_models_and_paths_as_text(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    db = tmp_path / "a[/oops]" / "r.sqlite"
    with Store(db) as store:
        store.open_run("f", MARKUP, f"/models/{MARKUP}", {}, "", {})
    assert main(["--db", str(db), "runs"]) == 0
    out = capsys.readouterr().out
    assert MARKUP in out and f"/models/{MARKUP}" in out and str(db) in out
    for name in ("id", "name", "model", "status", "trials", "started"):
        assert name in out


def test_runs_keeps_the_status_beside_a_long_plan(tmp_path, capsys, monkeypatch):
    """rich wraps a long plan, so it is not counted whole when columns are dropped to fit: at 100 columns a
    63-character plan left the status out (a review)."""
    monkeypatch.setenv("COLUMNS", "100")
    plan = {"off": [{"kind": "attention", "layers": [0, 1, 2, 3]}, {"kind": "mlp", "layers": [1, 2, 3, 4]}],
            "heads_off": [[0, 1], [1, 2]], "sparsify": {"k": 2, "metric": "l2"},
            "needle_attention": {"generation": "omit", "prefill": "keep"}}
    with Store(tmp_path / "r.sqlite") as store:
        store.open_run("f", "long", "random:jamba", plan, "", {})
    assert main(["--db", str(tmp_path / "r.sqlite"), "runs"]) == 0
    out = capsys.readouterr().out
    assert "status" in out and "running" in out


def _render(*tables) -> str:
    console = Console(file=io.StringIO(), width=250, color_system=None)
    for table in tables:
        console.print(table)
    return console.file.getvalue()


def test_every_table_prints_user_text_as_text():
    jamba = tiny("jamba")
    loaded = SimpleNamespace(spec=SimpleNamespace(name=MARKUP), anatomy=jamba.anatomy, num_params=1e6)
    assert MARKUP in _render(report.anatomy_table(loaded))
    summary = {"needle": {"accuracy": 1.0, "score": 1.0, "trials": 1, "by_length": {MARKUP: 1.0}},
               "mmlu": {"accuracy": 0.5, "questions": 2, "by_category": {MARKUP: 0.5}}}
    assert _render(*report.summary_tables(summary)).count(MARKUP) == 2
    assert _render(report.heads_table([((0, 1), 0.5)], MARKUP, set(), 5)).count(MARKUP) == 2
    plan = {"batch": 1, "length": 8, "heads_off_overhead": 0, "heads_off_hooked_overhead": 0,
            "sparsify_overhead_vs_eager": 0, "sparsify_overhead_vs_default": 0}
    bench = {"model": MARKUP, "parameters": 1e6, "dtype": "float32", "device": MARKUP,
             "needle_grid": {"prompts": 1, "new_tokens": 1, "lab_s": 1, "reference_s": 1,
                             "reference_measured_prompts": 1, "speedup": 1},
             "mmlu": {"questions": 1, "lab_qps": 1, "per_choice_qps": 1, "speedup": 1},
             "plan_overhead": [plan], "prefill": {"batch": 1, "length": 8, "tokens_per_s": 1, "tflops": 1}}
    assert _render(*report.bench_tables(bench)).count(MARKUP) == 2


# 9. sweeps (schema version 2): a sweep links runs; a run can belong to several sweeps

VERSION_1 = VERSION_0 + "PRAGMA user_version = 1;"


def test_a_version_1_file_gains_the_sweep_tables_and_keeps_its_runs(tmp_path):
    db = tmp_path / "v1.sqlite"
    raw(db).executescript(VERSION_1)
    with Store(db, readonly=True) as store:
        assert store.sweeps() == []  # read-only: no tables made, no sweeps
        with pytest.raises(LabError, match="no sweep 1 in"):
            store.sweep(1)
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == 1
    with Store(db) as store:
        assert [run["name"] for run in store.runs()] == ["old run"]
        sweep_id = store.open_sweep("s", "sweep", "toy", "heads", {"axis": "heads"}, "", 2)
        store.link_run(sweep_id, 0, 1, "base", None, 0)
        assert store.sweep(sweep_id)["runs"][0]["run_id"] == 1
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_sweeps_resume_by_fingerprint_and_share_runs(tmp_path):
    with Store(lab_db(tmp_path / "r.sqlite", runs=2)) as store:
        first = store.open_sweep("a", "demo: heads", "random:jamba", "heads", {"controls": 0}, "preset", 2)
        second = store.open_sweep("b", "demo: k", "random:jamba", "k", {"values": [0]}, "preset", 2)
        for sweep_id in (first, second):
            store.link_run(sweep_id, 0, 1, "base", None, 0)  # the base run in both
        store.link_run(first, 1, 2, "L2.attn.h0", [2, 0], 0)
        store.finish_sweep(first, "cancelled")
        assert store.open_sweep("a", "demo: heads", "random:jamba", "heads", {}, "preset", 2) == first
        store.finish_sweep(first, "done")
        listed = {s["id"]: s for s in store.sweeps()}
        assert listed[first]["linked"] == 2 and listed[second]["linked"] == 1 and listed[first]["status"] == "done"
        runs = store.sweep(first)["runs"]
        assert [(r["position"], r["run_id"], r["label"], r["value"]) for r in runs] == [
            (0, 1, "base", None), (1, 2, "L2.attn.h0", [2, 0])]
        assert store.sweep(first)["options"] == {"controls": 0}
        assert store.run_by_fingerprint("f1")["id"] == 2 and store.run_by_fingerprint("nope") is None


def test_terminal_escapes_in_user_text_are_shown_not_sent(tmp_path, capsys, monkeypatch):
    """A preset name with ESC sequences once retitled and cleared the terminal through lab runs."""
    monkeypatch.setenv("COLUMNS", "250")
    db = tmp_path / "r.sqlite"
    with Store(db) as store:
        store.open_run("f", "ev\x1b]0;pwned\x07il\x1b[2J", "m", {}, "", {})
    assert main(["--db", str(db), "runs"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "ev\\x1b]0;pwned\\x07il\\x1b[2J" in out


# 10. a run whose process is gone (a full disk, a kill -9, a lost machine) is listed as interrupted

def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: no process has this id now
    return child.pid


def running_run(db: Path, pid: int, host: str | None = None) -> int:
    """A run left 'running' by process `pid` on `host` (this one by default)."""
    with Store(db) as store:
        run_id = open_demo_run(store)
        store.db.execute("UPDATE runs SET pid = ?, host = COALESCE(?, host) WHERE id = ?", (pid, host, run_id))
    return run_id


def test_a_running_run_whose_process_is_gone_lists_as_interrupted(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    db = tmp_path / "r.sqlite"
    run_id = running_run(db, dead_pid())
    assert main(["runs", "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "interrupted"
    assert main(["runs", "--db", str(db)]) == 0
    assert "interrupted" in capsys.readouterr().out
    with Store(db, readonly=True) as store:
        assert store.run(run_id)["status"] == "interrupted"
    assert raw(db).execute("SELECT status FROM runs").fetchone()[0] == "running"  # listing changes nothing


def test_a_running_run_whose_process_lives_stays_running(tmp_path):
    db = tmp_path / "r.sqlite"
    running_run(db, os.getpid())
    with Store(db, readonly=True) as store:
        assert [run["status"] for run in store.runs()] == ["running"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times from /proc (Linux)")
def test_a_process_that_took_a_crashed_runs_pid_does_not_hold_it(tmp_path):
    """A run left running by a crash, its process id since taken by an unrelated process (started after the run
    was claimed), is interrupted and resumes; while the process that claimed it lives, it stays running."""
    db = tmp_path / "r.sqlite"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_id = running_run(db, other.pid)
        raw(db).execute("UPDATE runs SET claimed = ? WHERE id = ?", (time.time() - 3600, run_id)).connection.commit()
        with Store(db) as store:
            assert store.run(run_id)["status"] == "interrupted"
            assert open_demo_run(store) == run_id  # resumed, not refused as running in process `other`
        running_run(db, other.pid)  # claimed now, by a process that started before: it is the one running it
        with Store(db) as store:
            assert store.run(run_id)["status"] == "running"
            with pytest.raises(LabError, match=f"is running in process {other.pid}"):
                open_demo_run(store)
    finally:
        other.kill()
        other.wait()


def test_another_hosts_running_run_stays_running(tmp_path):
    db = tmp_path / "r.sqlite"
    running_run(db, dead_pid(), host="another-host")  # its pid means nothing here
    with Store(db, readonly=True) as store:
        assert [run["status"] for run in store.runs()] == ["running"]


def test_an_interrupted_run_resumes_under_the_new_process(tmp_path):
    db = tmp_path / "r.sqlite"
    run_id = running_run(db, dead_pid())
    with Store(db) as store:
        assert open_demo_run(store) == run_id
        assert store.run(run_id)["status"] == "running" and store.run(run_id)["pid"] == os.getpid()
        store.finish_run(run_id, "done")
        assert store.run(run_id)["status"] == "done"


def test_a_version_2_file_keeps_its_runs_and_gains_pid_host_and_claim_time(tmp_path):
    db = tmp_path / "v2.sqlite"
    with Store(db) as store:
        open_demo_run(store)
    old = raw(db)
    old.executescript("".join(f"ALTER TABLE {table} DROP COLUMN {column};" for table in ("runs", "sweeps")
                              for column in ("pid", "host", "claimed")) + "PRAGMA user_version = 2;")  # as v2 wrote it
    old.close()
    with Store(db, readonly=True) as store:  # read-only: the old file as it is, no column added
        assert [(run["name"], run["status"]) for run in store.runs()] == [("demo", "running")]
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == 2
    with Store(db) as store:
        assert [(run["name"], run["status"], run["pid"], run["claimed"]) for run in store.runs()] == [
            ("demo", "running", None, None)]
    assert raw(db).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


def test_a_sweep_whose_process_is_gone_lists_as_interrupted(tmp_path):
    db = tmp_path / "r.sqlite"
    with Store(db) as store:
        gone = store.open_sweep("a", "demo: heads", "random:jamba", "heads", {}, "preset", 2)
        live = store.open_sweep("b", "demo: k", "random:jamba", "k", {}, "preset", 2)
        store.db.execute("UPDATE sweeps SET pid = ? WHERE id = ?", (dead_pid(), gone))
    with Store(db, readonly=True) as store:
        assert [s["status"] for s in store.sweeps()] == ["interrupted", "running"]
        assert store.sweep(gone)["status"] == "interrupted" and store.sweep(live)["status"] == "running"


def test_a_trial_row_changed_outside_lab_is_one_line(tmp_path, capsys):
    """A row whose JSON was damaged (an edit by hand, a bad copy) ended `lab runs` and `lab export` in a traceback."""
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        run_id = store.open_run("f", "t", "random:jamba", {}, "", {})
        store.add_trials(run_id, "needle", [{"key": "k", "exact": 1}])
    with sqlite3.connect(path) as db:
        db.execute("UPDATE trials SET data = '{bad'")
    for command in (["runs"], ["export", str(run_id)]):
        assert main([*command, "--db", str(path)]) != 0
        err = capsys.readouterr().err
        assert "a stored row is not valid JSON" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("columns", ["0", "1", "5"])
def test_lab_runs_prints_in_a_terminal_too_narrow_for_its_table(tmp_path, capsys, monkeypatch, columns):
    """$COLUMNS=5 ended in rich's "Sum of ratios must be > 0" traceback; 0 printed nothing."""
    path = tmp_path / "r.sqlite"
    with Store(path) as store:
        store.open_run("f", "t", "random:jamba", {}, "", {})
    monkeypatch.setenv("COLUMNS", columns)
    assert main(["runs", "--db", str(path)]) == 0
    assert "running" in capsys.readouterr().out  # the run's row
