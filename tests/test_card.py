"""The shipped model cards are what lab.toy.card renders from the saved measurements."""

import json

import pytest

from lab.models import load
from lab.models.loading import BUILTIN_DIR
from lab.toy import card


def _without_machine(text: str) -> list[str]:
    """The card's lines but the CPU line, which names the machine that renders it."""
    return [line for line in text.splitlines() if not line.startswith("CPU: ")]


@pytest.mark.parametrize("model", list(card.MODELS))
def test_shipped_card_is_rendered_from_saved_measurements(model):
    """Edit card.py's text, then run `python -m lab.toy.card --model M --render-only` to update the card."""
    folder = BUILTIN_DIR / model
    measured = json.loads((folder / "measured.json").read_text())
    training = json.loads((folder / "training.json").read_text())
    rendered = card.render(model, measured, training, card.attention_window(load(model)))
    assert _without_machine(rendered) == _without_machine((folder / "README.md").read_text())


def test_cards_keep_the_training_stories():
    assert "## How it was trained" in (BUILTIN_DIR / "toy-recurrentgemma" / "README.md").read_text()
    jamba = (BUILTIN_DIR / "toy-jamba" / "README.md").read_text()
    assert "## What was tried" in jamba and "letter lookup" in jamba
