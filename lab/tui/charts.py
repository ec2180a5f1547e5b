"""Live charts: needle accuracy by context length, a depth x length heatmap, MMLU by category."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static
from textual_plotext import PlotextPlot

from lab.tui.effects import effect_colour
from lab.tui.grid import heat
from lab.tui.status import clip


TITLE_MARGIN = 4  # plotext leaves out a title wider than the plot less this many cells


def chart_title(title: str, width: int, short: str | None = None) -> str:
    """`title`, or where it does not fit a chart `width` cells wide `short` (clipped if even that does not):
    plotext leaves out a title too wide, so at 80 columns the needle chart had none."""
    room = width - TITLE_MARGIN
    if width <= 0 or len(title) <= room:
        return title
    return clip(short or title, room)


def fresh_plot(widget: PlotextPlot, title: str, short: str | None = None):
    """The widget's own plot, emptied, with a title that fits it."""
    plt = widget.plt
    plt.clear_data()
    plt.clear_figure()
    plt.title(chart_title(title, widget.size.width, short))
    return plt


MONO_MARKS = ("braille", "hd", "•", "+", "x", "o")  # without colour (NO_COLOR) lines differ by their marks
MONO_POINTS = ("●", "◆", "•", "+", "x", "o")  # and lone points, a whole cell each (braille draws a speck)


def line_mark(app, line: int, single: bool = False) -> str:
    """The mark of a chart's `line`-th line: braille where colours tell lines apart, else one of MONO_MARKS each
    (the same braille in every line and legend entry left them apart by colour alone); a lone point (`single`)
    gets a whole-cell mark."""
    if app.no_color:
        return (MONO_POINTS if single else MONO_MARKS)[line % len(MONO_MARKS)]
    return "●" if single else "braille"


def y_axis(lines: int, height: int) -> tuple[float, list[int]]:
    """The top of the y range (from 0 %) and its ticks, for a chart `height` rows high under a legend of `lines`
    rows: each tick on the row of its value, 100 % below the legend and a row of margin. A short chart gives up the
    margin, then the legend's room, then ticks, never the scale (a top pushed up put 100 and 75 on one row)."""
    rows = max(height - 5, 2)  # the plot's rows, less title, x axis and its labels
    taken = next((taken for taken in (lines + 1, lines) if rows - taken >= 5), 0)
    free = max(rows - taken, 2)
    step = 25 if free >= 5 else 50 if free >= 3 else 100
    gaps = (free - 1) // (100 // step) * (100 // step)  # rows from 0 to 100 %: each tick on a row
    return 100 * (rows - 1) / gaps, list(range(0, 101, step))


class NeedleChart(PlotextPlot):
    """One line per run: accuracy (%) against context length."""

    labels: list[str] = []
    series: list[tuple[str, dict[str, float]]] = []

    def show(self, series: list[tuple[str, dict[str, float]]]) -> None:
        self.series = series
        self.labels = [name for name, by_length in series if by_length]
        plt = fresh_plot(self, "needle accuracy by context length", short="needle accuracy by length")
        plt.xlabel("tokens")
        top, ticks = y_axis(len(self.labels), self.size.height)
        plt.ylim(0, top)
        plt.yticks(ticks)
        for line, (name, by_length) in enumerate((name, s) for name, s in series if s):
            xs = [int(k) for k in by_length]
            plt.plot(xs, [100 * v for v in by_length.values()], label=name[:30], marker=line_mark(self.app, line))
        lengths = sorted({int(k) for _, by_length in series for k in by_length})
        if lengths:
            plt.xticks(lengths)  # the lengths actually run
        self.refresh()

    def on_resize(self) -> None:
        self.show(self.series)  # the legend's room depends on the height


class MMLUChart(PlotextPlot):
    """Accuracy (%) per MMLU category, one bar group per run."""

    labels: list[str] = []

    def show(self, series: list[tuple[str, dict[str, float]]]) -> None:
        plt = fresh_plot(self, "MMLU accuracy by category")
        series = [(n, s) for n, s in series if s]
        self.labels = [n for n, _ in series]
        if series:
            categories = sorted({c for _, s in series for c in s})
            labels = [c.replace("social_sciences", "social").replace("humanities", "human.") for c in categories]
            values = [[100 * s.get(c, 0.0) for c in categories] for _, s in series]
            plt.multiple_bar(labels, values, labels=[n[:30] for n, _ in series])
            for x, y in bar_tops(values):  # each bar carries its value
                plt.text(f"{y:.0f}", x=x, y=y + 4, alignment="center")
            plt.ylim(0, 130)  # room above 100 %, so the legend covers no bar
            plt.yticks([0, 25, 50, 75, 100])
        self.refresh()


def bar_tops(values: list[list[float]]) -> list[tuple[float, float]]:
    """(x, height) of every bar of plotext's multiple_bar: category i (from 1) of series s of n sits at
    i + (s + 1/2) / n - 1/2."""
    n = len(values)
    return [(i + 1 + (s + 0.5) / n - 0.5, v) for s, row in enumerate(values) for i, v in enumerate(row)]


Grid = tuple[list[int], list[float], list[list[float | None]]]


def delta_grid(current: Grid, base: Grid) -> list[list[float | None]]:
    """current's cells minus base's (None where either has no trials), on current's lengths and depths."""
    lengths, depths, grid = current
    base_cells = {(d, n): v for d, row in zip(base[1], base[2]) for n, v in zip(base[0], row)}
    return [[None if v is None or base_cells.get((d, n)) is None else v - base_cells[(d, n)]
             for n, v in zip(lengths, row)] for d, row in zip(depths, grid)]


class Heatmap(Static):
    """Needle score by depth (rows) and context length (columns), as in the paper's figures; the cells narrow
    and the lengths turn into thousands of tokens so that a row fits the widget's width (where even so not all
    fit, the first lengths and a line saying so). In delta mode the cells are differences to another run
    (points, on a diverging scale with a legend)."""

    LABEL = 6  # "100% "
    LEGEND = (-1.0, -0.5, 0.0, 0.5, 1.0)

    data: Grid = ([], [], [])
    against: str | None = None  # delta mode: the run the cells are differences to
    empty = "no needle trials yet"

    def show(self, lengths: list[int], depths: list[float], grid: list[list[float | None]],
             against: str | None = None, empty: str = "no needle trials yet") -> None:
        """Scores (0..1), or with `against` (a run's label) differences to that run (-1..1)."""
        self.data, self.against, self.empty = (lengths, depths, grid), against, empty
        self.update(self._draw(self.size.width))

    def on_resize(self) -> None:
        self.update(self._draw(self.size.width))

    def _draw(self, width: int) -> Text | str:
        lengths, depths, grid = self.data
        if not lengths:
            return Text(self.empty)
        cell = max(4, min(6, (width - self.LABEL) // len(lengths)))
        fit = min(len(lengths), max(1, (width - self.LABEL) // cell)) if width > 0 else len(lengths)
        thousands = any(len(str(n)) >= cell for n in lengths)
        names = [f"{n / 1000:.1f}" if thousands else str(n) for n in lengths[:fit]]
        what = f"Δ points vs {self.against}" if self.against else "score % by depth and length"
        title = f"{what}{' (k tokens)' if thousands else ''}"
        if width > 0 and len(title) > width:  # the units matter more than the words
            title = clip(f"{'Δ points' if self.against else 'score %'}{', k tokens' if thousands else ''}", width)
        text = Text(f"{title}\n", style="bold")
        text.append("depth".ljust(self.LABEL) + "".join(name.rjust(cell) for name in names) + "\n", style="bold")
        for depth, row in zip(depths, grid):
            text.append(f"{depth:>4g}% ")
            for value in row[:fit]:
                shown = Text("·") if value is None else self._value(value, cell)
                text.append(" " * (cell - len(shown)))
                text.append_text(shown)
            text.append("\n")
        if fit < len(lengths):
            text.append(f"{fit} of {len(lengths)} lengths shown; f shows all\n")
        if self.against:
            for value in self.LEGEND:
                text.append(" ")
                text.append_text(self._value(value, 5))
        text.rstrip()
        return text

    def _value(self, value: float, cell: int) -> Text:
        """A cell's number on its colour; a difference carries its sign (four characters wide where the cell has
        room: in cells of 4, only a difference of a whole 100 points fills the cell)."""
        if not self.against:
            return Text(f"{100 * value:>3.0f}", style=f"black on {heat(value).name}")
        number = f"{100 * value:+.0f}" if round(100 * value) else "0"
        return Text(number.rjust(3 if cell < 5 else 4), style=f"bold white on {effect_colour(value).name}")
