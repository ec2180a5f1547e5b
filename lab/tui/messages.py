"""Messages between the console's workers, widgets and screen."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass
class ModelLoaded(Message):
    """A model loaded; with the preset (opened, or the model picked) whose plan was checked against it."""

    loaded: object
    preset: object = None
    path: str | None = None


@dataclass
class Failed(Message):
    """A worker failed with a one-line message."""

    what: str
    error: str


@dataclass
class ProbeEvent(Message):
    """A runner event (Started, Progress, Finished) from the probe worker."""

    probe: str
    event: object


@dataclass
class ScoresReady(Message):
    name: str
    scores: dict


@dataclass
class CellToggled(Message):
    """The grid asks to flip a block (head None) or a head."""

    layer: int
    kind: str
    head: int | None
