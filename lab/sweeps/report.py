"""A sweep on the terminal: progress, the result table, the list of sweeps, CSV. User text is printed as
text, never as markup (rich.text.Text, escaped progress descriptions)."""

from __future__ import annotations

import csv
import json
import sys
import time
from typing import IO, Iterable

from rich.markup import escape
from rich.table import Table

from lab import runner
from lab.report import text
from lab.sweeps.run import Stage, SweepFinished, SweepStarted
from lab.sweeps.stats import OUTCOMES


def drive(events: Iterable, quiet: bool) -> SweepFinished | None:
    """Consume a sweep's events: on a terminal a bar of conditions done and one of the current condition's
    trials; without one a line per condition on stderr; nothing when quiet. Returns SweepFinished."""
    from lab.report import progress_bar

    bar = None if quiet or not sys.stderr.isatty() else progress_bar()
    final = conditions = trials = None
    if bar is not None:
        bar.start()
        conditions = bar.add_task("conditions", total=None)
        trials = bar.add_task("", total=None, visible=False)
    try:
        for event in events:
            if isinstance(event, SweepStarted) and bar is not None:
                bar.update(conditions, total=event.total)
            elif isinstance(event, Stage):
                _stage(event, bar, conditions, quiet)
            elif isinstance(event, runner.Started) and bar is not None:
                bar.update(trials, total=event.total, completed=event.skipped, description=escape(event.plan),
                           visible=True)
            elif isinstance(event, runner.Progress) and bar is not None:
                bar.update(trials, completed=event.done)
            elif isinstance(event, SweepFinished):
                final = event
                if bar is not None and event.status == "done":
                    bar.update(conditions, completed=bar.tasks[conditions].total)
    finally:
        if bar is not None:
            bar.stop()
    return final


def _stage(stage: Stage, bar, task, quiet: bool) -> None:
    where = "" if stage.position is None else f"{stage.position + 1}/{stage.total} "
    text = f"{where}{stage.label}" + (" (done already)" if stage.skipped else "")
    if bar is not None:
        bar.update(task, description=escape(text), **({} if stage.position is None else {"completed": stage.position}))
    elif not quiet:
        print(f"sweep: {text}", file=sys.stderr)


def _pct(figure: float) -> str:
    return f"{100 * figure:.1f} %"


def sweep_table(result: dict) -> Table:
    """One row per condition (the base first): accuracy, 95 % interval and difference per probe."""
    rows = ([result["base"]] if result["base"] else []) + result["conditions"]
    probes = [p for p in OUTCOMES if any(p in row for row in rows)]
    marked = any(starred(row, row[probe]) for row in rows for probe in probes if row.get(probe))
    table = Table(title=text(f"sweep {result['sweep']}: {result['name']} ({result['status']})"), title_justify="left",
                  caption=text("* the 95 % interval excludes the base's accuracy") if marked else None)
    table.add_column(text("condition"), no_wrap=True)
    table.add_column(text("value"), no_wrap=True)
    for probe in probes:
        table.add_column(text(f"{probe} (95 % CI)"), justify="right")
        table.add_column(text("vs base"), justify="right", no_wrap=True)
    for row in rows:
        cells = [condition_label(row), "" if row["value"] is None else json.dumps(row["value"])]
        for probe in probes:
            figures = row.get(probe)
            cells += [_accuracy(figures), difference(row, figures)] if figures else ["", ""]
        table.add_row(*(text(cell) for cell in cells))
    return table


def condition_label(row: dict) -> str:
    """A condition's label, and its run's status where that run did not finish: its figures cover part of its
    trials (the first lengths)."""
    return row["label"] if row.get("status", "done") == "done" else f"{row['label']} ({row['status']}, partial)"


def _accuracy(figures: dict) -> str:
    low, high = figures["ci95"]
    return f"{_pct(figures['accuracy'])} ({100 * low:.0f}-{100 * high:.0f})"


def starred(row: dict, figures: dict) -> bool:
    """Whether the interval excludes the base's accuracy, for a finished run (a partial one is not compared)."""
    return bool(figures.get("excludes_base")) and row.get("status", "done") == "done"


def difference(row: dict, figures: dict) -> str:
    """The difference to the base, * where starred."""
    delta = figures.get("delta")
    return "" if delta is None else f"{100 * delta:+.1f} pp" + (" *" if starred(row, figures) else "")


def sweeps_table(sweeps: list[dict], path) -> Table:
    table = Table(title=text(f"sweeps in {path}"), title_justify="left")
    for header in ("id", "name", "model", "axis", "status", "conditions", "started"):
        table.add_column(text(header), justify="right" if header in ("id", "conditions") else "left")
    for sweep in sweeps:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(sweep["started"]))
        table.add_row(*(text(str(cell)) for cell in (sweep["id"], sweep["name"], sweep["model"], sweep["axis"],
                                                     sweep["status"], f"{sweep['linked']}/{sweep['conditions']}",
                                                     started)))
    return table


def write_csv(result: dict, out: IO[str]) -> None:
    """One row per condition, the base first: label, value, run, plan and per probe accuracy, interval,
    difference to the base, whether the interval excludes it, trials."""
    rows = ([result["base"]] if result["base"] else []) + result["conditions"]
    columns = ["label", "value", "control", "run", "status", "plan"]
    for probe in OUTCOMES:
        columns += [f"{probe}_{k}" for k in ("accuracy", "ci95_low", "ci95_high", "delta", "excludes_base", "trials")]
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        line = {"label": row["label"], "value": "" if row["value"] is None else json.dumps(row["value"]),
                "control": row["control"], "run": row["run"], "status": row["status"], "plan": json.dumps(row["plan"])}
        for probe in OUTCOMES:
            if probe in row:
                figures = row[probe]
                line.update({f"{probe}_accuracy": figures["accuracy"], f"{probe}_ci95_low": figures["ci95"][0],
                             f"{probe}_ci95_high": figures["ci95"][1], f"{probe}_delta": figures.get("delta", ""),
                             f"{probe}_excludes_base": figures.get("excludes_base", ""),
                             f"{probe}_trials": figures["trials"]})
        writer.writerow(line)
