"""The console, driven by Textual's Pilot on a tiny random model (no GPU, no download)."""

import json
import re
from dataclasses import replace

import pytest
from textual.app import App
from textual.widgets import Input

from lab import presets
from lab.errors import LabError
from lab.interventions import BlocksOff, Plan
from lab.models import ModelSpec
from lab.models.anatomy import Anatomy, Block, Layer
from lab.probes.mmlu import MMLUSpec
from lab.probes.needle import NeedleSpec
from lab.runner import Finished, Progress
from lab.store import Store
from lab.tui.app import LabApp
from lab.tui.charts import NeedleChart
from lab.tui.grid import LayerGrid
from lab.tui.messages import CellToggled, ProbeEvent

SIZE = (120, 36)


def make_app(tmp_path, **needle):
    spec = ModelSpec("random:jamba")
    preset = presets.Preset(name="t", model=spec, needle=NeedleSpec(
        **{"task": "passkey", "lengths": (300, 400), "depths": (0, 50, 100), "mode": "fast", "batch_size": 1,
           **needle}), mmlu=MMLUSpec(limit=1, shots=0))
    return LabApp(spec, preset, Store(tmp_path / "r.sqlite"))


async def ready(app, pilot):
    await app.workers.wait_for_complete()
    await pilot.pause()


async def test_toggles_produce_the_right_plan(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        screen = app.screen
        assert screen.query_one(LayerGrid).has_focus
        await pilot.press("down", "down", "space")  # layer 2's attention block
        assert screen.plan.off == (BlocksOff("attention"),)
        await pilot.press("right", "right", "space")  # layer 2, head 0 (after ATTN, MLP)
        assert screen.plan.heads_off == ((2, 0),)
        await pilot.press("s")
        assert BlocksOff("ssm") in screen.plan.off
        await pilot.press("minus", "p")
        assert screen.plan.sparsify.k == 3 and screen.plan.phase == "prefill"
        assert "*unsaved*" in str(screen.query_one("#plan").render())
        await pilot.press("c")
        assert screen.plan == Plan()  # the true base: phase both


async def test_probe_run_fills_the_chart(tmp_path):
    app = make_app(tmp_path)
    events = []
    async with app.run_test(size=SIZE, message_hook=events.append) as pilot:
        await ready(app, pilot)
        await pilot.press("a", "n")
        await ready(app, pilot)
        probe_events = list({id(m.event): m.event for m in events if isinstance(m, ProbeEvent)}.values())
        assert sum(isinstance(e, Progress) for e in probe_events) == 6
        finished = probe_events[-1]
        assert isinstance(finished, Finished) and finished.status == "done"
        screen = app.screen
        assert len(screen.rows["needle"]) == 6
        chart = screen.query_one(NeedleChart)
        assert chart.plt._active.monitor.x  # the chart has data points
        assert "attention off" in app.screen.store.runs()[0]["name"]


async def test_cancel_stops_the_probe_and_keeps_trials(tmp_path):
    app = make_app(tmp_path, lengths=(300, 400, 500, 600), depths=(0, 25, 50, 75, 100))
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        screen = app.screen
        original = screen.action_run_probe

        def run_and_cancel(probe):
            original(probe)
            screen.action_cancel_probe()  # at once, from the console's thread: the worker sees it
        screen.action_run_probe = run_and_cancel
        await pilot.press("n")
        await ready(app, pilot)
        run = screen.store.runs()[0]
        assert run["status"] == "cancelled"
        assert run["trials"] < 20


async def test_bad_preset_shows_an_error_not_a_crash(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nname = 'random:jamba'\n[plan]\nheads_off = [[0, 0]]\n")
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.screen.open_preset(str(bad))
        await pilot.pause()
        notes = [n.message for n in app._notifications]
        assert any("layer 0 has no attention" in n for n in notes)
        app.screen.open_preset(str(tmp_path / "missing.toml"))
        await pilot.pause()
        assert any("not found" in n.message for n in app._notifications)
        assert app.screen.plan == Plan()
        other = tmp_path / "other.toml"  # a preset for another model reloads the grid
        other.write_text("[model]\nname = 'random:bamba'\n[plan]\noff = [{kind = 'ssm'}]\n")
        app.screen.open_preset(str(other))
        await ready(app, pilot)
        assert app.screen.loaded.anatomy.architecture == "bamba"
        assert app.screen.plan.off == (BlocksOff("ssm"),)
        assert len(app.screen.query(LayerGrid)) == 1


async def test_save_and_reopen_preset(tmp_path):
    app = make_app(tmp_path)
    path = tmp_path / "saved.toml"
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("a", "ctrl+s")
        await pilot.pause()
        app.screen.query_one("#path").value = str(path)
        await pilot.press("enter")
        await pilot.pause()
    saved = presets.load(str(path))
    assert saved.plan["off"] == [{"kind": "attention"}] and saved.model.name == "random:jamba"
    assert saved.needle.lengths == (300, 400)


async def test_an_opened_preset_is_the_run_lab_run_makes_of_it(tmp_path):
    """The console and `lab run` of one preset make one run (one fingerprint: the same prompts, and either resumes
    the other), the preset's model settings included: the console read depths as floats (other passkeys than
    the file's integers) and kept the loaded model's dtype."""
    path = tmp_path / "p.toml"
    path.write_text("[model]\nname = 'random:jamba'\ndtype = 'float32'\n[needle]\ntask = 'passkey'\n"
                    "lengths = [300]\ndepths = [0, 50]\n")
    app = make_app(tmp_path)  # random:jamba, dtype auto
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.screen.open_preset(str(path))
        await ready(app, pilot)
        assert app.screen.loaded.spec.dtype == "float32"  # loaded again as the preset says
        needle_run = replace(app.screen.current_preset(), mmlu=None)  # what `n` runs
        assert needle_run.fingerprint() == presets.load(str(path)).fingerprint()


async def test_a_builtin_preset_is_saved_as_a_toml_file_that_does_not_shadow_it(tmp_path, monkeypatch):
    """Saved under the name it was opened by, a builtin became a file without .toml in the working folder, which
    `lab run <builtin>` then found first; and the builtin's own file is never written."""
    monkeypatch.chdir(tmp_path)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.screen.open_preset("toy-jamba-base")
        await ready(app, pilot)
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert app.screen.query_one("#path").value == str(tmp_path / "toy-jamba-base.toml")
        app.screen.query_one("#path").value = str(presets.resolve("toy-jamba-base"))
        await pilot.press("enter")
        await pilot.pause()
        assert any("builtin" in n.message for n in app._notifications)
    assert presets.resolve("toy-jamba-base") != tmp_path / "toy-jamba-base"
    with pytest.raises(LabError, match="builtin"):
        presets.save(presets.load("toy-jamba-base"), presets.resolve("toy-jamba-base"))


async def test_help_lists_binding_ids(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("f1")
        await pilot.pause()
        await pilot.pause()
        table = app.screen.query_one("#help-box")
        ids = {table.get_row_at(i)[1] for i in range(table.row_count)}
        assert {"plan.attention", "probe.needle", "grid.toggle", "app.quit"} <= ids


async def test_help_fits_80_columns_and_wraps_what_a_key_does(tmp_path):
    """At 80 x 24 "what it does" was cut to a few characters ("Sparsify:" for both k- and k+)."""
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("f1")
        await pilot.pause()
        await pilot.pause()
        table = app.screen.query_one("#help-box")
        assert table.virtual_size.width <= table.size.width
        rows = {table.get_row_at(i)[1]: table.get_row_at(i)[2] for i in range(table.row_count)}
        assert " ".join(rows["plan.k_down"].split()) == "k-: Sparsify: keep one head fewer per token"
        assert rows["plan.k_down"] != rows["plan.k_up"]


@pytest.mark.parametrize("size", [(80, 24), (200, 60)])
async def test_small_and_large_terminals(tmp_path, size):
    app = make_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await ready(app, pilot)
        grid = app.screen.query_one(LayerGrid)
        assert grid.size.width > 20 and grid.size.height > 3


def test_no_terminal_refuses_in_one_line(capsys):
    from lab.cli import main

    assert main([]) == 2  # pytest's stdin is not a terminal
    err = capsys.readouterr().err
    assert "needs a terminal" in err and "lab run" in err


async def test_one_job_at_a_time_and_weights_restored(tmp_path, monkeypatch):
    """n then u (or r) once ran two probes on one model in two threads and left heads zeroed."""
    import torch

    gate = gate_runs(monkeypatch)  # the needle run waits until u and r have been pressed
    app = make_app(tmp_path, lengths=(300, 400, 500), depths=(0, 50, 100))
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        screen = app.screen
        model = screen.loaded.model
        before = {k: v.clone() for k, v in model.state_dict().items()}
        await pilot.press("down", "down", "right", "right", "space")  # layer 2, head 0 off: folded
        assert screen.plan.heads_off
        await pilot.press("n", "u", "r")
        await pilot.pause()
        notes = [n.message for n in app._notifications]
        assert "a probe is running: x cancels it" in notes  # u and r refused (identical notes show once)
        assert screen.query_one("#tabs").active == "tab-needle"  # a refused u did not switch to the MMLU tab
        gate.set()
        await ready(app, pilot)
        runs = screen.store.runs()
        assert len(runs) == 1 and runs[0]["status"] == "done" and runs[0]["trials"] == 9
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        await pilot.press("x")
        assert "nothing is running" in [n.message for n in app._notifications]


async def test_head_scoring_is_stored_and_colours_the_grid(tmp_path):
    app = make_app(tmp_path, lengths=(300,), depths=(50,))
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("r")
        await ready(app, pilot)
        screen = app.screen
        assert set(screen.scores) == {(2, h) for h in range(4)}
        assert screen.overlay == "retrieval"
        (run,) = screen.store.runs()
        assert run["status"] == "done" and len(screen.store.trials(run["id"], "heads")) == 1


# ---- crashes on advertised paths (issue 15) --------------------------------------------------------
@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_no_color_starts_and_draws_the_grid(tmp_path, monkeypatch, size):
    """NO_COLOR=1 (also what --color mono sets) once crashed in textual's monochrome filter."""
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await ready(app, pilot)
        await pilot.press("down", "down", "space", "right", "right", "space", "minus")
        await pilot.pause()
        assert app.no_color and app.screen.plan.heads_off


def write_keymap(tmp_path, monkeypatch, text: str):
    path = tmp_path / "keymap.toml"
    path.write_text(text)
    monkeypatch.setattr("lab.tui.app.KEYMAP", path)


async def test_keymap_with_dotted_ids_as_the_help_shows(tmp_path, monkeypatch):
    write_keymap(tmp_path, monkeypatch, 'probe.needle = "N"\n"plan.attention" = "y"\n')
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("y")
        assert app.screen.plan.off == (BlocksOff("attention"),)
        await pilot.press("f1")
        await pilot.pause()
        table = app.screen.query_one("#help-box")
        keys = {table.get_row_at(i)[1]: table.get_row_at(i)[0] for i in range(table.row_count)}
        assert keys["probe.needle"] == "N" and keys["plan.attention"] == "y"
        assert keys["app.help"] == "F1 ?" and keys["plan.k_down"] == "-" and keys["grid.toggle"] == "space enter"


@pytest.mark.parametrize("text, why", [('probe.needle = 3\n', "probe.needle"), ("probe.needle = [\n", "keymap"),
                                       ('nope.id = "g"\n', "nope.id"),
                                       ('probe.needle = "g"\n', "g would be both plan.needle_generation and probe.needle")])
async def test_a_bad_keymap_is_a_note_and_defaults_are_used(tmp_path, monkeypatch, text, why):
    write_keymap(tmp_path, monkeypatch, text)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        notes = [n.message for n in app._notifications]
        assert any("keymap" in n and why in n for n in notes), notes
        await pilot.press("a")
        assert app.screen.plan.off == (BlocksOff("attention"),)


async def test_toggling_while_a_new_model_loads_is_ignored_and_shown(tmp_path, monkeypatch):
    import threading

    from lab.tui import app as app_module

    gate, real_load = threading.Event(), app_module.load

    def gated_load(spec):
        if spec.name == "random:bamba":
            gate.wait()
        return real_load(spec)

    monkeypatch.setattr(app_module, "load", gated_load)
    other = tmp_path / "other.toml"
    other.write_text("[model]\nname = 'random:bamba'\n")
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.screen.open_preset(str(other))
        await pilot.pause()
        try:
            assert app.screen.query_one(LayerGrid).loading
            await pilot.press("space", "a", "t")
            assert app.screen.plan == Plan()
            assert "the model is still loading" in [n.message for n in app._notifications]
        finally:
            gate.set()
        await ready(app, pilot)
        assert app.screen.loaded.anatomy.architecture == "bamba"
        assert not app.screen.query_one(LayerGrid).loading


# ---- honest quit (issue 15) ---------------------------------------------------------------------
def gate_runs(monkeypatch):
    """Probe runs wait until the returned event is set."""
    import threading

    from lab.session import Session

    gate, run = threading.Event(), Session.run

    def gated_run(self, *args):
        gate.wait()
        yield from run(self, *args)

    monkeypatch.setattr(Session, "run", gated_run)
    return gate


def exits_of(app, monkeypatch) -> list:
    """The app's exit calls, recorded instead of exiting."""
    exits = []
    monkeypatch.setattr(app, "exit", lambda *a, **k: exits.append(a))
    return exits


async def test_quit_during_a_job_asks_and_cancels_it(tmp_path, monkeypatch):
    from lab.tui.app import ConfirmDialog

    gate = gate_runs(monkeypatch)
    app = make_app(tmp_path)
    exits = exits_of(app, monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        screen = app.screen
        try:
            await pilot.press("n")
            job = screen.session.job
            await pilot.press("q")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmDialog)
            assert "a probe is running: cancel it and quit?" in str(app.screen.query_one("#question").render())
            await pilot.press("escape")  # no: the job goes on
            await pilot.pause()
            assert app.screen is screen and not exits and not job.cancel.is_set()
            await pilot.press("q", "y")
            await pilot.pause()
            assert job.cancel.is_set() and exits
        finally:
            gate.set()
        await ready(app, pilot)
        assert screen.store.runs()[0]["status"] == "cancelled"


async def test_unsaved_plan_changes_ask_before_quit_and_open(tmp_path, monkeypatch):
    from lab.tui.app import ConfirmDialog, PathDialog

    app = make_app(tmp_path)
    exits = exits_of(app, monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("a", "a")  # changed and changed back: nothing unsaved
        await pilot.press("q")
        await pilot.pause()
        assert exits
        exits.clear()
        await pilot.press("a", "ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog)
        assert "unsaved changes" in str(app.screen.query_one("#question").render())
        await pilot.press("n")
        await pilot.pause()
        await pilot.press("ctrl+o", "enter")
        await pilot.pause()
        assert isinstance(app.screen, PathDialog)
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog) and not exits
        await pilot.press("enter")
        await pilot.pause()
        assert exits


# ---- comparing runs (issue 15) ------------------------------------------------------------------
def test_short_plan_names_what_is_off():
    from lab.summary import short_plan

    assert short_plan(Plan().to_dict()) == "base"
    assert short_plan({"off": [{"kind": "attention", "layers": [2]}], "phase": "both"}) == "attn off L2"
    assert short_plan({"off": [{"kind": "ssm"}], "heads_off": [[2, 0], [2, 1]], "sparsify": {"k": 2},
                       "mode": "mean", "phase": "generation"}) == "ssm off · 2 heads off · k=2 · mean · gen only"
    assert short_plan({"heads_off": [[2, 3]], "mode": "zero", "phase": "both"}) == "head L2.h3 off"  # which one


@pytest.mark.parametrize("plan, words", [
    ({"needle_attention": {"generation": "omit", "prefill": "keep"}}, "needle omit in gen, keep in prefill"),
    ({"needle_attention": {"generation": "only", "prefill": "follow"}}, "needle only"),
    ({"experts_off": [[1, 0], [1, 3]], "expert_mode": "zero"}, "2 experts off"),
    ({"experts_off": [], "expert_mode": "mean"}, "base")])
def test_every_plan_op_is_named_and_only_a_plan_without_ops_is_base(plan, words):
    """A run under a needle-attention or experts-off plan was labelled and chosen as the base run."""
    from lab.summary import is_base, short_plan

    plan = {"mode": "zero", "phase": "both", **plan}
    assert short_plan(plan) == words
    assert is_base({"plan": json.dumps(plan)}) == (words == "base")


async def test_charts_compare_with_the_base_and_the_previous_run(tmp_path):
    app = make_app(tmp_path, lengths=(300,), depths=(50,))
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        chart = app.screen.query_one(NeedleChart)
        await pilot.press("n")
        await ready(app, pilot)
        assert chart.labels == ["#1 base"]
        await pilot.press("a", "n")
        await ready(app, pilot)
        assert chart.labels == ["#1 base", "#2 attn off"]
        await pilot.press("a", "s", "n")
        await ready(app, pilot)
        assert chart.labels == ["#1 base", "#2 attn off", "#3 ssm off"]
        await pilot.press("s", "a", "n")  # run 2 again: already done, compared with base and run 3
        await ready(app, pilot)
        assert "already done: run #2 (0 new trials)" in [n.message for n in app._notifications]
        assert chart.labels == ["#1 base", "#3 ssm off", "#2 attn off"]


async def test_runs_tab_shows_this_models_runs_with_accuracies(tmp_path):
    app = make_app(tmp_path, lengths=(300,), depths=(50,))
    app.store.open_run("other", "o", "random:bamba", {}, "", {})
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("a", "n")
        await ready(app, pilot)
        table = app.screen.query_one("#runs")
        labels = [str(c.label) for c in table.columns.values()]
        assert labels[:5] == ["id", "needle", "MMLU", "status", "plan"]
        assert {"probes", "trials", "started", "model", "name"} <= set(labels)
        assert table.row_count == 1
        row = dict(zip(labels, map(str, table.get_row_at(0))))
        assert row["id"] == "2" and row["plan"] == "attn off" and row["needle"].endswith("%") and row["MMLU"] == ""
        await pilot.press("4")
        assert app.screen.query_one("#tabs").active == "tab-runs"
        await pilot.press("v")  # every model: which model a run is of comes second (it was the ninth column)
        assert table.row_count == 2
        labels = [str(c.label) for c in table.columns.values()]
        assert labels[:3] == ["id", "model", "needle"] and labels.count("model") == 1
        assert str(table.get_row_at(1)[1]) == "random:bamba"


async def test_picking_a_run_keeps_the_cursor_on_it(tmp_path):
    """Enter on a run rebuilt the Runs table and sent the cursor back to the first row, so picking several
    runs meant scrolling down again each time (a reviewer at 100 x 32). The cursor and the view stay; a run
    added above moves the cursor down with its run."""
    app = make_app(tmp_path)
    for n in range(40):
        app.store.open_run(f"run {n}", f"t · {n}", "random:jamba", {}, "", {})
    async with app.run_test(size=(100, 32)) as pilot:
        await ready(app, pilot)
        await pilot.press("4", "f", "down", "down", "down", "enter")
        await pilot.pause()
        table = app.screen.query_one("#runs")
        assert app.screen.compare == {37} and table.cursor_row == 3
        await pilot.press(*["down"] * 32, *["up"] * 12)  # row 23, the table scrolled down
        await pilot.pause()
        shown = table.scroll_y
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen.compare == {17, 37} and (table.cursor_row, table.scroll_y) == (23, shown) and shown > 0
        app.store.open_run("newer", "t · newer", "random:bamba", {}, "", {})
        await pilot.press("v")  # every model's runs: one more above
        await pilot.pause()
        assert str(table.get_row_at(table.cursor_row)[0]) == "▶ 17"  # the cursor stays on its run


def test_lab_runs_lists_accuracies_at_80_columns(tmp_path, capsys, monkeypatch):
    from lab.cli import main
    from lab.store import Store

    monkeypatch.setenv("COLUMNS", "80")
    db = tmp_path / "r.sqlite"
    with Store(db) as store:
        run = store.open_run("f", "t · attention off", "toy-recurrentgemma", {"off": [{"kind": "attention"}]}, "", {})
        store.add_trials(run, "needle", [{"key": "a", "length": 300, "depth": 0.0, "correct": True, "score": 1.0,
                                          "exact": True, "contains": True, "fraction": 1.0}])
        store.finish_run(run, "done")
        store.open_run("g", "t · base", "random:jamba", {}, "", {})
    assert main(["runs", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "attn off" in out and "100.0 %" in out and "random:jamba" in out  # columns dropped, names whole
    assert max(len(line) for line in out.splitlines()) <= 80
    assert main(["runs", "--db", str(db), "--model", "random:jamba"]) == 0
    out = capsys.readouterr().out
    assert "random:jamba" in out and "toy-recur" not in out


# ---- legibility (issue 15) ----------------------------------------------------------------------
def grid_text(grid: LayerGrid) -> list[str]:
    return [grid.render_line(y).text for y in range(grid.size.height)]


async def test_grid_is_readable_without_colour(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        grid = app.screen.query_one(LayerGrid)
        header, *rows = grid_text(grid)
        assert "0 1 2 3" in header  # head indices above the head columns
        x = header.index("0 1 2 3")
        assert rows[2][x] == "●"  # layer 2 (attention) has its heads under them
        await pilot.press("down", "down", "right", "right", "space")  # head 0 off
        assert grid_text(grid)[3][x] == "×"
        await pilot.press("left", "left", "space", "minus")  # attention block off, sparsify k=3
        line = grid_text(grid)[3]
        assert "×ATT" in line and "k=3/4" in line
        assert "×" not in grid_text(grid)[1] and "k=" not in grid_text(grid)[1]  # layer 0: SSM on, no attention


class WideGrid(App):
    """A grid of three layers of 40 heads: wider than a 60-column terminal."""

    def __init__(self):
        super().__init__()
        head_block = Block("attention", "full", "attn", heads=40, kv_heads=8, head_dim=4, out_proj="attn.o")
        self.anatomy = Anatomy("jamba", tuple(Layer(i, "full_attention", (head_block,)) for i in range(3)))
        self.toggled: list[CellToggled] = []

    def compose(self):
        yield LayerGrid(self.anatomy, Plan())

    def on_cell_toggled(self, message: CellToggled) -> None:
        self.toggled.append(message)


async def test_the_cursor_stays_in_view_and_the_layer_labels_stay_put_in_a_wide_grid():
    app = WideGrid()
    async with app.run_test(size=(60, 10)) as pilot:
        grid = app.query_one(LayerGrid)
        grid.focus()
        await pilot.press("down", *["right"] * 40)  # layer 1, head 39 (after the ATTN cell)
        assert grid.current[1].head == 39
        header, *rows = grid_text(grid)
        assert header.startswith(" layer kind") and rows[1].lstrip().startswith("1 attn full")
        assert header.rstrip().endswith("38") and rows[1].rstrip().endswith("●")  # the cursor's head, in view
        await pilot.click(LayerGrid, offset=(len(rows[1].rstrip()) - 1, 2))  # that head, as drawn
        assert (app.toggled[-1].layer, app.toggled[-1].head) == (1, 39)
        await pilot.press(*["left"] * 40)  # back to the ATTN cell
        header, *rows = grid_text(grid)
        assert grid.scroll_x == 0 and "ATTN" in rows[1]
        assert "blocks" not in header and " 0 1 2" in header  # one block: "blocks" would touch head 0's index


async def test_escape_in_a_form_field_returns_to_the_grid(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("5")
        await pilot.pause()
        app.screen.query_one("#f-lengths").focus()
        await pilot.press("escape")
        assert app.screen.query_one(LayerGrid).has_focus
        await pilot.press("a")
        assert app.screen.plan.off == (BlocksOff("attention"),)


async def test_f8_saves_a_screenshot_in_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("LAB_DB")  # the data folder is the results database's; tests point LAB_DB elsewhere
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("f8")
        await pilot.pause()
        (shot,) = (tmp_path / "data" / "lab" / "screenshots").iterdir()
        assert any(str(shot) in n.message for n in app._notifications)


async def test_mmlu_under_a_generation_only_plan_says_it_changes_nothing(tmp_path, monkeypatch):
    gate = gate_runs(monkeypatch)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        try:
            await pilot.press("a", "p", "p")
            assert app.screen.plan.phase == "generation"
            await pilot.press("u")
            await pilot.pause()
            notes = [n.message for n in app._notifications]
            assert any("generation" in n and "changes nothing" in n for n in notes), notes
        finally:
            gate.set()
        await ready(app, pilot)


async def test_footer_shows_the_important_keys_first(tmp_path):
    from textual.widgets._footer import FooterKey

    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        keys = [(k.key_display, k.description) for k in app.screen.query(FooterKey)]
        assert keys[:5] == [("F1", "Help"), ("n", "Needle"), ("u", "MMLU"), ("x", "Cancel"), ("q", "Quit")]


@pytest.mark.parametrize("size, lengths", [((80, 24), (256, 512, 1024, 2048)),
                                           ((120, 40), (250, 677, 1105, 1532, 1959, 2387, 2814, 3241, 3669, 4096))])
async def test_heatmap_fits_without_wrapping(tmp_path, size, lengths):
    from lab.tui.charts import Heatmap

    depths = [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    app = make_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await ready(app, pilot)
        await pilot.press("2")
        heatmap = app.screen.query_one(Heatmap)
        heatmap.show(list(lengths), depths, [[d / 100 for _ in lengths] for d in depths])
        await pilot.pause()
        lines = heatmap.render().plain.splitlines()
        assert len(lines) == len(depths) + 2  # title, header, one line per depth
        assert max(map(len, lines)) <= heatmap.size.width
        assert len(lines[2].split()) == len(lengths) + 1  # depth label and one value per length



async def test_needle_attention_keys_cycle_the_modes_and_the_plan_says_so(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("g")
        needle = app.screen.plan.needle_attention
        assert (needle.generation, needle.prefill) == ("omit", "keep")
        await pilot.press("G", "G")
        assert app.screen.plan.needle_attention.prefill == "only"
        assert "needle: omit in generation, only in prefill" in str(app.screen.query_one("#plan").render())


# ---- command palette (issue 15) -----------------------------------------------------------------
async def palette(pilot, text: str) -> None:
    """Open the command palette, type `text`, run the best hit."""
    await pilot.press("ctrl+p")
    await pilot.pause()
    await pilot.press(*("space" if c == " " else c for c in text))
    await ready(pilot.app, pilot)  # the palette gathers its hits in a worker
    await pilot.press("enter")
    await pilot.pause()


async def test_command_palette_runs_labs_own_commands(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await palette(pilot, "toggle all attention")
        assert app.screen.plan.off == (BlocksOff("attention"),)
        grid = app.screen.query_one(LayerGrid)
        assert "×ATT" in grid_text(grid)[3]  # layer 2's attention block is drawn off
        await palette(pilot, "toggle all ssm")
        assert app.screen.plan.off == (BlocksOff("attention"), BlocksOff("ssm"))
        await palette(pilot, "clear plan")
        assert app.screen.plan == Plan()
        await palette(pilot, "run needle")
        await ready(app, pilot)
        assert app.screen.store.runs()[0]["status"] == "done"


async def test_command_palette_lists_every_lab_command_once(tmp_path):
    from textual.command import CommandList

    from lab.tui.palette import COMMANDS

    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("ctrl+p")
        await ready(app, pilot)
        hits = [str(option.prompt).splitlines()[0] for option in app.screen.query_one(CommandList).options]
        assert {c.title for c in COMMANDS} <= set(hits)
        assert hits.count("Quit") == 1  # lab's quit (asks first), not textual's as well


async def pick_model(app, pilot, name: str) -> None:
    """Load `name` as the palette's "pick model" does, and wait for the load."""
    await palette(pilot, "pick model")
    app.screen.query_one("#path").value = name
    await pilot.press("enter")
    await ready(app, pilot)


async def test_pick_model_from_the_palette_loads_it_with_an_empty_plan(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pick_model(app, pilot, "random:bamba")
        assert app.screen.loaded.anatomy.architecture == "bamba" and app.screen.plan == Plan()


async def test_a_model_that_fails_to_load_leaves_the_one_loaded(tmp_path):
    """A mistyped name left the console with no model (every key: 'the model is still loading') and the old
    model's name in the title."""
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pick_model(app, pilot, "toy-jamb")
        screen = app.screen
        assert screen.loaded is not None and screen.loaded.spec.name == "random:jamba"
        assert screen.model_name == "random:jamba" and screen.sub_title.startswith("random:jamba")
        assert len(screen.query(LayerGrid)) == 1 and not screen.query("#loading")
        assert any("toy-jamb" in n.message for n in app._notifications)
        await pilot.press("a")  # the grid still edits the plan
        assert screen.plan != Plan()


async def test_a_preset_whose_plan_does_not_fit_its_model_is_not_opened(tmp_path):
    """It was half applied: the model and probe settings switched, the plan silently the base model."""
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        screen = app.screen
        before = (screen.preset, screen.preset_path)
        for model in ("random:jamba", "random:bamba"):  # the model loaded, another one
            bad = tmp_path / f"bad-{model[7:]}.toml"
            bad.write_text(f"[model]\nname = '{model}'\n[plan]\noff = [{{kind = 'attention', layers = [9]}}]\n"
                           "[needle]\nlengths = [700]\n")
            screen.open_preset(str(bad))
            await ready(app, pilot)
            assert (screen.preset, screen.preset_path) == before
            assert screen.loaded.spec.name == "random:jamba" and screen.plan == Plan()
            assert any("layer 9 is out of range" in n.message for n in app._notifications)


# ---- heatmap: absolute or delta to the base run (issue 15) --------------------------------------
def stored_base_run(store, score: float) -> int:
    """A finished base run of random:jamba (needle, 300 tokens, depth 50) scoring `score`."""
    run = store.open_run("base", "t · base", "random:jamba", {}, "", {})
    store.add_trials(run, "needle", [{"key": "a", "length": 300, "depth": 50.0, "correct": score == 1.0,
                                      "score": score, "exact": True, "contains": True, "fraction": score}])
    store.finish_run(run, "done")
    return run


async def test_heatmap_key_toggles_absolute_and_delta_to_the_base_run(tmp_path):
    from lab.summary import heatmap as grid_of
    from lab.tui.charts import Heatmap

    app = make_app(tmp_path, lengths=(300,), depths=(50,))
    stored_base_run(app.store, 1.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("a", "n")
        await ready(app, pilot)
        await pilot.press("2")
        heatmap = app.screen.query_one(Heatmap)
        absolute = heatmap.render().plain.splitlines()
        assert absolute[0].startswith("score %")
        (score,) = grid_of(app.screen.rows["needle"])[2][0]
        await pilot.press("d")
        lines = heatmap.render().plain.splitlines()
        assert lines[0].startswith("Δ points vs #1 base")
        assert lines[2].split() == ["50%", f"{100 * (score - 1.0):+.0f}"]
        assert lines[-1].split() == ["-100", "-50", "0", "+50", "+100"]  # the diverging scale's legend
        assert max(map(len, lines)) <= heatmap.size.width
        await pilot.press("d")
        assert heatmap.render().plain.splitlines() == absolute


async def test_heatmap_delta_without_another_base_run_says_so(tmp_path):
    from lab.tui.charts import Heatmap

    app = make_app(tmp_path, lengths=(300,), depths=(50,))
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("a", "n")
        await ready(app, pilot)
        await pilot.press("2", "d")
        assert "no base run of this model" in app.screen.query_one(Heatmap).render().plain
        await pilot.press("a", "n")  # the base run itself
        await ready(app, pilot)
        assert "this run is the base run" in app.screen.query_one(Heatmap).render().plain


def test_delta_grid_subtracts_the_base_cell_by_cell():
    from lab.tui.charts import delta_grid

    current = ([300, 400], [0.0, 50.0], [[1.0, 0.5], [None, 0.0]])
    base = ([300], [0.0, 50.0, 100.0], [[0.5], [1.0], [1.0]])
    assert delta_grid(current, base) == [[0.5, None], [None, None]]


# ---- overlays (issue 15) -------------------------------------------------------------------------
async def test_head_scores_belong_to_their_model_and_colour_the_grid_without_a_press_o_hint(tmp_path):
    app = make_app(tmp_path, lengths=(300,), depths=(50,))
    other = tmp_path / "other.toml"
    other.write_text("[model]\nname = 'random:bamba'\n")
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("r")
        await ready(app, pilot)
        screen = app.screen
        status = str(screen.query_one("#status").render())
        assert screen.overlay == "retrieval" and "retrieval" in status and "press o" not in status
        assert screen.query_one(LayerGrid).overlay
        screen.open_preset(str(other))
        await ready(app, pilot)
        assert screen.loaded.anatomy.architecture == "bamba"
        assert screen.scores is None and screen.overlay is None and screen.query_one(LayerGrid).overlay is None
        assert "overlay" not in str(screen.query_one("#plan").render())


async def test_overlay_key_without_data_notes_it_once(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("o", "o", "o", "o", "o")
        notes = [n.message for n in app._notifications if "overlay" in n.message]
        assert len(notes) == 1 and "r scores heads" in notes[0]
        assert app.screen.overlay is None and app.screen.query_one(LayerGrid).overlay is None
        assert "r scores heads" in str(app.screen.query_one("#status").render())


# ---- model notes once per model (issue 15) ---------------------------------------------------------
async def test_the_o_proj_bias_note_appears_once_per_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_DB", str(tmp_path / "data" / "r.sqlite"))  # the data folder remembers the notes seen

    async def notes_at_start(model: str) -> list[str]:
        spec = ModelSpec(model)
        app = LabApp(spec, presets.Preset(model=spec), Store(tmp_path / "r.sqlite"))
        async with app.run_test(size=SIZE) as pilot:
            await ready(app, pilot)
            return [n.message for n in app._notifications if "bias" in n.message]

    assert len(await notes_at_start("random:recurrent_gemma")) == 1
    assert await notes_at_start("random:recurrent_gemma") == []
    assert len(await notes_at_start("toy-recurrentgemma")) == 1  # another model: its own first time


def test_notes_seen_survive_a_damaged_or_unwritable_file(tmp_path):
    from lab.tui.seen import unseen

    path = tmp_path / "seen.json"
    path.write_text("{not json")
    assert unseen("m", ["a", "b"], path) == ["a", "b"]
    assert unseen("m", ["a", "b", "c"], path) == ["c"]
    assert unseen("m", ["a"], tmp_path / "missing-folder" / "file" / "seen.json") == ["a"]
    (tmp_path / "dir.json").mkdir()
    assert unseen("m", ["a"], tmp_path / "dir.json") == ["a"]  # cannot be written: shown, no error


# ---- status line and time left (issue 15) ---------------------------------------------------------
def test_status_text_is_cut_at_a_word_boundary():
    from lab.tui.status import clip

    assert clip("needle run 12 done: accuracy 87.5 %", 20) == "needle run 12 done…"
    assert clip("scored 16 heads: grid coloured", 12) == "scored 16…"
    assert clip("scored 16 heads", 10) == "scored 16…"  # the last word fits exactly: kept
    assert clip("abcdefghij", 5) == "abcd…"  # one word wider than the line: cut, still marked
    assert clip("fits", 4) == "fits" and clip("not laid out yet", 0) == "not laid out yet"


def test_time_left_is_smoothed_and_errs_long():
    from lab.tui.status import Rate, time_left

    rate = Rate().update(now=0.0, done=0)
    assert rate.left(100) is None and time_left(rate.left(100)) == ""
    rate = rate.update(now=10.0, done=10)  # 1 s a trial
    assert rate.left(100) == 90.0
    rate = rate.update(now=40.0, done=20)  # a slower batch (3 s a trial) counts at once
    assert rate.seconds == 3.0
    rate = rate.update(now=50.0, done=30)  # a faster one (1 s) lowers the estimate by a share only
    assert rate.seconds == 0.3 * 1.0 + 0.7 * 3.0
    assert rate.update(now=60.0, done=30).done == 30  # no new trials: the clock restarts, the rate stays
    assert time_left(4.2) == ", under 5 s left" and time_left(41) == ", under 45 s left"
    assert time_left(61) == ", about 2 min left" and time_left(3 * 3600 + 61) == ", about 3 h 2 min left"


async def test_status_line_shows_whole_words_at_80_columns(tmp_path):
    from textual.geometry import Region

    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        status = app.screen.query_one("#status")
        app.screen._status("needle run 12 done: accuracy 87.5 % under attention off in 2 of 2 layers, generation only")
        await pilot.pause()
        (line,) = status.render_lines(Region(0, 0, status.outer_size.width, 1))
        shown = line.text.strip()
        assert shown.endswith("…") and len(shown) <= status.size.width
        assert "needle run 12 done: accuracy 87.5 % under attention off in 2 of 2 layers".startswith(shown[:-1])
        assert shown[:-1].split()[-1] in "needle run 12 done: accuracy 87.5 % under attention off".split()


async def test_a_status_hint_shows_only_where_it_fits_whole(tmp_path):
    from textual.geometry import Region

    app = make_app(tmp_path)
    for width, shown in ((80, "needle run 2 done: accuracy 0.0 %"), (160, "needle run 2 done: accuracy 0.0 % · o shows it")):
        async with app.run_test(size=(width, 24)) as pilot:
            await ready(app, pilot)
            status = app.screen.query_one("#status")
            app.screen._status("needle run 2 done: accuracy 0.0 %", " · o shows it")
            await pilot.pause()
            (line,) = status.render_lines(Region(0, 0, status.outer_size.width, 1))
            assert line.text.strip() == shown
        app = make_app(tmp_path)


async def test_a_model_that_fails_to_load_after_another_is_reported_as_text_and_another_loads(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.screen.query_one(LayerGrid)  # the first model is there
        await pick_model(app, pilot, "random:[b]x[/b]")
        notes = [n for n in app._notifications if "no tiny config" in n.message]
        assert notes and not notes[0].markup and "'[b]x[/b]'" in notes[0].message
        assert app.screen.loaded.anatomy.architecture == "jamba"  # the model loaded before stays
        await pick_model(app, pilot, "random:bamba")  # and after a failed load, another model loads
        assert app.screen.loaded.anatomy.architecture == "bamba" and len(app.screen.query(LayerGrid)) == 1


def test_mmlu_bars_carry_their_values_above_the_legend():
    """Each bar's accuracy is written over it, at plotext's bar centres, and the y range leaves room above
    100 % so the legend covers no bar."""
    from lab.tui.charts import bar_tops

    assert bar_tops([[40.0, 90.0]]) == [(1.0, 40.0), (2.0, 90.0)]
    assert bar_tops([[10.0], [20.0]]) == [(0.75, 10.0), (1.25, 20.0)]


async def test_mmlu_chart_shows_each_bars_value(tmp_path):
    from lab.tui.charts import MMLUChart

    app = make_app(tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(app, pilot)
        await pilot.press("3")
        chart = app.screen.query_one(MMLUChart)
        chart.show([("#1 base", {"stem": 0.42, "humanities": 0.87}), ("#2 attn off", {"stem": 0.13, "humanities": 0.31})])
        await pilot.pause()
        drawn = chart.plt.build()
        assert all(value in drawn for value in ("42", "87", "13", "31"))


async def test_edited_probe_settings_count_as_unsaved(tmp_path, monkeypatch):
    """q quit at once after the probe settings were edited, and the edits were lost (only the plan counted)."""
    from lab.tui.app import ConfirmDialog

    app = make_app(tmp_path)
    exits = exits_of(app, monkeypatch)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        screen = app.screen
        trials = screen.query_one("#f-trials")
        trials.value = "3"
        await pilot.pause()
        assert "*unsaved*" in str(screen.query_one("#plan").render())
        screen.query_one(LayerGrid).focus()
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog) and not exits
        assert "unsaved changes" in str(app.screen.query_one("#question").render())
        await pilot.press("escape")
        await pilot.pause()
        trials.value = "1"  # back as it was: nothing unsaved
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
        assert exits


@pytest.mark.parametrize("field", ["#f-lengths", "#f-depths", "#f-source", "#f-trials", "#f-new", "#f-shots",
                                   "#f-limit"])
async def test_probe_fields_show_their_values_whole_at_80_columns(tmp_path, field):
    """The console's default depths ('0 25 50 75 100') showed as '0 25 50 7' at 80 columns: the field shared its
    row equally with the trials and token counts; shots and limit, beside the MMLU source, showed nothing."""
    spec = ModelSpec("random:jamba")
    app = LabApp(spec, presets.Preset(name="t", model=spec), Store(tmp_path / "r.sqlite"))
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        app.screen.query_one("#tabs").active = "tab-probe"
        await pilot.pause()
        shown = app.screen.query_one(field)
        assert shown.content_size.width > len(shown.value), (shown.value, shown.content_size.width)
        limit = app.screen.query_one("#f-limit")  # the last field: reached by scrolling where it does not fit
        limit.focus()
        await pilot.pause()
        await pilot.wait_for_animation()  # focus scrolls it into view
        assert limit.region.height > 0 and app.screen.find_widget(limit).region.bottom <= 23  # above the footer


async def test_f_shows_the_tabs_across_the_whole_window(tmp_path):
    """At 80 columns the Runs tab showed id, figures and a cut plan; its status and later columns needed
    scrolling. f gives the tabs the whole window; f again gives the grid back its keys."""
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("4")
        runs = app.screen.query_one("#runs")
        assert runs.region.width < 40
        await pilot.press("f")
        await pilot.pause()
        assert runs.region.width >= 78 and app.focused is runs
        await pilot.press("f")
        await pilot.pause()
        assert runs.region.width < 40 and isinstance(app.focused, LayerGrid)
        await pilot.press("space")
        assert app.screen.plan != Plan()  # the grid's keys act again


async def test_a_run_cancelled_before_any_trial_reads_as_no_result(tmp_path):
    """n then x at once: the status read 'needle run 3 cancelled: 0.0 %' for a run with no trials, as if the
    plan had scored nothing (a new-user pass)."""
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.screen.post_message(ProbeEvent("needle", Finished(7, "cancelled", {})))
        await pilot.pause()
        status = str(app.screen.query_one("#status").render())
        assert "%" not in status and "no trial finished" in status, status
        app.screen.post_message(ProbeEvent("needle", Finished(8, "cancelled", {"needle": {"accuracy": 0.5}})))
        await pilot.pause()
        assert "needle run 8 cancelled: 50.0 %" in str(app.screen.query_one("#status").render())


async def test_probe_lists_are_summarised_and_bad_fields_named(tmp_path):
    """At 80 columns a preset's eight lengths showed as '256 512 768 1024 1280 153' (a new-user pass): the title
    gives the count and range; a field that is not a number is named in the error (it named every field)."""
    app = make_app(tmp_path, lengths=(256, 512, 768, 1024, 1280, 1536, 1792, 2048))
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        screen = app.screen
        assert str(screen.query_one("#l-f-lengths").render()) == "lengths (tokens): 8, 256 to 2048"
        screen.query_one("#f-depths").value = "0 50 x"
        await pilot.pause()
        assert str(screen.query_one("#l-f-depths").render()) == "depths (%): not numbers"
        with pytest.raises(LabError, match="depths must be numbers, not '0 50 x'"):
            screen.current_preset()
        screen.query_one("#f-depths").value = "0 50"
        screen.query_one("#f-shots").value = "-"
        with pytest.raises(LabError, match="shots must be a whole number, not '-'"):
            screen.current_preset()


async def test_f_twice_on_the_probe_tab_comes_back(tmp_path):
    """On the Probe tab the first f put the focus in a field, which took the second f as text (a new-user
    pass); there the tab bar takes the focus. Esc in a field there also gives the window back to the grid."""
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("5", "f")
        await pilot.pause()
        assert app.screen.maximized is not None and not isinstance(app.focused, Input)
        await pilot.press("f")
        await pilot.pause()
        assert app.screen.maximized is None and isinstance(app.focused, LayerGrid)
        assert app.screen.query_one("#f-trials").value == "1"
        await pilot.press("f")
        app.screen.query_one("#f-trials").focus()
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen.maximized is None and isinstance(app.focused, LayerGrid)


async def test_the_needle_legend_sits_above_100_percent(tmp_path):
    """With three runs at 80 x 24 the legend's third line sat on the 100 % row, over the base run's line (a
    new-user pass): the y range leaves the legend's rows above 100 %, as the sweep chart's does."""
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        chart = app.screen.query_one(NeedleChart)
        chart.show([(f"run {i}", {"300": 1.0, "400": 0.5}) for i in range(3)])
        lines = chart.render().plain.splitlines()
        hundred = next(row for row, line in enumerate(lines) if line.startswith("100┤"))
        assert hundred > 4 and "run 2" in lines[4]  # below the title, the frame and the legend's three rows


@pytest.mark.parametrize("no_color", [False, True])
async def test_without_colour_the_needle_lines_differ_by_their_marks(tmp_path, monkeypatch, no_color):
    """Every run's line and legend entry was drawn in the same braille, so without colour (NO_COLOR, lab --color
    mono) the runs could not be told apart; there each line gets a mark of its own, with colour braille stays."""
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        chart = app.screen.query_one(NeedleChart)
        chart.show([(f"run {i}", {"300": 1.0 - i / 4, "400": i / 4}) for i in range(3)])
        drawn = re.sub(r"\x1b\[[0-9;]*m", "", chart.plt.build())  # the text, without its colour codes
        legend = [line.split(" run ")[0].split()[-1] for line in drawn.splitlines() if " run " in line]
        assert len(legend) == 3
        assert len(set(legend)) == (3 if no_color else 1)


def test_lone_points_keep_a_whole_cell_mark_without_colour():
    """A sweep's line of one point (its first condition done) is drawn as a point: in mono it got the line's
    braille mark, a speck of one dot (a review)."""
    from types import SimpleNamespace

    from lab.tui.charts import line_mark

    mono, colour = SimpleNamespace(no_color=True), SimpleNamespace(no_color=False)
    points = [line_mark(mono, line, single=True) for line in range(3)]
    assert len(set(points)) == 3 and not {"braille", "hd"} & set(points)
    assert line_mark(colour, 0, single=True) == "●" and line_mark(colour, 1) == "braille"


@pytest.mark.parametrize("size, title", [((80, 24), "needle accuracy by length"),
                                         ((120, 36), "needle accuracy by context length")])
async def test_the_needle_chart_keeps_a_title_that_fits(tmp_path, size, title):
    """plotext leaves out a title wider than the plot: at 80 columns the needle chart had none (a shorter one
    now); the sweep chart's long titles are clipped to fit."""
    from lab.tui.charts import chart_title

    app = make_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await ready(app, pilot)
        chart = app.screen.query_one(NeedleChart)
        chart.show([("run", {"300": 1.0, "400": 0.5})])
        assert re.sub(r"\x1b\[[0-9;]*m", "", chart.plt.build()).splitlines()[0].strip() == title
    assert chart_title("one two three four", 13) == "one two…" and chart_title("one two", 0) == "one two"


async def test_a_preset_saved_as_a_new_file_is_named_after_it(tmp_path, monkeypatch):
    """ctrl+s to k1.toml wrote name = "untitled" (or the opened preset's name) while the console showed k1.toml,
    and later runs were named after the old name (a new-user pass). The dialog offers a path in the current
    folder, said whole."""
    from lab.tui.app import PathDialog

    monkeypatch.chdir(tmp_path)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("a", "ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, PathDialog)
        assert app.screen.query_one("#path").value == str(tmp_path / "my-preset.toml")
        app.screen.dismiss(str(tmp_path / "k1.toml"))
        await pilot.pause()
        assert presets.load(str(tmp_path / "k1.toml")).name == "k1" and app.screen.current_preset().name == "k1"
        app.screen.preset = replace(app.screen.preset, name="kept")  # as if k1.toml had said so
        await pilot.press("ctrl+s")
        await pilot.pause()
        app.screen.dismiss(str(tmp_path / "k1.toml"))  # the same file: its name stays
        await pilot.pause()
        assert presets.load(str(tmp_path / "k1.toml")).name == "kept"


async def test_a_heatmap_wider_than_its_pane_shows_the_lengths_that_fit_and_says_so(tmp_path):
    """Eight lengths at 80 x 24 wrapped every row onto two lines (a new-user pass): the first lengths that fit,
    and a line saying how many are shown and that f shows them all."""
    from lab.tui.charts import Heatmap

    lengths, depths = [256 * (i + 1) for i in range(8)], [0, 50, 100]
    app = make_app(tmp_path)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(app, pilot)
        await pilot.press("2")
        heatmap = app.screen.query_one(Heatmap)
        heatmap.show(lengths, depths, [[d / 100 for _ in lengths] for d in depths])
        await pilot.pause()
        lines = heatmap.render().plain.splitlines()
        assert max(map(len, lines)) <= heatmap.size.width and len(lines) == len(depths) + 3
        shown = len(lines[2].split()) - 1
        assert 1 <= shown < len(lengths) and lines[-1] == f"{shown} of 8 lengths shown; f shows all"
        await pilot.press("f")
        await pilot.pause()
        lines = heatmap.render().plain.splitlines()
        assert len(lines[2].split()) == 9 and len(lines) == len(depths) + 2
