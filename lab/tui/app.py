"""The lab console: a thin App and one main screen (Posting's layout), blocking work in thread
workers whose results arrive as messages (Harlequin). Probe logic lives in lab.runner, not here."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from rich.markup import escape
from rich.text import Text

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import (DataTable, Footer, Header, Input, Label, LoadingIndicator, ProgressBar, Select, Static,
                             TabbedContent, TabPane, Tabs)
from textual.worker import Worker, WorkerState

from lab import presets
from lab.errors import LabError
from lab.interventions import Plan
from lab.interventions import edit
from lab.models import Loaded, ModelSpec, load
from lab.probes import needle as needle_probe
from lab.probes.heads import HeadsSpec, scores
from lab.probes.mmlu import MMLUSpec
from lab.runner import Finished, Progress, Started
from lab.session import Busy, Job, Session
from lab.store import Store, default_path
from lab.sweeps import conditions as sweep_conditions
from lab.summary import RUN_COLUMNS, heatmap, is_base, run_cells, run_label, summarize
from lab.tui.charts import Heatmap, MMLUChart, NeedleChart, delta_grid
from lab.tui.effects import effect_map
from lab.tui.grid import LayerGrid
from lab.tui.help import HelpScreen
from lab.tui.keymap import key_text, read_keymap
from lab.tui.messages import CellToggled, Failed, ModelLoaded, ProbeEvent, ScoresReady
from lab.tui.palette import COMMANDS, LabCommands
from lab.tui.seen import seen_path, unseen
from lab.tui.status import Rate, StatusLine, time_left
from lab.tui.sweep_view import SweepEnded, SweepUpdated, SweepView, grid_sweep

CONSOLE_NEEDLE = needle_probe.NeedleSpec(task="passkey", lengths=(256, 512, 1024, 2048), depths=(0, 25, 50, 75, 100),
                                         max_new_tokens=8)
SCORE_OVERLAYS = ("retrieval", "entropy", "needle_mass")  # from head scoring
OVERLAYS = (None, *SCORE_OVERLAYS, "effect")
NO_OVERLAY = "no overlay data yet: r scores heads; a needle run with heads off shows their effect"
FOOTER_FIRST = ("app.help", "probe.needle", "probe.mmlu", "probe.cancel", "app.quit")
TABS = ("tab-needle", "tab-heatmap", "tab-mmlu", "tab-runs", "tab-probe", "tab-sweep")
KEYMAP = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "lab" / "keymap.toml"


class PathDialog(ModalScreen[str | None]):
    """Ask for a preset path (open or save)."""

    BINDINGS = [Binding("escape,ctrl+q", "cancel", "Cancel", id="dialog.cancel")]
    DEFAULT_CSS = """
    PathDialog { align: center middle; }
    PathDialog > Vertical { width: 70; height: auto; border: round $accent; background: $surface; padding: 1; }
    """

    def __init__(self, title: str, value: str):
        super().__init__()
        self.title_text, self.value = title, value

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.title_text)
            yield Input(self.value, id="path")
            yield Label("Enter accepts, Esc or Ctrl+Q cancels", classes="hint")

    @on(Input.Submitted)
    def accept(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmDialog(ModalScreen[bool]):
    """A yes/no question: y or Enter says yes, n or Esc says no."""

    BINDINGS = [Binding("y,enter", "answer(True)", "Yes", id="confirm.yes"),
                Binding("n,escape", "answer(False)", "No", id="confirm.no")]
    DEFAULT_CSS = """
    ConfirmDialog { align: center middle; }
    ConfirmDialog > Vertical { width: 60; height: auto; border: round $warning; background: $surface; padding: 1; }
    """

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question, id="question", markup=False)
            yield Label("y or Enter: yes · n or Esc: no", classes="hint")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class RightPane(Vertical):
    """Status, progress and the tabs; f shows it across the whole window."""

    ALLOW_MAXIMIZE = True


class ProbeForm(VerticalScroll):
    """The probe settings of the current preset, editable (scrolling in a short window)."""

    def __init__(self, preset: presets.Preset):
        super().__init__()
        self.preset = preset
        self.saved: dict | None = None  # the fields as the preset gave them, or as last saved

    def on_mount(self) -> None:
        self.mark_saved()

    def values(self) -> dict:
        return {field.id: field.value for field in self.query("Input, Select")}

    def mark_saved(self) -> None:
        self.saved = self.values()

    @property
    def edited(self) -> bool:
        return self.saved is not None and self.values() != self.saved

    def compose(self) -> ComposeResult:
        n = self.preset.needle or CONSOLE_NEEDLE
        m = self.preset.mmlu or MMLUSpec()
        yield Label("needle task / mode")
        with Horizontal(classes="row"):
            yield Select([(t, t) for t in needle_probe.TASKS], value=n.task, allow_blank=False, id="f-task")
            yield Select([(t, t) for t in needle_probe.MODES], value=n.mode, allow_blank=False, id="f-mode")
        for field, values in (("f-lengths", " ".join(map(str, n.lengths))),
                              ("f-depths", " ".join(f"{d:g}" for d in n.depths))):
            yield Label(list_summary(LISTS[field], values), id=f"l-{field}")
            yield Input(values, id=field)
        yield Label("trials / new tokens")
        with Horizontal(classes="row"):
            yield Input(str(n.trials), id="f-trials", type="integer")
            yield Input(str(n.max_new_tokens), id="f-new", type="integer")
        yield Label("mmlu source")
        yield Input(m.source, id="f-source")
        yield Label("mmlu shots / limit per subject (0: all)")
        with Horizontal(classes="row"):
            yield Input(str(m.shots), id="f-shots", type="integer")
            yield Input(str(m.limit), id="f-limit", type="integer")

    @on(Input.Changed, "#f-lengths, #f-depths")
    def _summarize(self, event: Input.Changed) -> None:
        """A list's count and range beside its title: the whole grid, where the field is too narrow to show it."""
        self.query_one(f"#l-{event.input.id}", Label).update(list_summary(LISTS[event.input.id], event.value))


LISTS = {"f-lengths": "lengths (tokens)", "f-depths": "depths (%)"}


def list_summary(title: str, text: str) -> Text:
    """'lengths (tokens): 8, 256 to 2048' (plain text), or the title and what is wrong with the list."""
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        return Text(f"{title}: not numbers")
    if not values:
        return Text(f"{title}: none")
    return Text(f"{title}: {len(values)}, {min(values):g} to {max(values):g}")


class MainScreen(Screen):
    COMMANDS = {LabCommands}
    BINDINGS = [
        Binding("a", "toggle_kind('attention')", "All attn", tooltip="All attention blocks off/on", id="plan.attention"),
        Binding("s", "toggle_kind('ssm')", "All SSM", tooltip="All SSM/recurrent blocks off/on", id="plan.ssm"),
        Binding("m", "toggle_kind('mlp')", "All MLP", tooltip="All MLP blocks off/on", id="plan.mlp"),
        Binding("e", "toggle_kind('moe')", "All MoE", show=False, tooltip="All MoE blocks off/on", id="plan.moe"),
        Binding("t", "toggle_layer", "Layer", tooltip="Every block of the cursor's layer off/on", id="plan.layer"),
        Binding("minus", "sparsify(-1)", "k-", tooltip="Sparsify: keep one head fewer per token", id="plan.k_down"),
        Binding("plus,equals_sign", "sparsify(1)", "k+", show=False, tooltip="Sparsify: keep one head more",
                id="plan.k_up"),
        Binding("p", "phase", "Phase", tooltip="Cycle phase: both, prefill, generation", id="plan.phase"),
        Binding("z", "mode", "Mode", show=False, tooltip="Zero or mean ablation", id="plan.mode"),
        Binding("g", "needle_mode('generation')", "Needle attn", show=False,
                tooltip="Attention to the needle in generation: keep, omit, only, balanced, null",
                id="plan.needle_generation"),
        Binding("G", "needle_mode('prefill')", "Needle attn prefill", show=False,
                tooltip="Attention to the needle in prefill: keep, omit, only, balanced, null, follow",
                id="plan.needle_prefill"),
        Binding("c", "clear", "Clear", tooltip="Back to the base model", id="plan.clear"),
        Binding("n", "run_probe('needle')", "Needle", tooltip="Run the needle probe in the background",
                id="probe.needle"),
        Binding("u", "run_probe('mmlu')", "MMLU", tooltip="Run the MMLU probe in the background", id="probe.mmlu"),
        Binding("x", "cancel_probe", "Cancel", tooltip="Stop the probe (finished trials are kept)",
                id="probe.cancel"),
        Binding("r", "score_heads", "Scores", show=False, tooltip="Score heads on needle prompts", id="probe.heads"),
        Binding("o", "overlay", "Overlay", tooltip="Colour heads by a score or the last probe's effect",
                id="view.overlay"),
        Binding("d", "heatmap_delta", "Delta", show=False, tooltip="Heatmap: scores or the difference to the base run",
                id="view.delta"),
        Binding("ctrl+o", "open_preset", "Open", tooltip="Open a preset", id="preset.open"),
        Binding("ctrl+s", "save_preset", "Save", tooltip="Save model, plan and probe settings", id="preset.save"),
        Binding("w", "sweep('heads')", "Sweep heads", id="sweep.heads",
                tooltip="Sweep: each head of the cursor's attention layer off alone (a detached process)"),
        Binding("b", "sweep('blocks')", "Sweep blocks", id="sweep.blocks",
                tooltip="Sweep: each block of the cursor's kind off alone, layer by layer (a detached process)"),
        Binding("K", "sweep('k')", "Sweep k", id="sweep.k",
                tooltip="Sweep k, the heads kept per token, 0..heads, with random controls (a detached process)"),
        Binding("S", "show_sweep", "Show sweep", show=False, id="sweep.show",
                tooltip="Show a stored sweep's effect map and chart by its id (lab sweeps lists them)"),
        Binding("v", "all_runs", "All runs", show=False, tooltip="Runs tab: every model's runs or this model's",
                id="runs.all"),
        Binding("f", "full_width", "Full width", show=False,
                tooltip="The tabs across the whole window (the Runs table, heatmap and charts at full width), or back",
                id="view.full_width"),
        *(Binding(str(n), f"tab({n - 1})", TABS[n - 1][4:].title(), show=False, tooltip="Switch to this tab",
                  id=f"view.{TABS[n - 1][4:]}") for n in range(1, len(TABS) + 1)),
    ]

    def __init__(self, spec: ModelSpec, preset: presets.Preset, store: Store):
        super().__init__()
        self.spec, self.preset, self.store = spec, preset, store
        self.session: Session | None = None
        self.plan = Plan()
        self.saved_plan = Plan()  # as opened or saved: the plan differs from it when there are unsaved changes
        self.preset_path: str | None = None
        self.previous: tuple[ModelSpec, Session] | None = None  # while another model loads: the one to go back to
        self.rows: dict[str, list[dict]] = {"needle": [], "mmlu": []}
        self.compare: set[int] = set()
        self.current_run: dict[str, tuple[int, str]] = {}  # probe -> (run id, label) of this session's last run
        self.all_runs = False
        self._summaries: dict[int, tuple[tuple, dict]] = {}
        self.scores: dict | None = None
        self.overlay: str | None = None
        self.last_needle_run: tuple[Plan, float] | None = None
        self.heatmap_delta = False  # heatmap cells as differences to the base run
        self.overlay_noted = False  # the note that no overlay has data, shown once per model
        self.rate = Rate()  # of the running job, for its time left

    @property
    def active_bindings(self):
        """As textual's, with the keys people need most first, so that the footer shows them at any width."""
        bindings = super().active_bindings

        def rank(item) -> int:
            binding_id = item[1].binding.id
            return FOOTER_FIRST.index(binding_id) if binding_id in FOOTER_FIRST else len(FOOTER_FIRST)
        return dict(sorted(bindings.items(), key=rank))

    @property
    def dirty(self) -> bool:
        """The plan or the probe settings differ from the preset's (as opened or last saved)."""
        return self.plan != self.saved_plan or any(form.edited for form in self.query(ProbeForm))

    @on(Input.Changed, "ProbeForm Input")
    @on(Select.Changed, "ProbeForm Select")
    def probe_setting_changed(self) -> None:
        self._show_plan()  # the preset line's *unsaved*

    # ---- layout ---------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            with Vertical(id="left"):
                yield Static("", id="plan")
                yield LoadingIndicator(id="loading")
            with RightPane(id="right"):
                yield StatusLine("no probe running", id="status")
                yield ProgressBar(total=1, id="progress", show_eta=False)
                with TabbedContent(id="tabs"):
                    with TabPane("Needle", id="tab-needle"):
                        yield NeedleChart(id="needle-chart")
                    with TabPane("Heatmap", id="tab-heatmap"):
                        yield Heatmap("no needle trials yet", id="heatmap")
                    with TabPane("MMLU", id="tab-mmlu"):
                        yield MMLUChart(id="mmlu-chart")
                    with TabPane("Runs", id="tab-runs"):
                        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
                    with TabPane("Probe", id="tab-probe"):
                        yield ProbeForm(self.preset)
                    with TabPane("Sweep", id="tab-sweep"):
                        yield SweepView(self.store.path, id="sweep-view")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "lab"
        self.sub_title = f"loading {self.spec.name}..."
        self._refresh_runs()
        self._show_plan()
        self.load_model(self.spec)

    # ---- workers --------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load", exit_on_error=False, description="Loading the model")
    def load_model(self, spec: ModelSpec, preset: presets.Preset | None = None, path: str | None = None) -> None:
        """Load `spec`; a preset that comes with it (opened, or the model picked) has its plan checked against the
        model first, so one that does not fit is refused whole."""
        try:
            loaded = load(spec)
            if preset is not None:
                preset.plan_for(loaded.anatomy)
            self.post_message(ModelLoaded(loaded, preset, path))
        except LabError as error:
            self.post_message(Failed("load", str(error)))

    @work(thread=True, group="probe", exit_on_error=False, description="Running a probe")
    def probe_worker(self, probe: str, preset: presets.Preset, job: Job) -> None:
        """Runs the job the screen claimed; the session refuses any other until this one ends."""
        try:
            for event in self.session.run(preset, self.store, job):
                self.post_message(ProbeEvent(probe, event))
        except LabError as error:
            self.post_message(Failed(probe, str(error)))
        finally:
            job.release()  # also when the run failed before it started

    @on(Worker.StateChanged)
    def worker_failed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.notify(f"{event.worker.description} failed: {event.worker.error}", severity="error", timeout=10)
            self._status("failed; see the notification")

    # ---- messages -------------------------------------------------------------------------------
    @property
    def loaded(self) -> Loaded | None:
        return self.session.loaded if self.session else None

    @on(ModelLoaded)
    async def model_loaded(self, message: ModelLoaded) -> None:
        self.session, self.previous = Session(message.loaded), None
        if message.preset is not None:
            self._take_preset(message.preset, message.path)
        anatomy = self.loaded.anatomy
        self.sub_title = (f"{self.loaded.spec.name} · {anatomy.architecture} · {anatomy.num_layers} layers · "
                          f"{anatomy.total_heads} heads")
        try:
            self.plan = self.preset.plan_for(anatomy)
        except LabError as error:
            self.notify(f"preset plan ignored: {error}", severity="error", timeout=10)
            self.plan = Plan()
        self.saved_plan = self.plan
        # runs, head scores and overlays were the old model's
        self.rows, self.current_run, self.scores, self.last_needle_run = {"needle": [], "mmlu": []}, {}, None, None
        self.overlay, self.overlay_noted = None, False
        await self.query("#loading, LayerGrid").remove()
        grid = LayerGrid(anatomy, self.plan, id="grid")
        await self.query_one("#left").mount(grid)
        grid.focus()
        self._show_plan()
        self._replot()
        self._attach_sweep()
        notes = unseen(self.loaded.spec.name, list(anatomy.notes), seen_path())
        if notes:
            self.notify("; ".join(notes), timeout=6)

    @on(Failed)
    def failed(self, message: Failed) -> None:
        self.notify(message.error, title=f"{message.what} failed", severity="error", timeout=10, markup=False)
        if message.what == "load" and self.previous is not None:  # the model loaded before stays
            (self.spec, self.session), self.previous = self.previous, None
            self.query("#loading").remove()
            self.query(LayerGrid).set(loading=False)
            self._status(f"load failed; still {self.model_name}")
            return
        if message.what == "load":
            self.query("#loading, LayerGrid").remove()  # a grid left is the previous model's, which is gone
            self.query_one("#plan", Static).update(Text.assemble(("could not load the model", "bold"),
                                                                 f": {message.error}"))
        self._status(f"{message.what} failed")

    @on(CellToggled)
    def cell_toggled(self, message: CellToggled) -> None:
        if not self._ready():
            return
        if message.head is None:
            self._set_plan(edit.toggle_block(self.plan, self.loaded.anatomy, message.layer, message.kind))
        else:
            self._set_plan(edit.toggle_head(self.plan, self.loaded.anatomy, message.layer, message.head))

    @on(ProbeEvent)
    def probe_event(self, message: ProbeEvent) -> None:
        event, probe = message.event, message.probe
        bar = self.query_one("#progress", ProgressBar)
        if isinstance(event, Started):
            if probe in self.rows:
                self.rows[probe] = []
            self.current_run[probe] = (event.run_id, run_label(self.store.run(event.run_id)))
            bar.update(total=event.total, progress=event.skipped)
            self.rate = Rate().update(time.monotonic(), event.skipped)
            self._status(f"{probe} run {event.run_id}: {event.plan}")
            if event.total and event.skipped == event.total:
                self.notify(f"already done: run #{event.run_id} (0 new trials)")
        elif isinstance(event, Progress):
            bar.update(progress=event.done)
            self.rate = self.rate.update(time.monotonic(), event.done)
            self._status(f"{probe} {event.done}/{event.total}{time_left(self.rate.left(event.total))}")
            if probe in self.rows:
                self.rows[probe].extend(event.rows)
                self._replot()
        elif isinstance(event, Finished) and probe == "heads":
            self._refresh_runs()
            self.post_message(ScoresReady("heads", scores(event.summary.get("heads", {"heads": {}}))))
        elif isinstance(event, Finished):
            self.rows[probe] = self.store.trials(event.run_id, probe)
            summary = event.summary.get(probe, {})
            hint = ""
            if probe == "needle" and summary:
                self.last_needle_run = (self.plan, summary["accuracy"])
                if self.overlay is not None:
                    self._set_overlay(self.overlay)  # the effect overlay follows the last run
                elif self._overlay_values("effect") is not None:
                    hint = " · o colours heads by their effect"
            result = f"{100 * summary['accuracy']:.1f} %" if "accuracy" in summary else "no trial finished"
            self._status(f"{probe} run {event.run_id} {event.status}: {result}", hint)
            self._refresh_runs()
            self._replot()

    @on(ScoresReady)
    def scores_ready(self, message: ScoresReady) -> None:
        self.scores = message.scores
        self._set_overlay(self.overlay if self.overlay in SCORE_OVERLAYS else "retrieval")
        self._status(f"scored {len(message.scores)} heads: grid coloured by {self.overlay} (o switches)")

    def on_key(self, event) -> None:
        """Esc in a form field gives the focus back to the grid, so that probe keys are not typed there."""
        if event.key == "escape" and isinstance(self.focused, (Input, Select)) and self.query(LayerGrid):
            self.query_one(LayerGrid).focus()
            event.stop()

    @on(DataTable.RowSelected, "#runs")
    def run_selected(self, event: DataTable.RowSelected) -> None:
        run_id = int(event.row_key.value)
        self.compare ^= {run_id}
        self._status(f"comparing runs {sorted(self.compare) or 'none'}")
        self._replot()

    # ---- actions --------------------------------------------------------------------------------
    def _ready(self) -> bool:
        if self.loaded is None:
            self.notify("the model is still loading", severity="warning")
        return self.loaded is not None

    def action_toggle_kind(self, kind: str) -> None:
        if self._ready():
            self._set_plan(edit.toggle_kind(self.plan, self.loaded.anatomy, kind))

    def action_toggle_layer(self) -> None:
        if self._ready():
            layer, _ = self.query_one(LayerGrid).current
            self._set_plan(edit.toggle_layer(self.plan, self.loaded.anatomy, layer))

    def action_sparsify(self, delta: int) -> None:
        if self._ready():
            self._set_plan(edit.step_sparsify(self.plan, self.loaded.anatomy, delta))

    def action_phase(self) -> None:
        self._set_plan(edit.next_phase(self.plan))

    def action_mode(self) -> None:
        self._set_plan(edit.next_mode(self.plan))

    def action_needle_mode(self, phase: str) -> None:
        self._set_plan(edit.next_needle_mode(self.plan, phase))

    def action_clear(self) -> None:
        self._set_plan(Plan())

    def _claim(self, name: str) -> Job | None:
        """The session for a new job, or None (and a note) while another job runs."""
        if not self._ready():
            return None
        sweep = self.query_one(SweepView)
        if sweep.running:
            self.notify(sweep.busy_note, severity="warning")
            return None
        try:
            return self.session.claim(name)
        except Busy as busy:
            self.notify(f"{busy.running} is running: x cancels it", severity="warning")
            return None

    def _start(self, probe: str, preset: presets.Preset) -> bool:
        """Start the probe's job; False (and a note) while another job runs."""
        job = self._claim("a probe" if probe != "heads" else "head scoring")
        if job is not None:
            self._status(f"starting {probe}...")
            self.probe_worker(probe, preset, job)
        return job is not None

    def action_run_probe(self, probe: str) -> None:
        try:
            preset = self.current_preset()
        except LabError as error:
            self.notify(str(error), title="probe settings", severity="error", markup=False)
            return
        if not self._start(probe, replace(preset, mmlu=None) if probe == "needle" else replace(preset, needle=None)):
            return  # refused: the tab of the job that runs stays in front
        if probe == "mmlu" and self.plan.phase == "generation" and not self.plan.is_empty:
            self.notify("MMLU scores one forward pass over the prompt: a generation-only plan changes nothing there",
                        severity="warning", timeout=8)
        self.query_one("#tabs", TabbedContent).active = "tab-needle" if probe == "needle" else "tab-mmlu"

    def action_heatmap_delta(self) -> None:
        self.heatmap_delta = not self.heatmap_delta
        self._show_heatmap()

    def action_tab(self, index: int) -> None:
        self.query_one("#tabs", TabbedContent).active = TABS[index]

    def action_full_width(self) -> None:
        if self.maximized is not None:
            self.minimize()
        else:
            self.maximize(self.query_one("#right"), container=False)
            self._focus_tabs()

    def minimize(self) -> None:
        """Back from the whole-window tabs (f, or Esc: Textual's binding), the grid taking the keys again."""
        super().minimize()
        if self.query(LayerGrid):
            self.query_one(LayerGrid).focus()

    def _focus_tabs(self) -> None:
        """The active tab's first widget (the Runs table), or its tab bar where that is a field, which would take
        the keys as text."""
        tabs = self.query_one("#tabs", TabbedContent)
        first = next((w for w in tabs.active_pane.query("*") if w.focusable), None)
        (tabs.query_one(Tabs) if first is None or isinstance(first, (Input, Select)) else first).focus()

    def action_all_runs(self) -> None:
        self.all_runs = not self.all_runs
        self._refresh_runs()
        self._status("runs of every model" if self.all_runs else "runs of this model (v shows every model's)")

    def action_cancel_probe(self) -> None:
        if self.query_one(SweepView).cancel():
            return
        job = self.session.cancel() if self.session else None
        if job is None:
            self.notify("nothing is running")
        else:
            self._status(f"cancelling {job.name} after the current batch (finished trials are kept)")

    def action_sweep(self, what: str) -> None:
        """Start a sweep at the cursor as a detached `lab sweep` (the Probe tab's needle settings) and follow it."""
        view = self.query_one(SweepView)
        if not self._ready():
            return
        if view.running or self.session.job is not None:
            self.notify(view.busy_note if view.running else f"{self.session.job.name} is running: x cancels it",
                        severity="warning")
            return
        layer, cell = self.query_one(LayerGrid).current
        try:
            options, title = grid_sweep(what, self.loaded.anatomy, layer, cell.kind if cell else None)
            preset = replace(self.current_preset(), mmlu=None)
            sweep_conditions(options, self.loaded.anatomy, preset.plan)  # a bad sweep fails here, not in the log
            view.launch(preset, options, title)
        except LabError as error:
            self.notify(str(error), title="sweep", severity="error", timeout=8, markup=False)
            return
        self.query_one(LayerGrid).set_effects({})
        self.query_one("#tabs", TabbedContent).active = "tab-sweep"

    def action_show_sweep(self) -> None:
        view = self.query_one(SweepView)
        if view.running:
            self.notify(f"{view.busy_note}; its map is the one shown", severity="warning")
            return
        mine = [s["id"] for s in self.store.sweeps() if s["model"] == self.model_name]

        def chosen(text: str | None) -> None:
            if text:
                self.show_sweep(text)
        self.app.push_screen(PathDialog("show sweep: its id (lab sweeps lists them)", str(mine[-1]) if mine else ""),
                             chosen)

    def show_sweep(self, text: str) -> None:
        try:
            found = self.query_one(SweepView).show(text)
        except LabError as error:
            self.notify(str(error), title="sweep", severity="error", markup=False)
            return
        if found["model"] != self.model_name:
            self.notify(f"sweep #{found['sweep']} is of {found['model']}: its map is not painted on this model",
                        severity="warning", markup=False)
        self.query_one("#tabs", TabbedContent).active = "tab-sweep"

    def _attach_sweep(self) -> None:
        attached = self.query_one(SweepView).attach(self.model_name)
        if attached is not None:
            self.notify(f"following a running sweep of {self.model_name}: {attached.title}", markup=False)

    @on(SweepUpdated)
    def sweep_updated(self, message: SweepUpdated) -> None:
        if self.loaded is not None and message.result["model"] == self.model_name:
            self.query_one(LayerGrid).set_effects(effect_map(message.result, self.loaded.anatomy))

    @on(SweepEnded)
    def sweep_ended(self, message: SweepEnded) -> None:
        self.notify(message.text, severity="information" if message.done else "warning", timeout=10, markup=False)
        self._refresh_runs()

    def action_score_heads(self) -> None:
        try:
            needle = self.current_preset().needle
        except LabError as error:
            self.notify(str(error), severity="error")
            return
        spec = HeadsSpec(task=needle.task, lengths=needle.lengths, depths=needle.depths, trials=1,
                         max_new_tokens=needle.max_new_tokens, haystack=needle.haystack, seed=needle.seed)
        self._start("heads", replace(self.current_preset(), needle=None, mmlu=None, heads=spec))

    def action_overlay(self) -> None:
        """The next overlay that has data, then off; without any data, a note (once per model)."""
        if not self._ready():
            return
        cycle = [None, *(name for name in OVERLAYS if name and self._overlay_values(name) is not None)]
        if len(cycle) == 1:
            self._status(NO_OVERLAY)
            if not self.overlay_noted:
                self.notify(NO_OVERLAY)
                self.overlay_noted = True
            return
        self._set_overlay(cycle[(cycle.index(self.overlay) + 1) % len(cycle)] if self.overlay in cycle else cycle[1])

    def _set_overlay(self, name: str | None) -> None:
        self.overlay = name
        self.query_one(LayerGrid).set_overlay(self._overlay_values(name))
        self._show_plan()

    def ask(self, question: str, then) -> None:
        """Call then() once the user says yes to `question`."""
        self.app.push_screen(ConfirmDialog(question), lambda yes: then() if yes else None)

    def action_open_preset(self) -> None:
        def opened(path: str | None) -> None:
            if path:
                self.open_preset(path)

        def choose() -> None:
            self.app.push_screen(PathDialog("open preset", self.preset_path or "presets/"), opened)
        if self.dirty:
            self.ask("unsaved changes: open another preset anyway?", choose)
        else:
            choose()

    def quit(self) -> None:
        """Quit, asking first while a job runs (it is cancelled) or the plan has unsaved changes."""
        def cancel_and_exit() -> None:
            if self.session is not None:
                self.session.cancel()
            self.app.exit()
        if self.session is not None and self.session.job is not None:
            self.ask(f"{self.session.job.name} is running: cancel it and quit?", cancel_and_exit)
        elif self.dirty:
            self.ask("unsaved changes: quit anyway?", cancel_and_exit)
        else:
            self.app.exit()

    def action_pick_model(self) -> None:
        """Load another model (its name as `lab --model` takes it) with an empty plan."""
        def picked(name: str | None) -> None:
            if name and name != self.model_name and not self._busy():
                self._switch_model(self.preset.with_model(name).with_plan(Plan()))

        def choose() -> None:
            self.app.push_screen(PathDialog("load model (toy-jamba, random:bamba, a hub id)", self.model_name), picked)
        if self.dirty:
            self.ask("unsaved changes: load another model anyway?", choose)
        else:
            choose()

    def _busy(self) -> bool:
        """Whether a job runs (and a note saying so): the model cannot change under it."""
        job = self.session.job if self.session is not None else None
        if job is not None:
            self.notify(f"{job.name} is running: x cancels it", severity="warning")
        return job is not None

    def _switch_model(self, preset: presets.Preset, path: str | None = None) -> None:
        """Load the preset's model and then take the preset (path: the file it came from); if the model fails to
        load or the plan does not fit it, the model loaded before stays."""
        if self.session is not None:
            self.previous = (self.spec, self.session)
        self.spec, self.session = preset.model, None
        self.query(LayerGrid).set(loading=True)
        if not self.query("LayerGrid, #loading"):  # after a failed load
            self.query_one("#left").mount(LoadingIndicator(id="loading"))
        self.load_model(preset.model, preset, path)

    def action_save_preset(self) -> None:
        """Save the preset as edited; saved as another file, it takes that file's name (runs are named after it)."""
        def chosen(path: str | None) -> None:
            if path:
                try:
                    preset, target = self.current_preset(), Path(path).expanduser().resolve()
                    if self.preset_path is None or target != Path(self.preset_path).resolve():
                        preset = replace(preset, name=target.stem)
                    saved = presets.save(preset, path)
                except (LabError, OSError) as error:
                    self.notify(str(error), title="save failed", severity="error", markup=False)
                    return
                self.preset, self.preset_path, self.saved_plan = preset, str(saved), self.plan
                self.query_one(ProbeForm).mark_saved()
                self._show_plan()
                self.notify(f"saved {saved}", markup=False)
        if self.preset_path is None or presets.is_builtin(self.preset_path):  # a builtin is saved as a copy here
            suggested = str(Path.cwd() / (Path(self.preset_path).name if self.preset_path else "my-preset.toml"))
        else:
            suggested = self.preset_path
        self.app.push_screen(PathDialog("save preset as", suggested), chosen)

    def open_preset(self, path: str) -> None:
        try:
            preset = presets.load(path)
            path = str(presets.resolve(path))
        except LabError as error:
            self.notify(str(error), title="bad preset", severity="error", timeout=10)
            return
        current = self.loaded.spec if self.loaded else self.spec
        if preset.model.name == current.name:  # the command line's flags stay with the model they were given for
            preset = replace(preset, model=replace(preset.model, **{
                flag: getattr(current, flag) for flag in presets.COMMAND_LINE_ONLY}))
        if preset.model != current:  # another model, or the same one loaded otherwise (dtype, device, ...)
            if not self._busy():
                self._switch_model(preset, path)
            return
        try:
            plan = preset.plan_for(self.loaded.anatomy)
        except LabError as error:  # refused whole, as lab run refuses it
            self.notify(str(error), title="bad preset", severity="error", timeout=10)
            return
        self._take_preset(preset, path)
        self._set_plan(plan)
        self.saved_plan = self.plan
        self._show_plan()

    def _take_preset(self, preset: presets.Preset, path: str | None) -> None:
        """The preset's probe settings in the Probe tab; path: the file it came from (None: not saved)."""
        self.preset, self.preset_path = preset, path
        self.query_one(ProbeForm).remove()
        self.query_one("#tab-probe").mount(ProbeForm(preset))

    # ---- helpers --------------------------------------------------------------------------------
    def current_preset(self) -> presets.Preset:
        """The preset as edited: current model, plan and probe form; a field that is not what it must be is
        named in the error."""
        def numbers(widget_id: str, name: str, kind=int, many: bool = False):
            text = self.query_one(widget_id, Input).value
            try:
                values = tuple(kind(v) for v in text.split())
            except ValueError:
                values = ()
            if not values or (len(values) > 1 and not many):
                what = "numbers" if many else "a whole number"
                raise LabError(f"probe settings: {name} must be {what}, not {text.strip()[:40]!r}")
            return values if many else values[0]

        needle = replace(self.preset.needle or CONSOLE_NEEDLE, task=self.query_one("#f-task", Select).value,
                         mode=self.query_one("#f-mode", Select).value,
                         lengths=numbers("#f-lengths", "lengths", many=True),
                         depths=numbers("#f-depths", "depths", float, many=True),
                         trials=numbers("#f-trials", "trials"), max_new_tokens=numbers("#f-new", "new tokens"))
        mmlu = replace(self.preset.mmlu or MMLUSpec(), source=self.query_one("#f-source", Input).value.strip(),
                       shots=numbers("#f-shots", "shots"), limit=numbers("#f-limit", "limit"))
        needle, mmlu = needle.validate(), mmlu.validate()
        model = self.loaded.spec if self.loaded else self.spec
        return replace(self.preset, model=model, plan=self.plan.to_dict(), needle=needle, mmlu=mmlu)

    def _set_plan(self, plan: Plan) -> None:
        self.plan = plan
        if self.loaded is not None:
            self.query_one(LayerGrid).set_plan(plan)
        self._show_plan()

    def _show_plan(self) -> None:
        words = self.plan.describe(self.loaded.anatomy) if self.loaded else "loading..."
        name = Path(self.preset_path).name if self.preset_path else self.preset.name
        flags = " [b]*unsaved*[/b]" if self.dirty else ""
        overlay = f" · overlay: {self.overlay}" if self.overlay else ""
        bias = ""
        if self.loaded and self.plan.heads_removed(self.loaded.anatomy) and any(
                b.out_bias for _, b in self.loaded.anatomy.blocks("attention")):
            bias = "\n[i]o_proj bias survives head ablation[/i]"
        self.query_one("#plan", Static).update(
            f"[b]plan[/b]: {escape(words)}{overlay}\npreset: {escape(name)}{flags}{bias}")

    def _status(self, text: str, hint: str = "") -> None:
        self.query_one(StatusLine).show(text, hint)

    @property
    def model_name(self) -> str:
        return self.loaded.spec.name if self.loaded else self.spec.name

    def _summary(self, run: dict) -> dict:
        """summarize() of a run's trials, computed again only when its trials or status change."""
        version = (run["trials"], run["status"])
        if self._summaries.get(run["id"], (None,))[0] != version:
            self._summaries[run["id"]] = (version, summarize(self.store.trials(run["id"])))
        return self._summaries[run["id"]][1]

    def _refresh_runs(self) -> None:
        table = self.query_one("#runs", DataTable)
        # clear() sends cursor and view to the top (picking runs meant scrolling down again): the run under the
        # cursor stays there, unless it is the top row, which stays on the newest run
        cursor_run = table.coordinate_to_cell_key(table.cursor_coordinate).row_key if table.cursor_row else None
        scrolled = table.scroll_y
        table.clear(columns=True)  # widths from the rows shown now, not from every row shown before
        # every model's runs: the model second, where the pane shows it
        order = list(range(len(RUN_COLUMNS)))
        if self.all_runs:
            model = RUN_COLUMNS.index("model")
            order = [0, model] + [i for i in order[1:] if i != model]
        table.add_columns(*(RUN_COLUMNS[i] for i in order))
        for run in reversed(self.store.runs()):
            if self.all_runs or run["model"] == self.model_name:
                cells = run_cells(run, self._summary(run))
                cells[0] = ("▶ " if run["id"] in self.compare else "") + cells[0]
                table.add_row(*(Text(cells[i]) for i in order), key=str(run["id"]))
        if cursor_run in table.rows:
            table.scroll_to(y=scrolled, animate=False)
            table.move_cursor(row=table.get_row_index(cursor_run))

    def _compared(self, probe: str) -> list[dict]:
        """The runs every chart shows besides the current one: the base run (same model, empty plan), the
        previous run, then the runs picked in the Runs tab."""
        current_id = self.current_run.get(probe, (None,))[0]
        runs = [r for r in self.store.runs() if r["model"] == self.model_name and r["id"] != current_id
                and probe in self._summary(r)]
        base = next((r for r in reversed(runs) if is_base(r)), None)
        previous = next((r for r in reversed(runs) if r is not base), None)
        picked = [r for r in runs if r["id"] in self.compare and r not in (base, previous)]
        return [r for r in (base, previous, *picked) if r is not None]

    def _series(self, probe: str, key: str) -> list[tuple[str, dict]]:
        """(label, summary[key]) of the compared runs, then of the current run (live)."""
        series = [(run_label(r), self._summary(r)[probe][key]) for r in self._compared(probe)]
        if self.rows[probe]:
            series.append((self.current_run[probe][1],
                           summarize([{**r, "probe": probe} for r in self.rows[probe]])[probe][key]))
        return series

    def _replot(self) -> None:
        with self.app.batch_update():
            self.query_one(NeedleChart).show(self._series("needle", "by_length"))
            self.query_one(MMLUChart).show(self._series("mmlu", "by_category"))
            self._show_heatmap()
            self._refresh_runs()

    def _base_run(self, probe: str) -> dict | None:
        """The run compared as the base (same model, empty plan), if there is one."""
        return next((r for r in self._compared(probe) if is_base(r)), None)

    def _show_heatmap(self) -> None:
        cells = heatmap(self.rows["needle"])
        base = self._base_run("needle") if self.heatmap_delta else None
        if not self.heatmap_delta:
            self.query_one(Heatmap).show(*cells)
        elif base is None:
            current = self.current_run.get("needle")
            why = ("this run is the base run: switch something off and run again" if current and is_base(
                self.store.run(current[0])) else "no base run of this model yet (c, then n runs one)")
            self.query_one(Heatmap).show([], [], [], empty=f"Δ: {why}")
        else:
            delta = delta_grid(cells, heatmap(self.store.trials(base["id"], "needle")))
            self.query_one(Heatmap).show(cells[0], cells[1], delta, against=run_label(base))

    def _overlay_values(self, name: str | None) -> dict | None:
        if name is None:
            return None
        if name == "effect":
            base = self._base_run("needle")
            if self.last_needle_run is None or base is None:
                return None
            plan, accuracy = self.last_needle_run
            drop = max(0.0, self._summary(base)["needle"]["accuracy"] - accuracy)
            return {(l, h): drop for l, heads in plan.heads_removed(self.loaded.anatomy).items() for h in heads}
        if not self.scores:
            return None
        values = {key: v[name] for key, v in self.scores.items()}
        low, high = min(values.values()), max(values.values())
        span = (high - low) or 1.0
        if name == "entropy":  # peaked (low entropy) heads are the bright ones
            return {k: (high - v) / span for k, v in values.items()}
        return {k: (v - low) / span for k, v in values.items()}


class LabApp(App):
    """Thin app: theme, keymap, global bindings; the work happens in MainScreen."""

    CSS_PATH = "app.tcss"
    TITLE = "lab"
    BINDINGS = [
        Binding("q", "quit", "Quit", id="app.quit"),
        Binding("f1,question_mark", "help", "Help", tooltip="Show every binding and its id", id="app.help"),
        Binding("f8", "screenshot", "Screenshot", show=False,
                tooltip="Save an SVG of the screen in the data folder (~/.local/share/lab/screenshots)",
                id="app.screenshot"),
    ]

    def __init__(self, spec: ModelSpec, preset: presets.Preset | None = None, store: Store | None = None,
                 preset_path: str | None = None):
        super().__init__()
        self.spec = spec
        self.preset = preset or presets.Preset(model=spec)
        self.store = store or Store()
        self.preset_path = preset_path

    @classmethod
    def all_bindings(cls) -> list[Binding]:
        return list(cls.BINDINGS) + MainScreen.BINDINGS + LayerGrid.BINDINGS

    def on_mount(self) -> None:
        if KEYMAP.is_file():
            try:
                self.set_keymap(read_keymap(KEYMAP, {b.id: b.key for b in self.all_bindings()}))
            except LabError as error:
                self.notify(f"{error}; the default keys are used", severity="warning", timeout=10)
        screen = MainScreen(self.spec, self.preset, self.store)
        screen.preset_path = self.preset_path
        self.push_screen(screen)
        self.main = screen

    def get_system_commands(self, screen):
        """Textual's palette commands, less those lab offers itself (Quit: lab's asks first)."""
        ours = {command.title for command in COMMANDS}
        return (command for command in super().get_system_commands(screen) if command.title not in ours)

    def get_key_display(self, binding: Binding) -> str:
        """Keys as people write them (F1, ?, -, space); textual's own form for chords (^s)."""
        return super().get_key_display(binding) if "+" in binding.key else key_text(binding.key)

    def action_quit(self) -> None:
        self.main.quit()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.all_bindings(), self._keymap))

    def action_screenshot(self) -> None:
        folder = default_path().parent / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        self.notify(f"saved {self.save_screenshot(path=str(folder))}", timeout=10)
