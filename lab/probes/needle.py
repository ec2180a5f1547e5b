"""Needle-in-a-haystack probes: the paper's sentence needle, passkey, and RULER-style key/value needles.

Prompts are built to an exact token length (pieces tokenised separately and concatenated as ids),
so prompts of one length batch without padding. The needle goes at a depth percentage, moved back
to the nearest sentence boundary.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from lab.errors import LabError
from lab.models.generation import decode_row_bytes, greedy, teacher_forced
from lab.probes import scoring
from lab.probes.base import Prepared, Work, mean, mean_by
from lab.probes.haystack import sentence_stream

TASKS = ("sentence", "passkey", "multikey", "multivalue", "multiquery")
MODES = ("generate", "fast")
JRT_FORMS = ("split", "repeat")  # split: the copies share the length (lab); repeat: the whole block twice (the paper)
LENGTH_COUNTS = ("prompt", "context")  # what length - buffer counts: the whole prompt (lab), haystack + needles (paper)
NEEDLE_WRAPS = {"space": " {}", "newline": "\n{}\n"}  # how a needle sits in the haystack; newline: the paper's
PHASE_BOUNDARIES = ("prompt", "last-prompt-token")  # last-prompt-token: the paper's RecurrentGemma sampler
HAYSTACK_DRAWS = ("cell", "trial")  # a generated haystack per (length, depth, trial), or one per trial (the paper's)
FORMATS = ("lab", "ruler")  # ruler: RULER's niah templates, needles at random depths, new tokens inside the length
RULER_DEPTHS = tuple(round(100 * i / 39) for i in range(40))  # RULER's np.round(np.linspace(0, 100, 40))
# options added after stored runs' fingerprints were pinned: at their default they stay out of the fingerprint
LATER_OPTIONS = ("jrt_form", "length_counts", "buffer", "needle_wrap", "instruction", "answer_line", "phase_boundary",
                 "format", "haystack_per")
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
MAX_TRIALS = 1_000_000  # one probe's trials: a grid beyond this is a typo, not an experiment
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
    jrt_form: str = "split"  # split: the two copies share the length; repeat: the full context block twice (paper)
    length_counts: str = "prompt"  # length - buffer tokens are the whole prompt, or haystack + needles (paper)
    buffer: int = 0  # tokens kept out of the length (the paper: 200)
    needle_wrap: str = "space"  # " needle" or "\nneedle\n" (the paper)
    instruction: str = ""  # appended to the last question (the paper's Jamba chat prompt)
    answer_line: bool = True  # end with the answer line (chat: pre-filled after the generation prompt)
    phase_boundary: str = "prompt"  # last-prompt-token: the last prompt token is the first generation step (paper)
    format: str = "lab"  # ruler: RULER's niah prompts exactly (RULER tasks only; the depth axis only seeds the draw)
    haystack_per: str = "cell"  # generated text drawn per cell, or per trial: one text cut to every length and depth

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(map(canonical_depth, self.depths)))

    def validate(self) -> NeedleSpec:
        for name, allowed in (("task", TASKS), ("mode", MODES), ("jrt_form", JRT_FORMS),
                              ("length_counts", LENGTH_COUNTS), ("needle_wrap", tuple(NEEDLE_WRAPS)),
                              ("phase_boundary", PHASE_BOUNDARIES), ("format", FORMATS),
                              ("haystack_per", HAYSTACK_DRAWS)):
            if getattr(self, name) not in allowed:
                raise LabError(f"needle.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.buffer < 0:
            raise LabError("needle.buffer: give a token count >= 0")
        if self.format == "ruler" and self.task not in RULER_TASKS:
            raise LabError(f"needle.format: ruler is for the tasks {', '.join(RULER_TASKS)}, not {self.task}")
        if not self.lengths or any(n <= 0 for n in self.lengths):
            raise LabError("needle.lengths: give positive token counts")
        if not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise LabError("needle.depths: give percentages between 0 and 100")
        if self.trials < 1 or self.batch_size < 0 or self.max_new_tokens < 1 or self.keys < 1:
            raise LabError("needle: trials, max_new_tokens and keys must be at least 1, batch_size >= 0 (0: auto)")
        if max(self.lengths) + self.max_new_tokens > MAX_TOKENS:
            raise LabError(f"needle: length {max(self.lengths)} + {self.max_new_tokens} new tokens is above lab's "
                           f"limit of {MAX_TOKENS:,} tokens")
        cells = len(self.lengths) * len(self.depths) * self.trials
        if cells > MAX_TRIALS:
            raise LabError(f"needle: {cells:,} trials (lengths x depths x trials) is above lab's limit of "
                           f"{MAX_TRIALS:,}; use fewer trials")
        if not self.haystack.strip():
            raise LabError('needle.haystack is empty: "generated", or a .txt file or folder')
        for name in ("needle", "question"):  # the sentence task's: an empty answer is never recalled
            if self.task == "sentence" and not getattr(self, name).strip():
                raise LabError(f"needle.{name} is empty: the sentence task hides the needle and asks the question")
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

    def unhashed(self) -> list[str]:
        """Options added after fingerprints were pinned that are at their default (Preset.fingerprint drops them)."""
        return [name for name in LATER_OPTIONS if getattr(self, name) == NeedleSpec.__dataclass_fields__[name].default]


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


def canonical_depth(depth: float) -> float:
    """A whole-number depth as an int (50.0 -> 50), as preset files write it: prompts are seeded by the depth's
    text and results hashed with it, so the console's 50.0 and a file's 50 must be one depth."""
    return int(depth) if isinstance(depth, float) and depth.is_integer() else depth


def depth_label(depth: float) -> str:
    """A depth as trial keys write it (6 significant digits: 50.00001 is 50)."""
    return f"{depth:g}"


def trial_key(task: str, length: int, depth: float, index: int) -> str:
    return f"{task}/L{length}/d{depth_label(depth)}/t{index}"


def check_fits(spec: NeedleSpec, loaded, longest: int | None = None) -> None:
    """Raise LabError when the longest prompt plus its answer exceeds the model's declared positions.

    `longest` is the longest prompt as built (a paper-form JRT prompt is about twice its length);
    by default max(lengths), which a prompt counted by the "prompt" rule never exceeds. Models that
    declare no max_position_embeddings (RecurrentGemma: local attention in a window) are not limited here."""
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    length = max(spec.lengths)
    longest = length if longest is None else longest
    if isinstance(limit, int) and limit > 0 and longest + spec.max_new_tokens > limit:
        what = f"length {length}" if longest == length else f"length {length} (a prompt of {longest} tokens)"
        raise LabError(f"needle: {what} + {spec.max_new_tokens} new tokens is more than the model's "
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
            if spec.format == "ruler":
                return real, distract, *_ruler_text(False, asked), answer
            question = f"\nWhat is the special magic number for {asked} mentioned in the provided text?"
            return real, distract, RULER_INTRO, question, f" The special magic number for {asked} mentioned in the provided text is", answer
        if spec.task == "multivalue":
            real = [line.format(keys[0], v) for v in values]
            asked = keys[0]
        else:  # multiquery
            real = [line.format(k, v) for k, v in zip(keys, values)]
            asked = ", ".join(keys[:-1]) + (" and " if len(keys) > 1 else "") + keys[-1]
        if spec.format == "ruler":
            return (real, [], *_ruler_text(len(keys) > 1, _ruler_query(keys) if spec.task == "multiquery" else asked),
                    " " + ", ".join(values))
        question = f"\nWhat are all the special magic numbers for {asked} mentioned in the provided text?"
        return (real, [], RULER_INTRO, question,
                f" The special magic numbers for {asked} mentioned in the provided text are", " " + ", ".join(values))

    def _pieces(self, intro: str, question: str, answer_line: str, copies: int) -> list:
        """The prompt as text pieces and CTX marks: [intro, CTX, question] per copy, the instruction after
        the last question, then the answer line (chat: the user turn, the generation prompt, the answer line)."""
        body = [intro, CTX, question] * copies
        if self.spec.instruction:
            core = body[-1].rstrip()
            body[-1] = core + " " + self.spec.instruction + body[-1][len(core):]
        tail = [answer_line] if self.spec.answer_line else []
        if not self.spec.chat:
            return body + tail
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
        return pieces + [line.lstrip() for line in tail]

    def _fixed(self, pieces: list) -> int:
        """Tokens of a prompt outside its contexts (BOS included)."""
        return len(self.bos) + sum(len(self.encode(p)) for p in pieces if p is not CTX)

    def build(self, length: int, depth: float, index: int) -> Trial:
        spec = self.spec
        rng = random.Random(f"{spec.seed}/{spec.task}/{length}/{canonical_depth(depth)}/{index}")
        real, distract, intro, question, answer_line, answer = self._needles(rng)
        copies = 2 if spec.jrt else 1
        pieces = self._pieces(intro, question, answer_line, copies)
        if (spec.chat and not spec.answer_line) or pieces[-1][-1:].isspace():
            answer = answer.lstrip()  # the answer starts a fresh turn, or the prompt ends with its space
        wrap = NEEDLE_WRAPS[spec.needle_wrap]
        needles = [(self.encode(wrap.format(n)), True) for n in real] + \
                  [(self.encode(wrap.format(n)), False) for n in distract]
        needle_tokens = sum(len(ids) for ids, _ in needles)
        shares = copies if spec.jrt_form == "split" else 1  # contexts that share the length
        target = length - spec.buffer - (spec.max_new_tokens if spec.format == "ruler" else 0)  # RULER: answer inside
        room = target
        if spec.length_counts == "prompt":
            room -= self._fixed(pieces if shares == copies else self._pieces(intro, question, answer_line, 1))
        budget, spare = divmod(room - shares * needle_tokens, shares)
        if budget < 0:
            raise LabError(f"needle: context length {length} is too short for task {spec.task} "
                           f"(needs at least {length - room + shares * needle_tokens} tokens)")
        hay, bounds = self._haystack(budget + spare, rng, index)
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
        if spec.length_counts == "prompt" and shares == copies:
            assert len(ids) == target, (len(ids), target)
        values = [answer.strip()] if spec.task in ("sentence", "passkey", "multikey") else answer.strip().split(", ")
        return Trial(trial_key(spec.task, length, depth, index), length, depth, index, ids, answer, values, spans,
                     contexts)

    def _haystack(self, budget: int, rng: random.Random, index: int) -> tuple[list[int], list[int]]:
        ids, bounds = [], [0]
        if self.spec.haystack_per == "trial":  # one text for the trial's every length and depth, as the paper's essays
            rng = random.Random(f"{self.spec.seed}/{self.spec.task}/haystack/{index}")
        stream = sentence_stream(self.spec.haystack, rng.randint(0, 2**31))
        ruler = self.spec.format == "ruler"
        while len(ids) < budget:
            piece = next(stream)
            if ruler:  # RULER's essay: whitespace collapsed, the context starts right after the intro's newline
                piece = re.sub(r"\s+", " ", piece)
                piece = piece.lstrip(" ") if not ids else piece
            ids += self.encode(piece)
            bounds.append(len(ids))
        return ids[:budget], bounds

    def _insert(self, hay, bounds, needles, depth, rng):
        """Put the real needle(s) at `depth` (then evenly after it), distractors at random boundaries; RULER:
        every needle, in shuffled order, after the sentence at one of RULER's depths drawn without replacement."""
        if self.spec.format == "ruler":
            needles = rng.sample(needles, len(needles))
            depths = sorted(rng.sample(RULER_DEPTHS, len(needles)))
            places = [(bounds[int((len(bounds) - 1) * d / 100)], ids, is_real) for d, (ids, is_real) in zip(depths, needles)]
        else:
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


def _ruler_text(plural: bool, query: str) -> tuple[str, str, str]:
    """(intro, question, answer line) of RULER's niah template (scripts/data/synthetic/constants.py), made
    singular as niah.py does when one value is asked for."""
    kind, are = ("numbers", "are") if plural else ("number", "is")
    intro = (f"{'Some' if plural else 'A'} special magic {kind} {are} hidden within the following text. "
             f"Make sure to memorize it. I will quiz you about the {kind} afterwards.\n")
    question = f"\nWhat {'are all' if plural else 'is'} the special magic {kind} for {query} mentioned in the provided text?"
    return intro, question, f" The special magic {kind} for {query} mentioned in the provided text {are}"


def _ruler_query(keys: list[str]) -> str:
    """RULER's list of asked keys: 'a, b, and c' (its Oxford comma, also for two: 'a, and b')."""
    return ", ".join(keys[:-1]) + ", and " + keys[-1] if len(keys) > 1 else keys[0]


def score(trial: Trial, output: str, task: str) -> dict:
    """exact (0/1: every value as whole words), contains (0/1: every value anywhere), score (0..1: RULER's fraction
    found) and, for the sentence task, the paper's 0..5 score (score: its fifth)."""
    found = scoring.fraction_found(output, trial.values)
    result = {"exact": float(all(scoring.exact(output, value) for value in trial.values)),
              "contains": float(all(scoring.contains(output, value) for value in trial.values)), "score": found}
    if task == "sentence":
        paper = scoring.paper_score(output, trial.values[0])
        result.update(score=paper / 5, paper_score=paper)
    return result


@torch.inference_mode()
def run_batch(loaded, spec: NeedleSpec, trials: list[Trial], tracker) -> list[dict]:
    """Answer a batch of trials (of any lengths) under the active plan; return one result row each. With the
    paper's phase boundary each prompt's last token counts as a generation step, for the plan's hooks and its
    needle op alike, as the paper's sampler feeds it."""
    tok = loaded.tokenizer
    tracker.needles = {tuple(t.ids): t.needle_spans for t in trials}  # where a plan's needle-attention op acts
    tracker.early = int(spec.phase_boundary == "last-prompt-token")
    try:
        if spec.mode == "generate":
            tracker.prompt_len = None  # each length's prefill call defines its prompt
            answers = greedy(loaded, [t.ids for t in trials], spec.max_new_tokens, static=True, tracker=tracker)
            outputs = [tok.decode(ids, skip_special_tokens=True) for ids in answers]
        else:
            answers = [tok(t.answer, add_special_tokens=False)["input_ids"] for t in trials]
            preds = teacher_forced(loaded, [t.ids for t in trials], answers, tracker)
            outputs = [tok.decode(p[:len(a)], skip_special_tokens=True) for p, a in zip(preds, answers)]
            # Teacher forcing shows the model the answer, so text containment would reward copying the input:
            # a trial passes only if every answer token is the greedy choice.
            matched = [sum(x == y for x, y in zip(p, a)) / len(a) for p, a in zip(preds, answers)]
    finally:
        tracker.early = 0
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


def prepared(loaded, spec: NeedleSpec, answer_trials, fixed_buffers: bool = False) -> Prepared:
    """The needle grid checked against the model up front (prompts buildable, positions enough), its trials in
    length order, each batch answered by answer_trials(loaded, spec, trials, tracker): the needle probe's and
    head scoring's work. fixed_buffers: answer_trials decodes with lab's fixed-buffer decoder where one takes the
    model (bigger automatic batches)."""
    builder = PromptBuilder(loaded.tokenizer, spec)
    first = builder.build(min(spec.lengths), 0, 0)  # a length too short for the prompt fails here, up front
    answer = len(loaded.tokenizer(first.answer, add_special_tokens=False)["input_ids"])
    if spec.mode == "generate" and answer > spec.max_new_tokens:
        raise LabError(f"max_new_tokens: {spec.max_new_tokens} new tokens cannot hold the answer ({answer} tokens), "
                       "so every trial would fail")
    longest = len(builder.build(max(spec.lengths), 0, 0).ids)
    check_fits(spec, loaded, longest)
    cells = spec.cells()

    def answer(batch, tracker):
        return answer_trials(loaded, spec, [builder.build(*cell) for cell in batch], tracker)

    def work(done: set[str]) -> Work:
        todo = sorted((c for c in cells if trial_key(spec.task, *c) not in done), key=lambda cell: cell[0])
        # a batch may span lengths: run_batch prefills each length apart
        extra = longest - max(spec.lengths)  # a prompt's tokens beyond its length (paper-form JRT, buffers)
        tokens = max((n + extra for n, _, _ in todo), default=0) + spec.max_new_tokens
        row_bytes = decode_row_bytes(loaded.model, tokens) if fixed_buffers else 0
        return Work(todo, tokens, spec.batch_size, answer, row_bytes)

    return Prepared(len(cells), work)


class NeedleProbe:
    name, spec = "needle", NeedleSpec
    summary = staticmethod(summary)

    def prepare(self, loaded, spec: NeedleSpec) -> Prepared:
        return prepared(loaded, spec, run_batch, fixed_buffers=spec.mode == "generate")
