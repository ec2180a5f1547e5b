"""How the console looks (pytest-textual-snapshot), at 80x24 and 120x40.
Regenerate with: pytest tests/test_snapshots.py --snapshot-update, then look at the SVGs."""

import pytest

from lab import presets
from lab.models import ModelSpec
from lab.probes.needle import NeedleSpec
from lab.store import Store
from lab.tui.app import LabApp

SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setattr("lab.summary.age", lambda seconds: "1m ago")  # run ages would differ from run to run
    monkeypatch.setattr("lab.tui.app.KEYMAP", tmp_path / "no-keymap.toml")
    spec = ModelSpec("random:recurrent_gemma")
    preset = presets.Preset(name="snapshot", model=spec, needle=NeedleSpec(task="passkey", lengths=(300, 400),
                                                                            depths=(50,), mode="fast"))
    return LabApp(spec, preset, Store(tmp_path / "r.sqlite"))


async def settle(pilot):
    """Workers done, animations (the progress bar) finished, toasts gone: they expire on the clock."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.wait_for_scheduled_animations()
    pilot.app.clear_notifications()
    await pilot.pause()


@SIZES
def test_grid_with_a_plan(snap_compare, app, size):
    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("down", "down", "right", "right", "space", "s", "minus", "p", "p")
        await settle(pilot)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@SIZES
def test_needle_run_compared_with_base(snap_compare, app, size):
    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("n")
        await settle(pilot)
        await pilot.press("a", "n")
        await settle(pilot)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@SIZES
def test_help(snap_compare, app, size):
    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("f1")
        await settle(pilot)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@SIZES
def test_runs_tab(snap_compare, app, size):
    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("n")
        await settle(pilot)
        await pilot.press("a", "n")
        await settle(pilot)
        await pilot.press("4")
        await settle(pilot)
    assert snap_compare(app, terminal_size=size, run_before=run_before)
