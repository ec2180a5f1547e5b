"""How the console looks (pytest-textual-snapshot), at 80x24 and 120x40, and at 16 colours and mono.
Regenerate with: pytest tests/test_snapshots.py --snapshot-update, then look at the SVGs."""

from pathlib import Path

import pytest
from rich.color import ColorSystem
from rich.segment import Segment
from rich.style import Style
from textual.filter import LineFilter

from lab import presets
from lab.models import ModelSpec
from lab.probes.needle import NeedleSpec
from lab.store import Store
from lab.tui import app as app_module
from lab.tui.app import LabApp

SIZES = pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
COLOURS = pytest.mark.parametrize("colour", ["16", "mono"])


class SixteenColours(LineFilter):
    """What a 16-colour terminal shows: every colour downgraded as rich does when it writes to one (the
    SVG export itself always writes true colour)."""

    def apply(self, segments: list[Segment], background) -> list[Segment]:
        def downgraded(style: Style | None) -> Style | None:
            if style is None or (style.color is None and style.bgcolor is None):
                return style
            return style + Style(color=style.color and style.color.downgrade(ColorSystem.STANDARD),
                                 bgcolor=style.bgcolor and style.bgcolor.downgrade(ColorSystem.STANDARD))
        return [Segment(text, downgraded(style), control) for text, style, control in segments]


class SixteenColourApp(LabApp):
    CSS_PATH = Path(app_module.__file__).with_name(LabApp.CSS_PATH)  # a relative one would be read beside this file

    def get_line_filters(self):
        return [*super().get_line_filters(), SixteenColours()]


def make_app(tmp_path, monkeypatch, colour: str = "truecolor", lengths=(300, 400)) -> LabApp:
    """The console on a tiny random model; colour as `lab --color` sets it (16: TEXTUAL_COLOR_SYSTEM=standard,
    read by textual at import; mono: NO_COLOR as well)."""
    monkeypatch.setattr("lab.summary.age", lambda seconds: "1m ago")  # run ages would differ from run to run
    monkeypatch.setattr("lab.tui.app.KEYMAP", tmp_path / "no-keymap.toml")
    if colour != "truecolor":
        monkeypatch.setattr("textual.constants.COLOR_SYSTEM", "standard")
    if colour == "mono":
        monkeypatch.setenv("NO_COLOR", "1")
    spec = ModelSpec("random:recurrent_gemma")
    preset = presets.Preset(name="snapshot", model=spec, needle=NeedleSpec(task="passkey", lengths=lengths,
                                                                            depths=(50,), mode="fast"))
    return (SixteenColourApp if colour == "16" else LabApp)(spec, preset, Store(tmp_path / "r.sqlite"))


@pytest.fixture
def app(tmp_path, monkeypatch):
    return make_app(tmp_path, monkeypatch)


async def settle(pilot):
    """Workers done, animations (the progress bar) finished, toasts gone: they expire on the clock."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.wait_for_scheduled_animations()
    pilot.app.clear_notifications()
    await pilot.pause()


async def plan_something(pilot):
    await settle(pilot)
    await pilot.press("down", "down", "right", "right", "space", "s", "minus", "p", "p")
    await settle(pilot)


async def base_then_attention_off(pilot):
    await settle(pilot)
    await pilot.press("n")
    await settle(pilot)
    await pilot.press("a", "n")
    await settle(pilot)


@SIZES
def test_grid_with_a_plan(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=plan_something)


@SIZES
def test_needle_run_compared_with_base(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=base_then_attention_off)


@COLOURS
def test_grid_with_a_plan_in_few_colours(snap_compare, tmp_path, monkeypatch, colour):
    """OFF blocks and heads differ from ON ones by colour and by ×, at 16 colours and without colour."""
    app = make_app(tmp_path, monkeypatch, colour)
    assert snap_compare(app, terminal_size=(80, 24), run_before=plan_something)


@COLOURS
def test_needle_run_compared_with_base_in_few_colours(snap_compare, tmp_path, monkeypatch, colour):
    app = make_app(tmp_path, monkeypatch, colour)
    assert snap_compare(app, terminal_size=(80, 24), run_before=base_then_attention_off)


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


@pytest.mark.parametrize("size, lengths", [((80, 24), 4), ((120, 40), 10)], ids=["80x24-4", "120x40-10"])
def test_heatmap_fits_its_lengths(snap_compare, tmp_path, monkeypatch, size, lengths):
    """The depth x length heatmap without wrapping: 4 lengths at 80x24, the paper's 10 at 120x40."""
    app = make_app(tmp_path, monkeypatch, lengths=tuple(range(300, 300 + 40 * lengths, 40)))

    async def run_before(pilot):
        await settle(pilot)
        await pilot.press("n")
        await settle(pilot)
        await pilot.press("2")
        await settle(pilot)
    assert snap_compare(app, terminal_size=size, run_before=run_before)
