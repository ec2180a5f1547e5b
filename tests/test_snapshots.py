"""How the console looks (pytest-textual-snapshot). Regenerate with: pytest tests/test_snapshots.py --snapshot-update"""

from lab import presets
from lab.models import ModelSpec
from lab.probes.needle import NeedleSpec
from lab.store import Store
from lab.tui.app import LabApp


def make_app(tmp_path):
    spec = ModelSpec("random:recurrent_gemma")
    preset = presets.Preset(name="snapshot", model=spec, needle=NeedleSpec(task="passkey", lengths=(300,),
                                                                            depths=(50,), mode="fast"))
    return LabApp(spec, preset, Store(tmp_path / "r.sqlite"))


async def settle(pilot):
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def test_grid_with_a_plan(snap_compare, tmp_path):
    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("down", "down", "right", "right", "space", "s", "p", "p")
        await pilot.pause()
    assert snap_compare(make_app(tmp_path), terminal_size=(100, 30), run_before=run_before)


def test_help_screen(snap_compare, tmp_path):
    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("f1")
        await pilot.pause()
    assert snap_compare(make_app(tmp_path), terminal_size=(100, 30), run_before=run_before)


def test_small_terminal(snap_compare, tmp_path):
    async def run_before(pilot):
        await settle(pilot)
    assert snap_compare(make_app(tmp_path), terminal_size=(80, 24), run_before=run_before)
