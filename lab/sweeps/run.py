"""Run a sweep through the session: the base condition first, then every condition as a run of its own,
linked to the sweep. A finished condition (a done run with the same fingerprint) is not run again, and the
runner resumes an unfinished one trial by trial; the same preset, axis and options resume the sweep's row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Generator, Iterator

from lab import runner
from lab.errors import LabError
from lab.presets import Preset
from lab.probes.heads import HeadsSpec, ranking, scores
from lab.session import Session
from lab.store import Store
from lab.summary import summarize
from lab.sweeps.axes import Options, conditions
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


def fingerprint(preset: Preset, options: Options) -> str:
    """Identity of a sweep: what its preset's results depend on, and its axis and options."""
    data = {"preset": preset.fingerprint(), "options": options.to_dict()}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run(preset: Preset, options: Options, session: Session, store: Store) -> Iterator[Event]:
    """Run the sweep's conditions one by one through the session; yields SweepStarted, then per condition a
    Stage and the runner's events, then SweepFinished with the result (see result())."""
    options = options.validate()
    probed = replace(preset, heads=None)  # a [heads] table scores heads for keep-top; conditions run the rest
    if not probed.probes:
        raise LabError("a sweep needs a [needle] or [mmlu] table in the preset to measure each condition")
    extra = {}
    ranked = None
    if options.axis == "keep-top":
        scoring = Preset(name=f"{preset.model.name}: head scores", model=preset.model,
                         heads=preset.heads or HeadsSpec())
        scores_run, status = yield from _run_once(scoring, Stage(None, 0, "head scores", False), session, store)
        if status != "done":
            raise LabError(f"head scoring run {scores_run} was {status}; run the sweep again to resume it")
        ranked = ranking(scores(summarize(store.trials(scores_run))["heads"]), options.score or "retrieval")
        extra = {"scores_run": scores_run}
    found = conditions(options, session.loaded.anatomy, preset.plan, ranked)
    sweep_id = store.open_sweep(fingerprint(preset, options), f"{preset.name}: {options.axis}", preset.model.name,
                                options.axis, {**options.to_dict(), **extra}, preset.to_toml(), len(found))
    yield SweepStarted(sweep_id, len(found))
    status = "failed"
    try:
        for position, condition in enumerate(found):
            stage = Stage(position, len(found), condition.label, False)
            named = replace(probed, name=f"{preset.name} · {options.axis}: {condition.label}", plan=condition.plan)

            def link(run_id, condition=condition, position=position):
                store.link_run(sweep_id, position, run_id, condition.label, condition.value, condition.control)

            _, status = yield from _run_once(named, stage, session, store, link)
            if status != "done":
                break
    except KeyboardInterrupt:
        status = "cancelled"
        raise
    finally:
        store.finish_sweep(sweep_id, status)
    yield SweepFinished(sweep_id, status, result(store, sweep_id))


def _run_once(preset: Preset, stage: Stage, session: Session, store: Store,
              link=lambda run_id: None) -> Generator[Event, None, tuple[int, str]]:
    """Run `preset` unless a finished run of it is stored; returns (run id, status). `link(run_id)` is called
    as soon as the run has an id, so a condition cut short is linked too."""
    stored = store.run_by_fingerprint(preset.fingerprint())
    if stored is not None and stored["status"] == "done":
        yield replace(stage, skipped=True)
        link(stored["id"])
        return stored["id"], "done"
    yield stage
    final = None
    with session.claim(f"a sweep ({stage.label})") as job:
        for event in session.run(preset, store, job):
            if isinstance(event, runner.Started):
                link(event.run_id)
            elif isinstance(event, runner.Finished):
                final = event
            yield event
    return final.run_id, final.status


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
