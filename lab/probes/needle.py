"""Needle-in-a-haystack probes: the paper's sentence needle, passkey, and RULER-style key/value needles.

Prompts are built to an exact token length (pieces tokenised separately and concatenated as ids),
so prompts of one length batch without padding. The needle goes at a depth percentage, moved back
to the nearest sentence boundary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from lab.errors import LabError
from lab.models.generation import greedy, teacher_forced
from lab.probes import scoring
from lab.probes.base import Prepared, Work, mean, mean_by
from lab.probes.haystack import sentence_stream

TASKS = ("sentence", "passkey", "multikey", "multivalue", "multiquery")
MODES = ("generate", "fast")
PAPER_LENGTHS = (250, 677, 1105, 1532, 1959, 2387, 2814, 3241, 3669, 4096)
PAPER_DEPTHS = (0, 11, 22, 33, 44, 56, 67, 78, 89, 100)
PAPER_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
PAPER_QUESTION = "What is the best thing to do in San Francisco?"
PAPER_ANSWER_PREFIX = "Here is the most relevant sentence in the context:"
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
RULER_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.")
_KEY_WORDS = ("amber", "brisk", "cobalt", "dusty", "eager", "frosty", "golden", "hollow", "ivory", "jolly",
              "kind", "lunar", "misty", "noble", "olive", "plain", "quick", "rapid", "sandy", "tender")
_KEY_NOUNS = ("anchor", "badger", "canyon", "dragon", "ember", "falcon", "glacier", "harbor", "island", "jungle",
              "kettle", "ladder", "meadow", "nickel", "oyster", "pepper", "quartz", "raven", "saddle", "tunnel")
CTX = object()  # marks where the haystack goes in a list of prompt pieces
MAX_TOKENS = 1_048_576  # longest prompt plus answer lab builds, whatever the model
RULER_TASKS = ("multikey", "multivalue", "multiquery")
MAX_KEYS = len(_KEY_WORDS) * len(_KEY_NOUNS)  # distinct RULER keys


@dataclass(frozen=True)
class NeedleSpec:
    task: str = "sentence"
    lengths: tuple[int, ...] = PAPER_LENGTHS
    depths: tuple[float, ...] = PAPER_DEPTHS
    trials: int = 1
    mode: str = "generate"  # generate: greedy with cache; fast: teacher-forced, every answer token greedy
    max_new_tokens: int = 40
    chat: bool = False  # wrap in the tokenizer's chat template (instruct models)
    jrt: bool = False  # just-read-twice: the context block appears twice
    haystack: str = "generated"  # or a .txt file / folder of the user's own text
    seed: int = 0
    needle: str = PAPER_NEEDLE
    question: str = PAPER_QUESTION
    answer_prefix: str = PAPER_ANSWER_PREFIX
    keys: int = 4  # RULER: needles per prompt (keys, values or queries)
    batch_size: int = 0  # 0: automatic (halved and retried on out-of-memory)

    def validate(self) -> NeedleSpec:
        if self.task not in TASKS:
            raise LabError(f"needle.task: {self.task!r} is not one of {', '.join(TASKS)}")
        if self.mode not in MODES:
            raise LabError(f"needle.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise LabError("needle.lengths: give positive token counts")
        if not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise LabError("needle.depths: give percentages between 0 and 100")
        if self.trials < 1 or self.batch_size < 0 or self.max_new_tokens < 1 or self.keys < 1:
            raise LabError("needle: trials, max_new_tokens and keys must be at least 1, batch_size >= 0 (0: auto)")
        if max(self.lengths) + self.max_new_tokens > MAX_TOKENS:
            raise LabError(f"needle: length {max(self.lengths)} + {self.max_new_tokens} new tokens is above lab's "
                           f"limit of {MAX_TOKENS:,} tokens")
        if self.task in RULER_TASKS and self.keys > MAX_KEYS:
            raise LabError(f"needle.keys: {self.keys} is more than the {MAX_KEYS} keys task {self.task} has")
        self._check_distinct()
        return self

    def _check_distinct(self) -> None:
        """Two lengths or depths that make the same trial key would run once and count as done forever."""
        twice = sorted({n for n in self.lengths if self.lengths.count(n) > 1})
        if twice:
            raise LabError(f"needle.lengths: {twice[0]} appears twice")
        seen: dict[str, float] = {}
        for depth in self.depths:
            label = depth_label(depth)
            if label in seen:
                raise LabError(f"needle.depths: {seen[label]} and {depth} are the same trial (d{label}); "
                               "give distinct depths")
            seen[label] = depth

    def cells(self) -> list[tuple[int, float, int]]:
        return [(n, d, t) for n in self.lengths for d in self.depths for t in range(self.trials)]


@dataclass
class Trial:
    key: str
    length: int
    depth: float
    index: int
    ids: list[int]
    answer: str  # text expected right after the prompt
    values: list[str]  # what must appear in the output
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of the real needle
    contexts: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each context copy


def depth_label(depth: float) -> str:
    """A depth as trial keys write it (6 significant digits: 50.00001 is 50)."""
    return f"{depth:g}"


def trial_key(task: str, length: int, depth: float, index: int) -> str:
    return f"{task}/L{length}/d{depth_label(depth)}/t{index}"


def check_fits(spec: NeedleSpec, loaded) -> None:
    """Raise LabError when the longest prompt plus its answer exceeds the model's declared positions.

    A prompt is exactly its length, JRT's two context copies included. Models that declare no
    max_position_embeddings (RecurrentGemma: local attention in a window) are not limited here."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    longest = max(spec.lengths)
    if isinstance(limit, int) and limit > 0 and longest + spec.max_new_tokens > limit:
        raise LabError(f"needle: length {longest} + {spec.max_new_tokens} new tokens is more than the model's "
                       f"{limit} positions (max_position_embeddings); use shorter lengths")


class PromptBuilder:
    """Builds exact-length prompts for one tokenizer."""

    def __init__(self, tokenizer, spec: NeedleSpec):
        self.tok, self.spec = tokenizer, spec.validate()
        probe = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and probe and probe[0] == bos and not spec.chat else []
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def _needles(self, rng: random.Random) -> tuple[list[str], list[str], str, str, str, str]:
        """(real needles, distractors, intro, question, answer line, expected answer)."""
        spec = self.spec
        if spec.task == "sentence":
            return ([spec.needle], [], "CONTEXT:", f"\n\nQUESTION: {spec.question}\n\n",
                    f"ANSWER: {spec.answer_prefix}", " " + spec.needle)
        if spec.task == "passkey":
            key = str(rng.randint(10000, 99999))
            return ([f"The pass key is {key}. Remember it. {key} is the pass key."], [], PASSKEY_INTRO,
                    "\nWhat is the pass key?", " The pass key is", f" {key}")
        keys = rng.sample([f"{a}-{n}" for a in _KEY_WORDS for n in _KEY_NOUNS], spec.keys)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(spec.keys)]
        line = "One of the special magic numbers for {} is: {}."
        if spec.task == "multikey":
            real, distract = [line.format(keys[0], values[0])], [line.format(k, v) for k, v in zip(keys[1:], values[1:])]
            asked, answer = keys[0], f" {values[0]}"
            question = f"\nWhat is the special magic number for {asked} mentioned in the provided text?"
            return real, distract, RULER_INTRO, question, f" The special magic number for {asked} mentioned in the provided text is", answer
        if spec.task == "multivalue":
            real = [line.format(keys[0], v) for v in values]
            asked = keys[0]
        else:  # multiquery
            real = [line.format(k, v) for k, v in zip(keys, values)]
            asked = ", ".join(keys[:-1]) + (" and " if len(keys) > 1 else "") + keys[-1]
        question = f"\nWhat are all the special magic numbers for {asked} mentioned in the provided text?"
        return (real, [], RULER_INTRO, question,
                f" The special magic numbers for {asked} mentioned in the provided text are", " " + ", ".join(values))

    def _pieces(self, intro: str, question: str, answer_line: str) -> list:
        block = [intro, CTX, question]
        body = block * 2 if self.spec.jrt else block
        if not self.spec.chat:
            return body + [answer_line]
        if not getattr(self.tok, "chat_template", None):
            raise LabError("needle.chat = true, but the tokenizer has no chat template")
        mark = "\u241f"
        content = "".join(mark if p is CTX else p for p in body).strip()
        text = self.tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)
        parts = text.split(mark)
        pieces: list = []
        for i, part in enumerate(parts):
            pieces += ([CTX] if i else []) + [part]
        return pieces + [answer_line.lstrip()]

    def build(self, length: int, depth: float, index: int) -> Trial:
        spec = self.spec
        rng = random.Random(f"{spec.seed}/{spec.task}/{length}/{depth}/{index}")
        real, distract, intro, question, answer_line, answer = self._needles(rng)
        pieces = self._pieces(intro, question, answer_line)
        copies = sum(p is CTX for p in pieces)
        fixed = len(self.bos) + sum(len(self.encode(p)) for p in pieces if p is not CTX)
        needles = [(self.encode(" " + n), True) for n in real] + [(self.encode(" " + n), False) for n in distract]
        needle_tokens = sum(len(ids) for ids, _ in needles)
        budget, spare = divmod(length - fixed - copies * needle_tokens, copies)
        if budget < 0:
            raise LabError(f"needle: context length {length} is too short for task {spec.task} "
                           f"(needs at least {fixed + copies * needle_tokens} tokens)")
        hay, bounds = self._haystack(budget + spare, rng)
        context = self._insert(hay[:budget], [b for b in bounds if b <= budget], needles, depth, rng)
        ids, spans, contexts = list(self.bos), [], []
        for piece in pieces:
            if piece is CTX:
                offset = len(ids)
                ids += context[0]
                spans += [(offset + s, offset + e) for s, e in context[1]]
                contexts.append((offset, len(ids)))
            else:
                ids += self.encode(piece)
        if spare:  # odd leftover from splitting the budget between JRT copies: pad the first context
            first = pieces.index(CTX)
            at = len(self.bos) + sum(len(self.encode(p)) for p in pieces[:first])
            ids[at:at] = hay[budget:budget + spare]
            spans = [(s + spare, e + spare) for s, e in spans]
            contexts = [(contexts[0][0], contexts[0][1] + spare)] + [(s + spare, e + spare) for s, e in contexts[1:]]
        assert len(ids) == length, (len(ids), length)
        values = [answer.strip()] if spec.task in ("sentence", "passkey", "multikey") else answer.strip().split(", ")
        return Trial(trial_key(spec.task, length, depth, index), length, depth, index, ids, answer, values, spans,
                     contexts)

    def _haystack(self, budget: int, rng: random.Random) -> tuple[list[int], list[int]]:
        ids, bounds = [], [0]
        stream = sentence_stream(self.spec.haystack, rng.randint(0, 2**31))
        while len(ids) < budget:
            ids += self.encode(" " + next(stream))
            bounds.append(len(ids))
        return ids[:budget], bounds

    def _insert(self, hay, bounds, needles, depth, rng):
        """Put the real needle(s) at `depth` (then evenly after it), distractors at random boundaries."""
        real = [ids for ids, is_real in needles if is_real]
        fake = [ids for ids, is_real in needles if not is_real]
        n = len(hay)
        wanted = [depth + (100 - depth) * i / len(real) for i in range(len(real))]
        places = [(n if d >= 100 else max(b for b in bounds if b <= int(n * d / 100)), ids, True)
                  for d, ids in zip(wanted, real)]
        places += [(rng.choice(bounds), ids, False) for ids in fake]
        out, spans, last = [], [], 0
        for at, ids, is_real in sorted(places, key=lambda p: (p[0], not p[2])):
            out += hay[last:at]
            if is_real:
                spans.append((len(out), len(out) + len(ids)))
            out += ids
            last = at
        out += hay[last:]
        return out, spans


def score(trial: Trial, output: str, task: str) -> dict:
    """exact (0/1), score (0..1) and, for the sentence task, the paper's 0..5 score."""
    found = scoring.fraction_found(output, trial.values)
    result = {"exact": float(found == 1.0), "score": found}
    if task == "sentence":
        paper = scoring.paper_score(output, trial.values[0])
        result.update(exact=scoring.exact(output, trial.values[0]), score=paper / 5, paper_score=paper)
    return result


@torch.inference_mode()
def run_batch(loaded, spec: NeedleSpec, trials: list[Trial], tracker) -> list[dict]:
    """Answer a batch of trials (of any lengths) under the active plan; return one result row each."""
    tok = loaded.tokenizer
    tracker.needles = {tuple(t.ids): t.needle_spans for t in trials}  # where a plan's needle-attention op acts
    if spec.mode == "generate":
        tracker.prompt_len = None  # the prefill call defines the prompt
        answers = greedy(loaded, [t.ids for t in trials], spec.max_new_tokens, static=tracker.phase == "both")
        outputs = [tok.decode(ids, skip_special_tokens=True) for ids in answers]
    else:
        answers = [tok(t.answer, add_special_tokens=False)["input_ids"] for t in trials]
        preds = teacher_forced(loaded, [t.ids for t in trials], answers, tracker)
        outputs = [tok.decode(p[:len(a)], skip_special_tokens=True) for p, a in zip(preds, answers)]
        # Teacher forcing shows the model the answer, so text containment would reward copying the input:
        # a trial passes only if every answer token is the greedy choice.
        matched = [sum(x == y for x, y in zip(p, a)) / len(a) for p, a in zip(preds, answers)]
    rows = []
    for i, (trial, output) in enumerate(zip(trials, outputs)):
        scores = score(trial, output, spec.task) if spec.mode == "generate" else \
            {"exact": float(matched[i] == 1.0), "score": matched[i]}
        rows.append({"key": trial.key, "length": trial.length, "depth": trial.depth, "trial": trial.index,
                     "output": output, "answer": trial.answer.strip(), **scores})
    return rows


def summary(rows: list[dict]) -> dict:
    return {"accuracy": round(mean(r["exact"] for r in rows), 4), "score": round(mean(r["score"] for r in rows), 4),
            "trials": len(rows), "by_length": mean_by(rows, "length", "exact"),
            "by_depth": mean_by(rows, "depth", "exact")}


class NeedleProbe:
    name, spec = "needle", NeedleSpec
    summary = staticmethod(summary)

    def prepare(self, loaded, spec: NeedleSpec) -> Prepared:
        check_fits(spec, loaded)
        builder = PromptBuilder(loaded.tokenizer, spec)
        builder.build(min(spec.lengths), 0, 0)  # a length too short for the prompt fails here, up front
        cells = spec.cells()

        def answer(batch, tracker):
            return run_batch(loaded, spec, [builder.build(*cell) for cell in batch], tracker)

        def work(done: set[str]) -> Work:
            todo = sorted((c for c in cells if trial_key(spec.task, *c) not in done), key=lambda cell: cell[0])
            # a batch may span lengths: run_batch prefills each length apart
            return Work(todo, max((n for n, _, _ in todo), default=0) + spec.max_new_tokens, spec.batch_size, answer)

        return Prepared(len(cells), work)
