"""Scoring of needle outputs: exact (whole words) and contained answers, the paper's 0-5 score, RULER's
fraction found."""

from __future__ import annotations

import re
import string

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")

# The paper's partial credit for its default needle (LongAlign fork): phrase -> points.
PAPER_RUBRIC = (("eat a sandwich", 1.0), ("dolores park", 0.5), ("sit in dolores park", 0.5), ("on a sunny day", 1.0))


_NOT_WORD = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """lab's: lowercase, ASCII punctuation to spaces, whitespace collapsed ("Dolores-Park" -> "dolores park")."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def paper_normalise(text: str) -> str:
    """The paper's clean_text: lowercase, every non-word character deleted, whitespace collapsed
    ("Dolores-Park" -> "dolorespark")."""
    return " ".join(_NOT_WORD.sub("", text.lower()).split())


def exact(output: str, answer: str) -> float:
    """1.0 if the normalised answer is in the normalised output as a whole word sequence ("33040" is not in
    "330400", nor "82411" in "82411rh")."""
    wanted = normalise(answer)
    return float(bool(wanted) and re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", normalise(output)) is not None)


def contains(output: str, answer: str) -> float:
    """1.0 if the normalised answer is anywhere in the normalised output."""
    return float(bool(normalise(answer)) and normalise(answer) in normalise(output))


def paper_score(output: str, answer: str, rubric=PAPER_RUBRIC) -> float:
    """0..5 as the paper's compute_score: 5 if the whole needle is in the output, else the rubric's partial
    credit, both after the paper's normalisation. The paper's "success rate" is the mean of this / 5."""
    clean, needle = paper_normalise(output), paper_normalise(answer)
    if needle and needle in clean:
        return 5.0
    return min(5.0, sum(points for phrase, points in rubric if phrase in clean))


def fraction_found(output: str, values: list[str]) -> float:
    """RULER's string_match_all: the fraction of expected values found (case-insensitive)."""
    if not values:
        return 0.0
    low = output.lower()
    return sum(v.lower() in low for v in values) / len(values)
