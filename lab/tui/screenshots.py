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
from lab.tui.app import LabApp, MainScreen

OUT = Path(__file__).resolve().parent.parent.parent / "screenshots"
SIZE = (120, 36)


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
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        app = LabApp(ModelSpec(model), demo_preset(model), Store(Path(tmp) / "r.sqlite"))
        async with app.run_test(size=SIZE) as pilot:
            await wait_idle(app, pilot)
            screen: MainScreen = app.screen
            await pilot.press("down", "down", "space", "right", "right", "space")
            written.append(Path(app.save_screenshot("grid.svg", str(out))))
            await pilot.press("c", "a")
            await pilot.press("n")
            await wait_idle(app, pilot)
            screen.compare = {1}
            await pilot.press("c", "n")
            await wait_idle(app, pilot)
            written.append(Path(app.save_screenshot("needle.svg", str(out))))
            screen.query_one("#tabs").active = "tab-heatmap"
            await pilot.pause()
            written.append(Path(app.save_screenshot("heatmap.svg", str(out))))
            await pilot.press("u")
            await wait_idle(app, pilot)
            written.append(Path(app.save_screenshot("mmlu.svg", str(out))))
    return written


if __name__ == "__main__":
    for path in asyncio.run(shoot()):
        print(f"wrote {path}")
