"""Run a sweep: the base condition first, then every condition as a run of its own, linked to the sweep. A
finished condition (a done run with the same fingerprint) is not run again, and an unfinished one resumes
trial by trial; the same preset, axis and options resume the sweep's row.

The conditions' runs are carried out by an Execute: one after another through the session (in_session, the
default), or spread over torch.distributed workers (lab.sweeps.distributed).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from typing import Callable, Generator, Iterator

from lab import runner
from lab.errors import LabError
from lab.presets import Preset
from lab.probes.heads import HeadsSpec, ranking, scores
from lab.session import Session
from lab.store import Store
from lab.summary import summarize
from lab.sweeps.axes import Condition, Options, conditions
from lab.sweeps.stats import OUTCOMES, accuracy, compared


@dataclass
class SweepStarted:
    sweep_id: int
    total: int  # conditions, the base included


@dataclass
class Stage:
    """A condition begins (position 0 is the base), or the head scores keep-top needs (position None)."""

    position: int | None
    total: int
    label: str
    skipped: bool  # a finished run of it is stored already


@dataclass
class SweepFinished:
    sweep_id: int
    status: str  # done | cancelled
    result: dict


Event = SweepStarted | Stage | runner.Event | SweepFinished


@dataclass
class Job:
    """One run a sweep needs: its stage, its preset, and link(run_id), called as soon as the run has an id."""

    stage: Stage
    preset: Preset
    link: Callable[[int], None]


# runs the jobs in order, yielding a Stage and the runner's events per job; returns done, cancelled or failed
Execute = Callable[[list[Job], Store], Generator[Event, None, str]]


def in_session(session: Session) -> Execute:
    """Run the jobs one by one through the session; stop at the first that does not finish."""
    def execute(jobs: list[Job], store: Store) -> Generator[Event, None, str]:
        for job in jobs:
            status = yield from _run_once(job, session, store)
            if status != "done":
                return status
        return "done"

    return execute


class Clock:
    """Times a sweep's work (SweepStarted to SweepFinished, the model already loaded) and counts the trials it
    ran (skipped ones not counted): the throughput `lab sweep` prints, to compare --nproc 1 and N."""

    def __init__(self):
        self.started = self.seconds = self.scoring = None
        self.trials = 0

    def watch(self, events: Iterator[Event]) -> Iterator[Event]:
        for event in events:
            if isinstance(event, Stage) and event.position is None:  # keep-top's head scores come first
                self.scoring = time.monotonic()
            elif isinstance(event, SweepStarted):
                self.started = time.monotonic()
                if self.scoring is not None:
                    self.scoring = self.started - self.scoring
            elif isinstance(event, runner.Started):
                self.trials += event.total - event.skipped
            elif isinstance(event, SweepFinished):
                self.seconds = time.monotonic() - self.started
            yield event

    def line(self, replicas: int) -> str:
        rate = f" ({self.trials / self.seconds:.2f} trials/s)" if self.seconds else ""
        scoring = f", after {self.scoring:.1f} s of head scoring" if self.scoring is not None else ""
        return (f"{self.trials} trials in {self.seconds:.1f} s on {replicas} replica{'s' if replicas > 1 else ''}"
                f"{rate}{scoring}")


def fingerprint(preset: Preset, options: Options) -> str:
    """Identity of a sweep: what its preset's results depend on, and its axis and options."""
    data = {"preset": preset.fingerprint(), "options": options.to_dict()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run(preset: Preset, options: Options, session: Session, store: Store,
        execute: Execute | None = None) -> Iterator[Event]:
    """Run the sweep's conditions (by default one by one through the session); yields SweepStarted, then per
    condition a Stage and the runner's events, then SweepFinished with the result (see result())."""
    execute = execute or in_session(session)
    options = options.validate()
    probed = replace(preset, heads=None)  # a [heads] table scores heads for keep-top; conditions run the rest
    if not probed.probes:
        raise LabError("a sweep needs a [needle] or [mmlu] table in the preset to measure each condition")
    extra = {}
    ranked = None
    if options.axis == "keep-top":
        scoring = Preset(name=f"{preset.model.name}: head scores", model=preset.model,
                         heads=preset.heads or HeadsSpec())
        scored = []
        status = yield from execute([Job(Stage(None, 0, "head scores", False), scoring, scored.append)], store)
        if status != "done":
            raise LabError(f"head scoring run {scored[-1]} was {status}; run the sweep again to resume it")
        ranked = ranking(scores(summarize(store.trials(scored[-1]))["heads"]), options.score or "retrieval")
        extra = {"scores_run": scored[-1]}
    found = conditions(options, session.loaded.anatomy, preset.plan, ranked)
    sweep_id = store.open_sweep(fingerprint(preset, options), f"{preset.name}: {options.axis}", preset.model.name,
                                options.axis, {**options.to_dict(), **extra}, preset.to_toml(), len(found))
    yield SweepStarted(sweep_id, len(found))

    def job(position: int, condition: Condition) -> Job:
        def link(run_id):
            store.link_run(sweep_id, position, run_id, condition.label, condition.value, condition.control)

        named = replace(probed, name=f"{preset.name} · {options.axis}: {condition.label}", plan=condition.plan)
        return Job(Stage(position, len(found), condition.label, False), named, link)

    status = "failed"
    try:
        status = yield from execute([job(position, condition) for position, condition in enumerate(found)], store)
    except KeyboardInterrupt:
        status = "cancelled"
        raise
    finally:
        store.finish_sweep(sweep_id, status)
    yield SweepFinished(sweep_id, status, result(store, sweep_id))


def stored_done(job: Job, store: Store) -> int | None:
    """The id of a finished run of the job's preset, if one is stored (it is not run again)."""
    stored = store.run_by_fingerprint(job.preset.fingerprint())
    return stored["id"] if stored is not None and stored["status"] == "done" else None


def _run_once(job: Job, session: Session, store: Store) -> Generator[Event, None, str]:
    """Run the job's preset through the session unless a finished run of it is stored; returns its status."""
    stored = stored_done(job, store)
    if stored is not None:
        yield replace(job.stage, skipped=True)
        job.link(stored)
        return "done"
    yield job.stage
    final = None
    with session.claim(f"a sweep ({job.stage.label})") as claimed:
        for event in session.run(job.preset, store, claimed):
            if isinstance(event, runner.Started):
                job.link(event.run_id)
            elif isinstance(event, runner.Finished):
                final = event
            yield event
    return final.status


def result(store: Store, sweep_id: int) -> dict:
    """The sweep's conditions with accuracy per probe, its 95 % Wilson interval and, against the base, the
    difference and whether the interval excludes the base's accuracy."""
    sweep = store.sweep(sweep_id)
    described = [_described(store, link) for link in sweep["runs"]]
    base = described.pop(0) if sweep["runs"] and sweep["runs"][0]["position"] == 0 else None
    for condition in described:
        for probe in OUTCOMES:
            if probe in condition:
                condition[probe] = compared(condition[probe], (base or {}).get(probe))
    return {"sweep": sweep_id, "name": sweep["name"], "model": sweep["model"], "axis": sweep["axis"],
            "status": sweep["status"], "options": sweep["options"], "base": base, "conditions": described}


def _described(store: Store, link: dict) -> dict:
    figures = {probe: accuracy(store.trials(link["run_id"], probe), probe) for probe in OUTCOMES}
    return {"label": link["label"], "value": link["value"], "control": link["control"], "run": link["run_id"],
            "status": link["status"], "plan": link["plan"], **{p: f for p, f in figures.items() if f is not None}}
