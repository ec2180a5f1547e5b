"""The Sweep tab: a sweep started from the grid runs as a detached `lab sweep` process
(lab.sweeps.detach); this view follows it through the results database, read-only, on a timer, and
shows its progress, accuracy against the swept value and a table of its conditions. Each change of
the finished conditions is posted as SweepUpdated, so that the screen paints the grid's effect map."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from lab import presets
from lab.errors import LabError
from lab.models.anatomy import Anatomy
from lab.store import Store
from lab.sweeps import Options, detach, result
from lab.sweeps.axes import AXES, BLOCK_AXES
from lab.sweeps.report import condition_label, difference
from lab.tui.charts import fresh_plot, line_mark, y_axis
from lab.tui.effects import Curve, curve, legend, probe_of, thinned

POLL_S = 1.0  # how often a followed sweep's rows are read


@dataclass
class SweepUpdated(Message):
    """A shown sweep's finished conditions changed: its result (lab.sweeps.result)."""

    result: dict


@dataclass
class SweepEnded(Message):
    """The followed sweep's process ended: what became of it, in one line."""

    text: str
    done: bool


def grid_sweep(what: str, anatomy: Anatomy, layer: int, kind: str | None) -> tuple[Options, str]:
    """The sweep a grid key asks for at the cursor (layer, cell kind), as options and a title: the heads
    of an attention layer, k (with one random control per k) or each block of the cursor's kind; or, from
    the palette, a whole axis (keep-top with one random control per percentage)."""
    if what in AXES and what not in ("heads", "k"):
        return Options(what, controls=1 if what == "keep-top" else 0), f"sweep over {what}"
    if what == "heads":
        if anatomy.layers[layer].block("attention") is None:
            raise LabError(f"layer {layer} has no attention heads: sweep heads on an attention row")
        return Options("heads", layers=(layer,)), f"heads of layer {layer}"
    if what == "k":
        return Options("k", controls=1), "k, the heads kept per token (with random controls)"
    kind = "attention" if kind in ("head", None) else kind
    axis = next((axis for axis, block in BLOCK_AXES.items() if block == kind), None)
    if axis is None:
        raise LabError(f"no sweep over {kind} blocks (attention, ssm and mlp blocks can be swept)")
    return Options(axis), f"each {kind} block off alone"


class SweepChart(PlotextPlot):
    """Accuracy (%) against the swept value."""

    drawn: Curve | None = None

    def show(self, drawn: Curve | None) -> None:
        self.drawn = drawn
        plt = fresh_plot(self, drawn.title if drawn else "no sweep shown: start one from the grid (F1 lists the keys)")
        if drawn and drawn.lines:
            plt.xlabel(drawn.xlabel)
            top, ticks = y_axis(len(drawn.lines), self.size.height)
            plt.ylim(0, top)
            plt.yticks(ticks)
            width = self.size.width - 8 if self.size.width > 20 else 60  # less the y axis and frame; 60 unshown
            xs, labels = zip(*thinned(drawn.ticks, width))
            plt.xticks(list(xs), list(labels))
            for line, (name, line_xs, ys) in enumerate(drawn.lines):
                mark = line_mark(self.app, line, single=len(line_xs) == 1)
                if len(line_xs) == 1:  # a line of one point draws nothing
                    plt.scatter(line_xs, ys, label=name[:30], marker=mark)
                else:
                    plt.plot(line_xs, ys, label=name[:30], marker=mark)
        self.refresh()

    def on_resize(self) -> None:
        self.show(self.drawn)  # the ticks that fit the new width


class SweepView(Vertical):
    """Follows a detached sweep (follow) or shows a stored one (show); `following` is the running one."""

    DEFAULT_CSS = """
    SweepView #sweep-status { height: auto; max-height: 3; padding: 0 1; }
    SweepView #sweep-legend { height: 1; padding: 0 1; }
    SweepView SweepChart { height: 1fr; min-height: 8; }
    SweepView DataTable { height: 1fr; }
    """

    def __init__(self, db: str | Path, **kwargs):
        super().__init__(**kwargs)
        self.db = Path(db)
        self.following: detach.Detached | None = None
        self.sweep_id: int | None = None  # of the followed or shown sweep, once its row exists
        self._store: Store | None = None
        self._shown: tuple | None = None  # the followed sweep's status and its conditions' as last drawn

    def compose(self) -> ComposeResult:
        yield Static("no sweep shown", id="sweep-status", markup=False)
        yield Static(legend(), id="sweep-legend")
        yield SweepChart(id="sweep-chart")
        yield DataTable(id="sweep-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one(SweepChart).show(None)
        self.set_interval(POLL_S, self.poll)

    def on_unmount(self) -> None:
        if self._store is not None:
            self._store.close()

    @property
    def store(self) -> Store:
        """The results database, read-only (the sweep's own process is its writer)."""
        if self._store is None:
            self._store = Store(self.db, readonly=True)
        return self._store

    @property
    def running(self) -> bool:
        return self.following is not None and detach.alive(self.following)

    @property
    def busy_note(self) -> str:
        """What n, u, r and another sweep are told while the followed sweep runs."""
        return f"a sweep is running{f' (#{self.sweep_id})' if self.sweep_id else ''}: x cancels it"

    def launch(self, preset: presets.Preset, options: Options, title: str) -> None:
        """Start the sweep as a detached process and follow it."""
        self.follow(detach.launch(preset, options, self.db, title))

    def follow(self, detached: detach.Detached) -> None:
        self.following, self.sweep_id, self._shown = detached, None, None
        self._status(f"sweep starting in process {detached.pid}: {detached.title} (log: {detached.log})")
        self.poll()

    def attach(self, model: str) -> detach.Detached | None:
        """Follow a running detached sweep of `model` (started by an earlier console); returns it, or None
        when there is none or one of `model` is followed already. Another model's sweep is no longer followed."""
        if self.following is not None and self.following.model == model:
            return None
        self.stop_following()
        found = detach.running(self.db, model)
        if found:
            self.follow(found[-1])
        return found[-1] if found else None

    def stop_following(self) -> None:
        """Forget the followed sweep (it runs on); the view shows nothing."""
        self.following, self.sweep_id, self._shown = None, None, None
        self._draw(None)
        self._status("no sweep shown")

    def cancel(self) -> bool:
        """SIGTERM to the followed sweep's processes; False when none runs."""
        if self.following is None or not detach.cancel(self.following):
            return False
        which = f" #{self.sweep_id}" if self.sweep_id else ""
        self._status(f"cancelling the sweep{which}: its process stops after the current batch (finished trials stay)")
        return True

    def show(self, text: str) -> dict:
        """Show a stored sweep by its id (not followed); returns its result. LabError for a bad or unknown id."""
        if not text.strip().isdigit():
            raise LabError(f"{text.strip()!r} is not a sweep id (lab sweeps lists them)")
        sweep_id = int(text)
        found = result(self.store, sweep_id)
        self.sweep_id, self._shown = sweep_id, None
        self._status(f"sweep #{sweep_id}: {found['name']} ({found['status']}, "
                     f"{len(found['conditions'])} conditions and the base)")
        self._show(found)
        return found

    def poll(self) -> None:
        """Read the followed sweep's rows: progress, and its result whenever a condition has finished."""
        detached = self.following
        if detached is None:
            return
        alive = detach.alive(detached)
        try:
            row = detach.sweep_row(self.store, detached)
            if row is None or (alive and row["status"] != "running"):  # not opened yet (or an earlier run's row)
                if not alive:
                    self._ended(None)
                return
            self.sweep_id = row["id"]
            sweep = self.store.sweep(row["id"])
            version = (row["id"], row["status"], tuple((link["position"], link["status"]) for link in sweep["runs"]))
            if version != self._shown:  # a condition began or finished: the result is read again, not every poll
                self._shown = version
                self._show(result(self.store, row["id"]))
            progress = self._progress(detached, row, sweep)
        except LabError as error:  # the database cannot be read now: said, and tried again at the next poll
            self._status(str(error))
            return
        if alive:
            self._status(progress)
        else:
            self._ended(row)

    def _progress(self, detached: detach.Detached, row: dict, sweep: dict) -> str:
        links = sweep["runs"]
        done = sum(link["status"] == "done" for link in links)
        line = f"sweep #{row['id']} {detached.title}: {done}/{row['conditions']} conditions done"
        current = next((link for link in reversed(links) if link["status"] == "running"), None)
        if current is not None:
            trials = len(self.store.trials(current["run_id"]))
            line += f"; now {current['label']}: {trials} trials"
        return line + f" (process {detached.pid}, log {detached.log})"

    def _ended(self, row: dict | None) -> None:
        detached, self.following = self.following, None
        detach.forget(detached)
        if row is None:
            why = detach.last_line(detached) or "no output"
            text = f"the sweep ({detached.title}) stopped before it began: {why}"
        elif row["status"] in ("done", "cancelled"):
            text = f"sweep #{row['id']} {row['status']}: {detached.title}"
        else:  # failed, or still 'running': killed without a chance to say so
            status = "stopped" if row["status"] == "running" else row["status"]
            text = f"sweep #{row['id']} {status}: {detach.last_line(detached) or 'no output'}"
        self._status(text)
        self.post_message(SweepEnded(text, row is not None and row["status"] == "done"))

    def _show(self, found: dict) -> None:
        """Draw a sweep's result in the table and chart, and post it for the grid."""
        self._draw(found)
        self.post_message(SweepUpdated(found))

    def _draw(self, found: dict | None) -> None:
        self.query_one(SweepChart).show(curve(found) if found else None)
        table = self.query_one("#sweep-table", DataTable)
        table.clear(columns=True)
        if not found:
            return
        probe = probe_of(found)
        table.add_columns("condition", "value", f"{probe or 'accuracy'} %", "vs base")
        for row in ([found["base"]] if found["base"] else []) + found["conditions"]:
            figures = row.get(probe) or {}
            cells = [condition_label(row), "" if row["value"] is None else json.dumps(row["value"]),
                     f"{100 * figures['accuracy']:.1f}" if figures else row["status"],
                     difference(row, figures) if figures else ""]
            table.add_row(*(Text(cell) for cell in cells))

    def _status(self, text: str) -> None:
        self.query_one("#sweep-status", Static).update(Text(text))
