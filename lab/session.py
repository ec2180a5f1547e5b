"""A model session: one loaded model and the one job that may use it at a time.

Every job (a probe run, head scoring, calibration, later a sweep condition) claims the session first.
A claim while another job runs is refused (Busy), never run alongside: two jobs would stack hooks on
one model and undo each other's weight edits. The claim is taken where the job is asked for (the
console's key press, the CLI command), so a second request is refused at once, before any thread starts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

from lab import runner
from lab.errors import LabError
from lab.models import Loaded, ModelSpec, load
from lab.presets import Preset
from lab.store import Store


class Busy(LabError):
    """Another job holds the session."""

    def __init__(self, running: str):
        super().__init__(f"{running} is running; cancel it first")
        self.running = running


@dataclass
class Job:
    """A claim on the session: its name, its cancel flag and its progress (done, total)."""

    name: str
    session: Session
    cancel: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    total: int = 0

    def release(self) -> None:
        self.session._release(self)

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Session:
    """Owns one loaded model; every job on it goes through claim()."""

    def __init__(self, loaded: Loaded):
        if loaded.device.type == "meta":
            raise LabError("a model on the meta device has no weights to run: use it with lab inspect only")
        self.loaded = loaded
        self._lock = threading.Lock()
        self._job: Job | None = None

    @classmethod
    def open(cls, spec: ModelSpec | str) -> Session:
        return cls(load(spec))

    @property
    def job(self) -> Job | None:
        """The job running now, if any."""
        return self._job

    def claim(self, name: str) -> Job:
        """Take the session for a job, or raise Busy naming the job that has it."""
        with self._lock:
            if self._job is not None:
                raise Busy(self._job.name)
            self._job = Job(name, self)
            return self._job

    def _release(self, job: Job) -> None:
        with self._lock:
            if self._job is job:
                self._job = None

    def cancel(self) -> Job | None:
        """Ask the running job to stop after its current batch; returns it (None if nothing runs)."""
        job = self._job
        if job is not None:
            job.cancel.set()
        return job

    def run(self, preset: Preset, store: Store, job: Job) -> Iterator[runner.Event]:
        """Run a preset's probes on this session's model as `job` (claimed by the caller, released here
        when the run ends, fails or is closed)."""
        if job.session is not self or self._job is not job:
            raise LabError(f"job {job.name!r} does not hold this session")
        with job:
            for event in runner.run(preset, store, self.loaded, job.cancel):
                if isinstance(event, (runner.Started, runner.Progress)):
                    job.total = event.total
                    job.done = event.skipped if isinstance(event, runner.Started) else event.done
                yield event
