"""Sweeps as detached processes: `lab sweep` started in a session of its own, so that it outlives the
console that started it and a dropped SSH link, and found again by a console opened later.

Each launch leaves three files in the `sweeps` folder beside the results database: the preset
(`<name>.toml`), the process's output (`<name>.log`) and a pid file (`<name>.json`) that says which
process runs which sweep (the sweep's fingerprint, so that its row in the database can be found).
A pid file whose process has ended is removed, with its preset, by the next look for running sweeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from lab import presets
from lab.errors import LabError
from lab.models import ModelSpec
from lab.store import Store
from lab.sweeps.axes import Options
from lab.sweeps.run import fingerprint

_CHILDREN: dict[int, subprocess.Popen] = {}  # processes this one started: polled, so that none stays a zombie


@dataclass(frozen=True)
class Detached:
    """A sweep running in its own process: which process, which sweep, where its files are."""

    pid: int
    model: str
    fingerprint: str  # the sweep's (lab.sweeps.run.fingerprint): its row in the database
    title: str  # what it sweeps, in words ("heads of layer 2")
    preset: str  # the preset file the process runs; its path is on the process's command line
    log: str
    started: float
    host: str  # pids mean something on this machine only (a data folder may be shared between hosts)

    @property
    def pid_file(self) -> Path:
        return Path(self.preset).with_suffix(".json")


def folder(db: str | Path) -> Path:
    """Where detached sweeps keep their files: `sweeps/` beside the results database."""
    return Path(db).expanduser().absolute().parent / "sweeps"


def command(preset_path: Path, options: Options, db: str | Path, model: ModelSpec) -> list[str]:
    """The `lab sweep` command line of a sweep; remote code and pickles only as the console's model allows."""
    argv = [sys.executable, "-m", "lab", "sweep", str(preset_path), "--over", options.axis]
    for flag, values in (("--layers", options.layers), ("--values", options.values)):
        if values is not None:
            argv += [flag, ",".join(f"{v:g}" for v in values)]
    for flag, value in (("--metric", options.metric), ("--score", options.score)):
        if value is not None:
            argv += [flag, value]
    argv += ["--controls", str(options.controls), "--seed", str(options.seed), "--db", str(db)]
    return argv + ["--trust-remote-code"] * model.trust_remote_code + ["--allow-pickle"] * model.allow_pickle


def launch(preset: presets.Preset, options: Options, db: str | Path, title: str) -> Detached:
    """Write the preset, start `lab sweep` on it in a new session (output to the log) and write the pid file."""
    options = options.validate()
    db, where = Path(db).expanduser().absolute(), folder(db)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    preset_path, log = where / f"{name}.toml", where / f"{name}.log"
    try:
        where.mkdir(parents=True, exist_ok=True)
        presets.save(preset, preset_path)
        # the preset as `lab sweep` will read it, so that the fingerprint is the one its sweep row gets
        read = presets.load(str(preset_path)).with_model(preset.model.name, preset.model.trust_remote_code,
                                                         preset.model.allow_pickle)
        with open(log, "wb") as out:
            process = subprocess.Popen(command(preset_path, options, db, preset.model), stdin=subprocess.DEVNULL,
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as error:
        raise LabError(f"cannot start the sweep in {where}: {error.strerror or error}") from None
    _CHILDREN[process.pid] = process
    detached = Detached(process.pid, preset.model.name, fingerprint(read, options), title, str(preset_path), str(log),
                        time.time(), socket.gethostname())
    try:
        _write(detached)
    except LabError:
        cancel(detached)  # a sweep no console could find again would hold the GPU unseen
        raise
    return detached


def _write(detached: Detached) -> None:
    """The pid file, written whole or not at all (a reader never sees half of it)."""
    partial = detached.pid_file.with_suffix(".partial")
    try:
        partial.write_text(json.dumps(asdict(detached)))
        os.replace(partial, detached.pid_file)
    except OSError as error:
        raise LabError(f"cannot write {detached.pid_file}: {error.strerror or error}") from None


def alive(detached: Detached) -> bool:
    """Whether the sweep's process still runs (and is that sweep: a reused pid runs something else)."""
    child = _CHILDREN.get(detached.pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(detached.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: not ours
        return False
    cmdline = Path(f"/proc/{detached.pid}/cmdline")
    try:
        return detached.preset.encode() in cmdline.read_bytes().split(b"\0")
    except FileNotFoundError:
        return not cmdline.parent.parent.exists()  # no /proc (macOS): the pid's being there must do
    except OSError:
        return False


def running(db: str | Path, model: str | None = None) -> list[Detached]:
    """The detached sweeps on this database that still run on this machine (of `model` only, if given), oldest
    first; pid files of ended ones are removed with their presets (their logs stay)."""
    found = []
    for pid_file in folder(db).glob("*.json"):
        try:
            detached = Detached(**json.loads(pid_file.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # not a pid file of this lab
        if detached.host != socket.gethostname():
            continue  # another machine's: only it can tell whether the process runs
        if not alive(detached):
            forget(detached)
        elif model in (None, detached.model):
            found.append(detached)
    return sorted(found, key=lambda d: d.started)


def forget(detached: Detached) -> None:
    """Remove an ended sweep's pid file and preset (the database has the preset; the log stays)."""
    for path in (detached.pid_file, Path(detached.preset)):
        path.unlink(missing_ok=True)
    _CHILDREN.pop(detached.pid, None)


def cancel(detached: Detached) -> bool:
    """SIGTERM to the sweep's process group (lab stops as on Ctrl-C: finished trials stay); False if it ended."""
    if not alive(detached):
        return False
    try:
        os.killpg(detached.pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True


def sweep_row(store: Store, detached: Detached) -> dict | None:
    """The sweep's row in the database (None until the process has opened it)."""
    return next((s for s in store.sweeps() if s["fingerprint"] == detached.fingerprint), None)


def last_line(detached: Detached) -> str:
    """The last line of the process's output: why it stopped, when it failed."""
    try:
        with open(detached.log, "rb") as log:
            log.seek(max(0, os.path.getsize(detached.log) - 4096))
            lines = log.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""
