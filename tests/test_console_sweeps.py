"""Sweeps from the console: started from the grid as detached processes, followed through the database,
painted on the grid as an effect map, re-attached by a console opened later, cancelled with x."""

import json
import os
import re
import socket
import sys
from dataclasses import replace

import pytest
from rich.style import Style

from lab import presets
from lab.errors import LabError
from lab.interventions.sites import Site
from lab.models import ModelSpec
from lab.probes.needle import NeedleSpec
from lab.store import Store
from lab.sweeps import Options, detach
from lab.tui.app import LabApp
from lab.tui.effects import DROP, GAIN, NEUTRAL, curve, effect_colour, effect_map, legend, thinned
from lab.tui.grid import LayerGrid, heat
from lab.tui.messages import ScoresReady
from lab.tui.sweep_view import SweepChart, SweepUpdated, SweepView, grid_sweep

from conftest import tiny

SIZE = (120, 36)
NEEDLE = NeedleSpec(task="passkey", lengths=(300,), depths=(50,), mode="fast", max_new_tokens=6, batch_size=1)
# A stand-in for `lab sweep`: sleeps (its preset path on its command line, as lab's), and on SIGTERM marks the
# running sweeps cancelled, as lab does
FAKE = ("import signal, sqlite3, sys, time\n"
        "def stop(*_):\n"
        "    db = sqlite3.connect(sys.argv[2])\n"
        "    db.execute(\"UPDATE sweeps SET status = 'cancelled' WHERE status = 'running'\")\n"
        "    db.commit()\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "time.sleep(300)\n")


def make_app(tmp_path, needle=NEEDLE):
    spec = ModelSpec("random:recurrent_gemma")
    return LabApp(spec, presets.Preset(name="t", model=spec, needle=needle), Store(tmp_path / "r.sqlite"))


async def ready(app, pilot):
    await app.workers.wait_for_complete()
    await pilot.pause()


async def until(pilot, condition, what: str, tries: int = 3000):
    """Wait for `condition()` (the view's timer polls the database meanwhile); generous, never timed."""
    for _ in range(tries):
        if condition():
            await pilot.pause()  # the messages posted meanwhile are handled
            return
        await pilot.pause(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def notes(app) -> list[str]:
    return [n.message for n in app._notifications]


@pytest.fixture
def fake_sweeps(monkeypatch):
    """Sweeps started from the console run FAKE instead of `lab sweep`; every one still running at the end is
    killed. Returns the list of the launched sweeps."""
    launched, real_launch = [], detach.launch

    def command(preset_path, options, db, model):
        return [sys.executable, "-c", FAKE, str(preset_path), str(db)]

    def launch(*args):
        launched.append(real_launch(*args))
        return launched[-1]

    monkeypatch.setattr(detach, "command", command)
    monkeypatch.setattr(detach, "launch", launch)
    yield launched
    for sweep in launched:
        if detach.alive(sweep):
            os.killpg(sweep.pid, 9)


def heads(deltas: dict[int, float]) -> list[tuple]:
    """Conditions of `lab sweep --over heads --layers 2`: (label, value, difference to the base) per head."""
    return [(f"L2.attn.h{h}", [2, h], delta) for h, delta in deltas.items()]


def write_progress(db, detached, conditions: list[tuple], axis: str = "heads"):
    """What `lab sweep` writes as it goes: the sweep row, the base (2 of 4 trials right) and the finished
    `conditions` (label, value, difference to the base: 4 trials, so quarters). Returns the sweep id."""
    with Store(db) as store:
        sweep = store.open_sweep(detached.fingerprint, f"t: {axis}", detached.model, axis, {"axis": axis}, "", 5)
        for position, (label, value, delta) in enumerate([("base", None, 0.0), *conditions]):
            run = store.open_run(f"{detached.fingerprint}/{position}", f"t · {label}", detached.model,
                                 {} if value is None else {"changed": value}, "", {})
            right = round(4 * (0.5 + delta))
            store.add_trials(run, "needle", [{"key": str(i), "length": 300, "depth": 50.0, "exact": float(i < right),
                                              "score": 1.0, "correct": i < right} for i in range(4)])
            store.finish_run(run, "done")
            store.link_run(sweep, position, run, label, value, 0)
        return sweep


# ---- pure parts: the colour scale, the effect map, the chart's series, the command line --------------
def test_effect_colour_is_a_diverging_scale():
    assert effect_colour(0).triplet == NEUTRAL
    assert effect_colour(-1).triplet == DROP and effect_colour(-3).triplet == DROP
    assert effect_colour(1).triplet == GAIN
    half = effect_colour(-0.5).triplet
    assert all(min(n, d) <= h <= max(n, d) for n, h, d in zip(NEUTRAL, half, DROP)) and half not in (NEUTRAL, DROP)
    assert legend().plain.split()[-7:] == ["-100", "-50", "-25", "0", "+25", "+50", "+100"]


def condition(label, value, accuracy, delta, control=0, status="done"):
    return {"label": label, "value": value, "control": control, "status": status, "plan": {},
            "needle": {"accuracy": accuracy, "ci95": [0, 1], "delta": delta, "excludes_base": False}}


def test_effect_map_paints_finished_conditions_and_leaves_controls_out():
    anatomy = tiny("recurrent_gemma").anatomy
    result = {"axis": "heads", "base": {"needle": {"accuracy": 1.0}}, "conditions": [
        condition("L2.attn.h0", [2, 0], 0.5, -0.5), condition("L2.attn.h0 · random 1", [2, 0], 1.0, 0.0, control=1),
        condition("L2.attn.h1", [2, 1], 0.0, -1.0, status="running")]}
    assert effect_map(result, anatomy) == {Site(2, "attention", 0): -0.5}
    blocks = {"axis": "mlp-layers", "base": None, "conditions": [condition("L3.mlp", 3, 0.25, 0.25)]}
    assert effect_map(blocks, anatomy) == {Site(3, "mlp"): 0.25}
    groups = {"axis": "kv-heads", "base": None, "conditions": [condition("L5.attn.kv0", [5, 0], 0.0, -1.0)]}
    assert effect_map(groups, anatomy) == {Site(5, "attention", h): -1.0 for h in range(4)}  # 4 heads share kv 0
    assert effect_map({**groups, "axis": "k"}, anatomy) == {}  # k changes every layer: a chart, not a map


def test_k_curve_has_the_conditions_the_random_controls_and_the_base():
    result = {"axis": "k", "base": {"needle": {"accuracy": 0.9}}, "conditions": [
        condition("k=0", 0, 0.0, -0.9), condition("k=0 · random 1", 0, 0.0, -0.9, control=1),
        condition("k=2", 2, 0.5, -0.4), condition("k=2 · random 1", 2, 0.25, -0.65, control=1),
        condition("k=4", 4, 1.0, 0.1, status="running")]}
    drawn = curve(result)
    assert "the paper's curve" in drawn.title and drawn.xlabel == "k"
    assert drawn.ticks == [(0.0, "0"), (2.0, "2"), (4.0, "4")]
    lines = {name: (xs, ys) for name, xs, ys in drawn.lines}
    assert lines["k"] == ([0.0, 2.0], [0.0, 50.0])  # k = 4 still runs
    assert lines["random controls"] == ([0.0, 2.0], [0.0, 25.0])
    assert lines["base"] == ([0.0, 4.0], [90.0, 90.0])


def test_a_heads_curve_places_conditions_in_order_with_their_labels():
    result = {"axis": "heads", "base": None, "conditions": [
        condition(f"L2.attn.h{h}", [2, h], 0.5, None) for h in range(30)]}
    drawn = curve(result)
    assert drawn.xlabel == "condition" and drawn.lines[0][1] == [float(h + 1) for h in range(30)]
    assert drawn.ticks[:2] == [(1.0, "L2h0"), (2.0, "L2h1")] and len(drawn.ticks) == 30
    assert thinned(drawn.ticks, 60)[:2] == [(1, "L2h0"), (5, "L2h4")]  # 7 columns a label (L2h29, 2 spaces): every 4th
    assert len(thinned(drawn.ticks, 600)) == 30 and thinned([], 60) == []


def test_the_command_is_lab_sweep_with_the_options_and_no_remote_code(tmp_path):
    argv = detach.command(tmp_path / "p.toml", Options("k", values=(0, 2), controls=1, seed=3), tmp_path / "r.sqlite",
                          ModelSpec("toy-jamba"))
    assert argv[1:] == ["-m", "lab", "sweep", str(tmp_path / "p.toml"), "--over", "k", "--values", "0,2",
                        "--controls", "1", "--seed", "3", "--db", str(tmp_path / "r.sqlite")]
    flagged = detach.command(tmp_path / "p.toml", Options("heads", layers=(2,)), "db",
                             ModelSpec("x", trust_remote_code=True))
    assert flagged[-1] == "--trust-remote-code" and flagged[flagged.index("--layers") + 1] == "2"


def test_grid_keys_ask_for_sweeps_that_fit_the_cursor():
    anatomy = tiny("recurrent_gemma").anatomy
    assert grid_sweep("heads", anatomy, 2, "head") == (Options("heads", layers=(2,)), "heads of layer 2")
    assert grid_sweep("blocks", anatomy, 0, "ssm")[0] == Options("ssm-layers")
    assert grid_sweep("blocks", anatomy, 2, "head")[0] == Options("attention-layers")
    assert grid_sweep("k", anatomy, 0, "ssm")[0] == Options("k", controls=1)
    with pytest.raises(LabError, match="layer 0 has no attention heads"):
        grid_sweep("heads", anatomy, 0, "ssm")
    with pytest.raises(LabError, match="no sweep over moe blocks"):
        grid_sweep("blocks", anatomy, 1, "moe")


def test_the_palette_offers_every_axis():
    """Besides the grid's keys, the palette starts a sweep over any axis (keep-top with a random control)."""
    from lab.sweeps.axes import AXES
    from lab.tui.palette import COMMANDS

    anatomy = tiny("jamba").anatomy
    offered = {c.action for c in COMMANDS if c.action.startswith("sweep(")}
    assert {f"sweep('{axis}')" for axis in AXES} <= offered
    assert grid_sweep("experts", anatomy, 0, None) == (Options("experts"), "sweep over experts")
    assert grid_sweep("keep-top", anatomy, 0, None)[0] == Options("keep-top", controls=1)
    assert grid_sweep("kv-heads", anatomy, 0, None)[0] == Options("kv-heads")


def test_a_pid_file_of_another_process_or_an_ended_one_is_not_running(tmp_path):
    mine = detach.Detached(os.getpid(), "m", "f", "t", str(tmp_path / "sweeps" / "x.toml"), "", 0, socket.gethostname())
    assert not detach.alive(mine)  # this pid runs pytest, whose command line does not name the preset
    mine.pid_file.parent.mkdir()
    mine.pid_file.write_text(json.dumps(mine.__dict__))
    (mine.pid_file.parent / "junk.json").write_text("{not json")
    elsewhere = replace(mine, preset=str(tmp_path / "sweeps" / "y.toml"), host="another-host")
    elsewhere.pid_file.write_text(json.dumps(elsewhere.__dict__))
    assert detach.running(tmp_path / "r") == []
    assert not mine.pid_file.exists()  # an ended sweep's pid file is removed; other files are left alone
    assert (mine.pid_file.parent / "junk.json").exists() and elsewhere.pid_file.exists()


# ---- the console with a stand-in process ---------------------------------------------------------
async def test_a_sweep_from_the_grid_paints_its_effects_and_holds_the_model(tmp_path, fake_sweeps):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        screen, grid = app.screen, app.screen.query_one(LayerGrid)
        view = screen.query_one(SweepView)
        await pilot.press("w")  # layer 0: recurrent, no heads
        assert "layer 0 has no attention heads: sweep heads on an attention row" in notes(app) and not fake_sweeps
        grid.cursor = (2, 3)  # layer 2, head 1
        await pilot.press("w")
        (detached,) = fake_sweeps
        assert detach.running(tmp_path / "r.sqlite", "random:recurrent_gemma") == [detached]
        written = presets.load(detached.preset)
        assert written.needle == NEEDLE and written.mmlu is None and written.plan == {"mode": "zero", "phase": "both"}
        assert screen.query_one("#tabs").active == "tab-sweep" and view.running
        sweep = write_progress(tmp_path / "r.sqlite", detached, heads({0: -0.5, 1: 0.0}))
        await until(pilot, lambda: grid.effects, "the effect map")
        assert grid.effects == {Site(2, "attention", 0): -0.5, Site(2, "attention", 1): 0.0}
        line = grid.render_line(3)  # layer 2 (after the header line)
        assert any(s.style and s.style.bgcolor == Style(bgcolor=effect_colour(-0.5)).bgcolor for s in line)
        assert f"sweep #{sweep} heads of layer 2: 3/5 conditions done" in str(view.query_one("#sweep-status").render())
        assert view.query_one("#sweep-table").row_count == 3
        await pilot.press("n", "u", "w")
        assert f"a sweep is running (#{sweep}): x cancels it" in notes(app)
        assert screen.store.runs()[-1]["name"] == "t · L2.attn.h1"  # no probe run was added
        await pilot.press("x")
        await until(pilot, lambda: not view.running and view.following is None, "the end of the sweep")
        assert f"sweep #{sweep} cancelled: heads of layer 2" in notes(app)
        assert not detached.pid_file.exists() and os.path.exists(detached.log)
        assert Store(tmp_path / "r.sqlite", readonly=True).sweep(sweep)["status"] == "cancelled"


async def test_a_console_opened_later_reattaches_and_cancels(tmp_path, fake_sweeps):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.screen.query_one(LayerGrid).cursor = (5, 0)
        await pilot.press("b")  # each attention block off alone
    (detached,) = fake_sweeps
    assert detach.alive(detached)  # the console quit; the sweep runs on
    assert os.getsid(detached.pid) == detached.pid != os.getsid(0)  # in a session of its own: no SIGHUP from ours
    sweep = write_progress(tmp_path / "r.sqlite", detached, [("L2.attn", 2, -0.5)], "attention-layers")
    again = make_app(tmp_path)
    async with again.run_test(size=SIZE) as pilot:
        await ready(again, pilot)
        view, grid = again.screen.query_one(SweepView), again.screen.query_one(LayerGrid)
        assert view.following == detached and view.sweep_id == sweep
        assert "following a running sweep of random:recurrent_gemma: each attention block off alone" in notes(again)
        assert grid.effects == {Site(2, "attention"): -0.5}
        assert any(s.style and s.style.bgcolor == Style(bgcolor=effect_colour(-0.5)).bgcolor
                   for s in grid.render_line(3))  # the ATTN block of layer 2
        await pilot.press("r")
        assert f"a sweep is running (#{sweep}): x cancels it" in notes(again)
        await pilot.press("x")
        await until(pilot, lambda: view.following is None, "the end of the sweep")
        assert not detach.alive(detached)


async def test_show_a_stored_sweep_by_id(tmp_path, fake_sweeps):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        app.screen.query_one(LayerGrid).cursor = (2, 2)
        await pilot.press("w")
        (detached,) = fake_sweeps
        sweep = write_progress(tmp_path / "r.sqlite", detached, heads({0: -0.25, 3: 0.25}))
        await pilot.press("S")
        assert "a sweep is running" in notes(app)[-1]
        with Store(tmp_path / "r.sqlite") as store:
            store.finish_sweep(sweep, "done")
        os.killpg(detached.pid, 9)  # the stand-in ends as lab sweep does, its row marked done
        view = app.screen.query_one(SweepView)
        await until(pilot, lambda: view.following is None, "the end of the sweep")
        assert f"sweep #{sweep} done: heads of layer 2" in notes(app)
        app.screen.query_one(LayerGrid).set_effects({})
        await pilot.press("S")
        await pilot.pause()
        assert app.screen.query_one("#path").value == str(sweep)  # this model's latest sweep
        await pilot.press("enter")
        await pilot.pause()
        grid = app.screen.query_one(LayerGrid)
        assert grid.effects == {Site(2, "attention", 0): -0.25, Site(2, "attention", 3): 0.25}
        for text, why in (("abc", "'abc' is not a sweep id"), ("99", "no sweep 99")):
            app.screen.show_sweep(text)
            await pilot.pause()
            assert any(why in note for note in notes(app)), notes(app)


async def test_a_sweep_that_fails_at_once_says_why_in_one_line(tmp_path, monkeypatch):
    def command(preset_path, options, db, model):  # lab sweep failing on bad input: one line, exit 2
        code = "import sys; print('lab: cannot load [b]x[/b]', file=sys.stderr); sys.exit(2)"
        return [sys.executable, "-c", code, str(preset_path)]

    monkeypatch.setattr(detach, "command", command)
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        view = app.screen.query_one(SweepView)
        await pilot.press("K")
        await until(pilot, lambda: view.following is None, "the end of the process")
        (note,) = [n for n in app._notifications if "stopped before it began" in n.message]
        assert note.message.endswith("lab: cannot load [b]x[/b]") and not note.markup  # its words, as text
        assert list((tmp_path / "sweeps").glob("*.json")) == []


async def test_a_sweep_that_cannot_start_is_a_note(tmp_path):
    (tmp_path / "sweeps").write_text("a file where the sweeps folder goes")
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        await pilot.press("K")
        await pilot.pause()
        assert any(n.startswith(f"cannot start the sweep in {tmp_path / 'sweeps'}") for n in notes(app)), notes(app)
        assert app.screen.query_one(SweepView).following is None


# ---- the real thing: `lab sweep` in a process of its own ------------------------------------------
async def test_a_real_detached_sweep_charts_live_and_is_cancelled_with_x_keeping_its_trials(tmp_path):
    # 40 trials a condition: the 9 conditions after k = 0 take several seconds, so x comes before the end
    app = make_app(tmp_path, NeedleSpec(task="passkey", lengths=(300,), depths=tuple(range(0, 100, 10)), trials=4,
                                        mode="fast", max_new_tokens=6, batch_size=1))
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        view = app.screen.query_one(SweepView)
        chart = view.query_one(SweepChart)
        await pilot.press("K")  # k = 0..4 with a random control each: 11 conditions
        await until(pilot, lambda: chart.drawn and "k" in [name for name, _, _ in chart.drawn.lines], "k = 0's point")
        assert "base" in [name for name, _, _ in chart.drawn.lines] and view.running
        await pilot.press("x")
        await until(pilot, lambda: view.following is None, "the sweep process to end")
        store = Store(tmp_path / "r.sqlite", readonly=True)
        sweep = store.sweep(view.sweep_id)
        assert sweep["status"] == "cancelled" and len(sweep["runs"]) < 11
        assert sweep["runs"][0]["status"] == "done" and len(store.trials(sweep["runs"][0]["run_id"])) == 40
        assert any(f"sweep #{view.sweep_id} cancelled" in n for n in notes(app))


def y_labels(lines: list[str]) -> dict[int, int]:
    """{row: value} of a drawn chart's y axis labels."""
    return {row: int(line.split("┤")[0]) for row, line in enumerate(lines) if line[:4].strip() and "┤" in line}


@pytest.mark.parametrize("size", [(80, 24), (100, 32), (120, 36), (160, 45)])
async def test_the_sweep_charts_y_axis_reads_truly_with_100_percent_below_the_legend(tmp_path, size):
    """At 100 x 32 the legend's room pushed the y range's top to about 180: 100 and 75 fell on one row, labelled
    75, under a line at 100 %. The labels are evenly spaced, none hidden, 100 % on the 100 row, below the legend
    where the chart is tall enough."""
    from lab.tui.effects import Curve

    app = make_app(tmp_path)
    async with app.run_test(size=size) as pilot:
        await ready(app, pilot)
        await pilot.press("6")
        await pilot.pause()
        chart = app.screen.query_one(SweepChart)
        chart.show(Curve("needle by heads", "condition", [(1.0, "L2h0"), (2.0, "L2h1"), (3.0, "L2h2")],
                         [("heads", [1.0, 2.0, 3.0], [100.0, 90.0, 100.0]), ("base", [1.0, 3.0], [100.0, 100.0])]))
        lines = chart.render().plain.splitlines()
        labels = y_labels(lines)
        rows, values = zip(*sorted(labels.items()))
        assert values == tuple(range(100, -1, -100 // (len(values) - 1)))  # 100 to 0, evenly, none hidden
        assert len(values) >= 3 and len({below - row for row, below in zip(rows, rows[1:])}) == 1  # evenly apart
        top = rows[0]
        points = [row for row, line in enumerate(lines) if re.search("[⠁-⣿]", re.sub("[⠁-⣿]+ (heads|base) ", "", line))]
        assert points[0] == top  # the flat line at 100 %: no row above the 100 row holds a point
        legend = [row for row, line in enumerate(lines) if re.search("[⠁-⣿] (heads|base) ", line)]
        assert legend == [2, 3]  # below the title and the frame
        if chart.size.height >= 12:
            assert top > max(legend)


async def test_a_condition_of_one_point_is_drawn(tmp_path):
    """A line of one point (a cancelled k sweep's k = 0) drew nothing."""
    from lab.tui.effects import Curve

    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        chart = app.screen.query_one(SweepChart)
        chart.show(Curve("needle by k", "k", [(0.0, "0"), (1.0, "1")], [("k", [0.0], [0.0])]))
        assert "●" in chart.plt.build()


async def test_a_score_overlay_shows_on_the_heads_a_shown_sweep_covers(tmp_path):
    """A sweep's effect map was painted over the overlay, so o coloured none of the heads the sweep covered. The
    overlay, chosen last, shows; switched off (o cycles to off), the effect map shows again."""
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(app, pilot)
        screen, grid = app.screen, app.screen.query_one(LayerGrid)
        screen.post_message(SweepUpdated({"model": "random:recurrent_gemma", "axis": "heads", "base": None,
                                          "conditions": [condition(f"L2.attn.h{h}", [2, h], 0.5, -0.5) for h in range(4)]}))
        scores = {(layer, h): {"retrieval": h / 3, "entropy": 1.0, "needle_mass": 0.0} for layer in (2, 5) for h in range(4)}
        screen.post_message(ScoresReady("heads", scores))
        await pilot.pause()

        def backgrounds() -> set:
            return {s.style.bgcolor for s in grid.render_line(3) if s.style and s.style.bgcolor}  # layer 2's row

        effect = Style(bgcolor=effect_colour(-0.5)).bgcolor
        assert grid.effects and screen.overlay == "retrieval"
        assert {Style(bgcolor=heat(h / 3)).bgcolor for h in range(4)} <= backgrounds() and effect not in backgrounds()
        await pilot.press("o", "o", "o")  # entropy, needle_mass, off
        assert screen.overlay is None and effect in backgrounds()
