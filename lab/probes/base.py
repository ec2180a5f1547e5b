"""What a probe is to the runner: a spec to run, trials to do, and batches of them to answer.

A probe module builds prompts, answers batches under the active plan and summarises its rows; the
runner only batches, writes rows to the store and reports progress. Register a probe in
lab/probes/__init__.py.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

Answer = Callable[[list, object], list[dict]]  # (batch of items, PhaseTracker) -> one result row per item


@dataclass
class Work:
    """The trials a probe still has to run, in run order, and how to answer a batch of them."""

    items: list
    tokens: int  # the longest prompt plus its new tokens: sizes the automatic batch
    batch_size: int  # as asked for; 0 is automatic
    answer: Answer
    row_bytes: int = 0  # > 0: answer prefills a length at a time and then holds this much per item (automatic size)


@dataclass
class Prepared:
    """A probe checked against a loaded model: its trial count, and its work given the finished keys."""

    trials: int
    work: Callable[[set[str]], Work]


class Probe(Protocol):
    name: str  # the preset table and the `probe` column of the store
    spec: type  # a frozen dataclass with validate(); the preset's [name] table

    def prepare(self, loaded, spec) -> Prepared:
        """Check the spec against the model and its data up front; fail with a LabError here."""

    def summary(self, rows: list[dict]) -> dict:
        """The probe's figures from its result rows."""


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def mean_by(rows: list[dict], key: str, value: str) -> dict[str, float]:
    """The mean of `value` per distinct `key`, keys as text in sorted order, rounded to 4 places."""
    groups = defaultdict(list)
    for row in rows:
        groups[row[key]].append(row[value])
    return {(f"{k:g}" if isinstance(k, float) else str(k)): round(mean(v), 4) for k, v in sorted(groups.items())}
