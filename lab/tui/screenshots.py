"""Write SVG screenshots of the console into screenshots/, headlessly: python -m lab.tui.screenshots.

Uses a tiny random model and a throwaway results database, so it needs no GPU and no download.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from lab import presets
from lab.models import ModelSpec
from lab.probes.mmlu import MMLUSpec
from lab.probes.needle import NeedleSpec
from lab.store import Store
from lab.tui.app import LabApp

OUT = Path(__file__).resolve().parent.parent.parent / "screenshots"
SIZE = (120, 40)


def demo_preset(model: str) -> presets.Preset:
    return presets.Preset(name="screenshot demo", model=ModelSpec(model),
                          needle=NeedleSpec(task="passkey", lengths=(256, 512, 768, 1024), depths=(0, 50, 100),
                                            mode="fast", batch_size=4),
                          mmlu=MMLUSpec(limit=3, shots=1))


async def wait_idle(app, pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


async def shoot(model: str = "toy-recurrentgemma", out: Path = OUT) -> list[Path]:
    """grid (a plan), needle and heatmap (attention off compared with the base run; the heatmap also as the
    difference to it), mmlu, runs."""
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name: str) -> None:
        written.append(Path(app.save_screenshot(name, str(out))))
    with tempfile.TemporaryDirectory() as tmp:
        app = LabApp(ModelSpec(model), demo_preset(model), Store(Path(tmp) / "r.sqlite"))
        async with app.run_test(size=SIZE) as pilot:
            await wait_idle(app, pilot)
            await pilot.press("down", "down", "space", "right", "right", "space", "minus")
            save("grid.svg")
            await pilot.press("c", "n")
            await wait_idle(app, pilot)
            await pilot.press("a", "n")
            await wait_idle(app, pilot)
            save("needle.svg")
            await pilot.press("2")
            await pilot.pause()
            save("heatmap.svg")
            await pilot.press("d")
            await pilot.pause()
            save("heatmap-delta.svg")
            await pilot.press("d")
            await pilot.press("c", "u")
            await wait_idle(app, pilot)
            await pilot.press("a", "u")
            await wait_idle(app, pilot)
            save("mmlu.svg")
            await pilot.press("4")
            await pilot.pause()
            save("runs.svg")
    return written


if __name__ == "__main__":
    for path in asyncio.run(shoot()):
        print(f"wrote {path}")
