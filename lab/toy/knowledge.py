"""The toy-knowledge set: made-up facts asked as four-choice questions in the MMLU layout.

`python -m lab.toy.knowledge` (re)writes lab/toy/data/toy-knowledge/{dev,val,test}/*.csv and
facts.txt, deterministically. Subject names carry their MMLU category as a prefix.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "toy-knowledge"
SPLITS = (("dev", 5), ("val", 20), ("test", 50))
_SYLLABLES = ("ka", "lo", "mi", "ren", "tor", "vel", "zan", "qui", "bar", "sol", "dri", "fen", "gal", "hob",
              "jun", "mar", "nor", "pel", "ruk", "sef", "tam", "ulo", "vor", "wix", "yel")

# subject -> (question, fact sentence, answer pool)
SUBJECTS = {
    "stem__toy_minerals": ("Which colour does the mineral {x} glow when heated?",
                           "The mineral {x} glows {a} when heated.",
                           ("red", "green", "blue", "yellow", "violet", "orange", "white", "pink")),
    "humanities__toy_treaties": ("In which year was the treaty of {x} signed?",
                                 "The treaty of {x} was signed in {a}.",
                                 tuple(str(y) for y in range(1702, 1998, 7))),
    "social_sciences__toy_capitals": ("What is the capital of {x}?", "The capital of {x} is {a}.", None),
    "other__toy_guilds": ("Which guild makes {x} lamps?", "{X} lamps are made by the {a} guild.",
                          ("weavers", "smiths", "potters", "glaziers", "tanners", "masons", "coopers", "dyers")),
}


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in used:
            used.add(name)
            return name


def build(seed: int = 0) -> dict[str, list[tuple[str, list[str], int, str]]]:
    """subject -> [(question, choices, answer index, fact)] for dev+val+test in order."""
    rng = random.Random(seed)
    used: set[str] = set()
    cities = tuple(_name(rng, used) for _ in range(40))
    total = sum(n for _, n in SPLITS)
    out = {}
    for subject, (question, fact, pool) in SUBJECTS.items():
        pool = pool or cities
        items = []
        for _ in range(total):
            x = _name(rng, used)
            choices = rng.sample(pool, 4)
            answer = rng.randrange(4)
            a = choices[answer]
            items.append((question.format(x=x), choices, answer, fact.format(x=x, X=x, a=a)))
        out[subject] = items
    return out


def write(root: Path = OUT, seed: int = 0) -> None:
    data = build(seed)
    facts = []
    for subject, items in data.items():
        start = 0
        for split, n in SPLITS:
            folder = root / split
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / f"{subject}_{split}.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                for question, choices, answer, _ in items[start:start + n]:
                    writer.writerow([question, *choices, "ABCD"[answer]])
            start += n
        facts += [fact for *_, fact in items]
    (root / "facts.txt").write_text("\n".join(facts) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write()
    print(f"wrote {OUT}")
