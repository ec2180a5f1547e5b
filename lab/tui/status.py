"""The status line: one line of plain text cut at a word boundary, and a time-left estimate that is
smoothed and errs long (a batch slower than the average raises it at once; a faster one lowers it slowly)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.cells import cell_len, set_cell_size
from rich.text import Text
from textual.widgets import Static

ELLIPSIS = "…"


def clip(text: str, width: int) -> str:
    """`text` in `width` cells: whole when it fits, else cut after the last whole word with an ellipsis
    (mid-word only when a single word is wider than the line). A width of 0 (not laid out yet) keeps it."""
    if width <= 0 or cell_len(text) <= width:
        return text
    head = set_cell_size(text, width - 1)
    if text[len(head)] != " " and not head.endswith(" ") and " " in head.strip():
        head = head[: head.rfind(" ")]  # the word the line ends in did not fit whole
    return head.rstrip(" ,;:·") + ELLIPSIS


@dataclass(frozen=True)
class Rate:
    """Seconds per unit of work: an exponential moving average over batches, never below the last batch."""

    seconds: float | None = None
    at: float | None = None  # when the last count arrived
    done: int = 0

    SMOOTHING = 0.3  # the weight of the newest batch in the average

    def update(self, now: float, done: int) -> Rate:
        """The rate after `done` units were finished by `now` (a count that did not grow restarts the clock)."""
        if self.at is None or done <= self.done:
            return Rate(self.seconds, now, done)
        sample = (now - self.at) / (done - self.done)
        average = sample if self.seconds is None else self.SMOOTHING * sample + (1 - self.SMOOTHING) * self.seconds
        return Rate(max(sample, average), now, done)

    def left(self, total: int) -> float | None:
        """Seconds until `total` units are done, or None before the first batch."""
        return None if self.seconds is None else self.seconds * max(0, total - self.done)


def time_left(seconds: float | None) -> str:
    """', under 10 s left', ', about 3 min left': rounded up, so that it reads as a bound; '' when unknown."""
    if seconds is None:
        return ""
    if seconds < 60:
        return f", under {max(5, 5 * math.ceil(seconds / 5))} s left"
    if seconds < 3600:
        return f", about {math.ceil(seconds / 60)} min left"
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    return f", about {hours} h {minutes} min left"


class StatusLine(Static):
    """One line of status as plain text (never markup), cut to the width at a word boundary; a hint
    appended only where it fits whole."""

    def __init__(self, text: str = "", **kwargs):
        super().__init__(**kwargs)
        self.text, self.hint = text, ""

    def show(self, text: str, hint: str = "") -> None:
        self.text, self.hint = text, hint
        width = self.content_size.width
        whole = text + hint
        self.update(Text(whole if width <= 0 or cell_len(whole) <= width else clip(text, width), no_wrap=True))

    def on_resize(self) -> None:
        self.show(self.text, self.hint)
