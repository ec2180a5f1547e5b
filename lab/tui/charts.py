"""Live charts: needle accuracy by context length, a depth x length heatmap, MMLU by category."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static
from textual_plotext import PlotextPlot

from lab.tui.grid import heat


def _fresh(widget: PlotextPlot, title: str):
    """The widget's own plot, emptied, with a title."""
    plt = widget.plt
    plt.clear_data()
    plt.clear_figure()
    plt.title(title)
    return plt


class NeedleChart(PlotextPlot):
    """One line per run: accuracy (%) against context length."""

    labels: list[str] = []

    def show(self, series: list[tuple[str, dict[str, float]]]) -> None:
        self.labels = [name for name, by_length in series if by_length]
        plt = _fresh(self, "needle accuracy by context length")
        plt.xlabel("tokens")
        plt.ylim(-5, 125)  # head room for the legend
        plt.yticks([0, 25, 50, 75, 100])
        for name, by_length in series:
            if by_length:
                xs = [int(k) for k in by_length]
                plt.plot(xs, [100 * v for v in by_length.values()], label=name[:30], marker="braille")
        lengths = sorted({int(k) for _, by_length in series for k in by_length})
        if lengths:
            plt.xticks(lengths)  # the lengths actually run
        self.refresh()


class MMLUChart(PlotextPlot):
    """Accuracy (%) per MMLU category, one bar group per run."""

    labels: list[str] = []

    def show(self, series: list[tuple[str, dict[str, float]]]) -> None:
        plt = _fresh(self, "MMLU accuracy by category")
        series = [(n, s) for n, s in series if s]
        self.labels = [n for n, _ in series]
        if series:
            categories = sorted({c for _, s in series for c in s})
            labels = [c.replace("social_sciences", "social").replace("humanities", "human.") for c in categories]
            values = [[100 * s.get(c, 0.0) for c in categories] for _, s in series]
            plt.multiple_bar(labels, values, labels=[n[:30] for n, _ in series])
            plt.ylim(0, 100)
        self.refresh()


class Heatmap(Static):
    """Needle score by depth (rows) and context length (columns), as in the paper's figures; the cells narrow
    and the lengths turn into thousands of tokens so that a row fits the widget's width."""

    LABEL = 6  # "100% "

    data: tuple = ([], [], [])

    def show(self, lengths: list[int], depths: list[float], grid: list[list[float | None]]) -> None:
        self.data = (lengths, depths, grid)
        self.update(self._draw(self.size.width))

    def on_resize(self) -> None:
        self.update(self._draw(self.size.width))

    def _draw(self, width: int) -> Text | str:
        lengths, depths, grid = self.data
        if not lengths:
            return "no needle trials yet"
        cell = max(4, min(6, (width - self.LABEL) // len(lengths)))
        thousands = any(len(str(n)) >= cell for n in lengths)
        names = [f"{n / 1000:.1f}" if thousands else str(n) for n in lengths]
        text = Text(f"score % by depth and length{' (k tokens)' if thousands else ''}\n", style="bold")
        text.append("depth".ljust(self.LABEL) + "".join(name.rjust(cell) for name in names) + "\n", style="bold")
        for depth, row in zip(depths, grid):
            text.append(f"{depth:>4g}% ")
            for value in row:
                text.append(" " * (cell - 3))
                if value is None:
                    text.append("  ·")
                else:
                    text.append(f"{100 * value:>3.0f}", style=f"black on {heat(value).name}")
            text.append("\n")
        text.rstrip()
        return text
