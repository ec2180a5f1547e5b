"""MMLU-format probe: lm-evaluation-harness's `mmlu` prompt, scored by the log-likelihood of " A".." D".

Sources: a folder in the original release layout (data/{dev,val,test}/<subject>_<split>.csv, no
header: question, A, B, C, D, answer), the HF dataset cais/mmlu from the local HF cache, or the
project's own toy-knowledge set (the same CSV layout, shipped in lab/toy/data).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch

from lab.errors import LabError
from lab.fast import prefix
from lab.models.generation import pad_id
from lab.probes.base import Prepared, Work, mean, mean_by
from lab.probes.files import read_utf8

LETTERS = ("A", "B", "C", "D")
MAX_CSV_BYTES = 64 << 20  # one subject's file; the largest of MMLU's is under 1 MiB
TOY_DIR = Path(__file__).resolve().parent.parent / "toy" / "data" / "toy-knowledge"
_SUBCATEGORY = {
    "abstract_algebra": "math", "anatomy": "health", "astronomy": "physics", "business_ethics": "business",
    "clinical_knowledge": "health", "college_biology": "biology", "college_chemistry": "chemistry",
    "college_computer_science": "computer science", "college_mathematics": "math", "college_medicine": "health",
    "college_physics": "physics", "computer_security": "computer science", "conceptual_physics": "physics",
    "econometrics": "economics", "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "formal_logic": "philosophy", "global_facts": "other", "high_school_biology": "biology",
    "high_school_chemistry": "chemistry", "high_school_computer_science": "computer science",
    "high_school_european_history": "history", "high_school_geography": "geography",
    "high_school_government_and_politics": "politics", "high_school_macroeconomics": "economics",
    "high_school_mathematics": "math", "high_school_microeconomics": "economics", "high_school_physics": "physics",
    "high_school_psychology": "psychology", "high_school_statistics": "math", "high_school_us_history": "history",
    "high_school_world_history": "history", "human_aging": "health", "human_sexuality": "culture",
    "international_law": "law", "jurisprudence": "law", "logical_fallacies": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "medical_genetics": "health", "miscellaneous": "other", "moral_disputes": "philosophy",
    "moral_scenarios": "philosophy", "nutrition": "health", "philosophy": "philosophy", "prehistory": "history",
    "professional_accounting": "other", "professional_law": "law", "professional_medicine": "health",
    "professional_psychology": "psychology", "public_relations": "politics", "security_studies": "politics",
    "sociology": "culture", "us_foreign_policy": "politics", "virology": "health", "world_religions": "philosophy",
}
_CATEGORY = {
    "stem": {"physics", "chemistry", "biology", "computer science", "math", "engineering"},
    "humanities": {"history", "philosophy", "law"},
    "social_sciences": {"politics", "culture", "economics", "geography", "psychology"},
    "other": {"other", "business", "health"},
}


def category(subject: str) -> str:
    """MMLU's four categories (stem, humanities, social_sciences, other); toy subjects carry a prefix."""
    for name in _CATEGORY:
        if subject.startswith(name + "__"):
            return name
    sub = _SUBCATEGORY.get(subject, "other")
    return next(name for name, subs in _CATEGORY.items() if sub in subs)


NAMED_SOURCES = ("toy", "cais/mmlu")  # lab's toy questions and the HF dataset; anything else is a folder


@dataclass(frozen=True)
class MMLUSpec:
    source: str = "toy"  # toy | a folder in the original layout | cais/mmlu (HF cache)
    shots: int = 5
    subjects: tuple[str, ...] = ()  # empty: all
    limit: int = 0  # questions per subject, 0: all
    split: str = "test"
    batch_size: int = 0  # 0: automatic (halved and retried on out-of-memory)
    chat: bool = False  # lm-eval's apply_chat_template + fewshot_as_multiturn, with the tokenizer's chat template
    bos: bool = True  # the tokenizer adds its special tokens (BOS); lm-eval before v0.4.10 did not

    def unhashed(self) -> list[str]:
        """Options added after fingerprints were pinned that are at their default (Preset.fingerprint drops them)."""
        return [name for name in ("chat", "bos") if getattr(self, name) == MMLUSpec.__dataclass_fields__[name].default]

    def validate(self) -> MMLUSpec:
        if not 0 <= self.shots <= 5:
            raise LabError(f"mmlu.shots: {self.shots} is out of range (0..5)")
        if self.limit < 0 or self.batch_size < 0:
            raise LabError("mmlu: limit and batch_size must be >= 0 (batch_size 0: automatic)")
        if self.split not in ("test", "val", "validation", "dev"):
            raise LabError(f"mmlu.split: {self.split!r} is not test, val or dev")
        twice = sorted({s for s in self.subjects if self.subjects.count(s) > 1})
        if twice:  # its questions would make the same trial keys: run once, counted twice, never done
            raise LabError(f"mmlu.subjects: {twice[0]} appears twice")
        return self


@dataclass(frozen=True)
class Question:
    subject: str
    index: int
    question: str
    choices: tuple[str, str, str, str]
    answer: int

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.index}"


def _read_csv(path: Path, subject: str) -> list[Question]:
    text = read_utf8(path, MAX_CSV_BYTES, "MMLU file")
    try:
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    except csv.Error as error:
        raise LabError(f"MMLU file {path}: {error}") from None
    out = []
    for i, row in enumerate(rows):
        if len(row) != 6 or row[5].strip() not in LETTERS:
            raise LabError(f"{path}: row {i + 1} is not question,A,B,C,D,answer-letter")
        out.append(Question(subject, i, row[0], tuple(row[1:5]), LETTERS.index(row[5].strip())))
    return out


def _load_folder(root: Path, split: str) -> dict[str, dict[str, list[Question]]]:
    base = root / "data" if (root / "data").is_dir() else root
    split = "val" if split == "validation" else split
    if not (base / split).is_dir() or not (base / "dev").is_dir():
        raise LabError(f"MMLU data not found in {root}: expected {base}/dev and {base}/{split} with "
                       f"<subject>_{split}.csv files (the original release layout)")
    data: dict[str, dict[str, list[Question]]] = {}
    for part in ("dev", split):
        for path in sorted((base / part).glob(f"*_{part}.csv")):
            subject = path.name[: -len(f"_{part}.csv")]
            data.setdefault(subject, {})[part] = _read_csv(path, subject)
    return {s: d for s, d in data.items() if split in d}


def _load_hf(split: str) -> dict[str, dict[str, list[Question]]]:
    """cais/mmlu from the local HF cache (parquet, read with pyarrow)."""
    try:
        import pyarrow.parquet as pq
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LabError("reading cais/mmlu needs pyarrow: pip install pyarrow") from None
    try:
        root = Path(snapshot_download("cais/mmlu", repo_type="dataset", allow_patterns=["all/*"],
                                      local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not cached"
        raise LabError("cais/mmlu is not in the HF cache; on a machine with network run "
                       "huggingface-cli download cais/mmlu --repo-type dataset --include 'all/*', "
                       "or point mmlu.source at a folder in the original layout") from None
    split = "validation" if split == "val" else split
    data: dict[str, dict[str, list[Question]]] = {}
    for part in ("dev", split):
        files = sorted(root.glob(f"all/{part}-*.parquet"))
        if not files:
            raise LabError(f"cais/mmlu in the HF cache has no {part} split under {root}/all")
        counters: dict[str, int] = {}
        for path in files:
            for row in pq.read_table(path).to_pylist():
                subject = row["subject"]
                i = counters[subject] = counters.get(subject, -1) + 1
                q = Question(subject, i, row["question"], tuple(row["choices"]), int(row["answer"]))
                data.setdefault(subject, {}).setdefault("dev" if part == "dev" else "eval", []).append(q)
    return {s: {"dev": d.get("dev", []), split: d["eval"]} for s, d in data.items() if "eval" in d}


def load_questions(spec: MMLUSpec) -> tuple[list[Question], dict[str, list[Question]]]:
    """(questions to ask, dev shots per subject) for a spec."""
    spec.validate()
    if spec.source == "toy":
        if not TOY_DIR.is_dir():
            raise LabError(f"the toy-knowledge set is missing from {TOY_DIR}; build it with python -m lab.toy.knowledge")
        data = _load_folder(TOY_DIR, spec.split)
    elif spec.source == "cais/mmlu":
        data = _load_hf(spec.split)
    else:
        data = _load_folder(Path(spec.source).expanduser(), spec.split)
    subjects = list(spec.subjects) or sorted(data)
    missing = [s for s in subjects if s not in data]
    if missing:
        raise LabError(f"mmlu.subjects: unknown subject {missing[0]!r} in {spec.source}")
    split = "val" if spec.split == "validation" and spec.source != "cais/mmlu" else spec.split
    questions = [q for s in subjects for q in (data[s][split][: spec.limit] if spec.limit else data[s][split])]
    if not questions:
        raise LabError(f"no MMLU questions in {TOY_DIR if spec.source == 'toy' else spec.source} "
                       f"(no {split} rows in its <subject>_{split}.csv files)")
    return questions, {s: data[s].get("dev", []) for s in subjects}


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question.strip() + "".join(f"\n{l}. {c}" for l, c in zip(LETTERS, q.choices)) + "\nAnswer:"
    return text + (f" {LETTERS[q.answer]}" if with_answer else "")


def description(q: Question) -> str:
    subject = q.subject.split("__", 1)[-1].replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def prompt(q: Question, shots: list[Question]) -> str:
    """The lm-eval `mmlu` context: description, k dev shots (first_n), the question, 'Answer:'."""
    return description(q) + "\n\n".join([format_question(s, True) for s in shots] + [format_question(q, False)])


def chat_messages(q: Question, shots: list[Question]) -> list[dict]:
    """lm-eval's apply_chat_template=True, fewshot_as_multiturn=True: the description as the system message,
    each shot a user turn and an assistant turn holding its letter, then the question as a user turn."""
    messages = [{"role": "system", "content": description(q)}]
    for shot in shots:
        messages += [{"role": "user", "content": format_question(shot, False)},
                     {"role": "assistant", "content": LETTERS[shot.answer]}]
    return messages + [{"role": "user", "content": format_question(q, False)}]


class Scorer:
    """Turns questions into token ids; the four continuations share one forward pass.

    As lm-eval's loglikelihood: the context's trailing whitespace moves to the continuation (" A".."D" in plain
    prompts; after a chat template "A".."D" with no delimiter, behind the generation prompt's newline if it has one),
    and the continuation is what encoding context + continuation adds to the context's own tokens."""

    def __init__(self, tokenizer, shots: int, chat: bool = False, bos: bool = True):
        self.tok, self.shots, self.chat, self.bos = tokenizer, shots, chat, bos
        if chat and not getattr(tokenizer, "chat_template", None):
            raise LabError("mmlu.chat = true, but the tokenizer has no chat template")
        sample = self._context(Question("x", 0, "x", ("a", "b", "c", "d"), 0), [])
        self.space = sample[len(sample.rstrip()):]  # the whitespace every context ends with
        self.choice_ids = self._choice_ids(sample.rstrip())

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=self.bos)["input_ids"]

    def _context(self, q: Question, dev: list[Question]) -> str:
        dev = [shot for shot in dev if shot != q]  # split = "dev" asks the shots themselves: never its own answer
        if not self.chat:
            return prompt(q, dev[: self.shots])
        return self.tok.apply_chat_template(chat_messages(q, dev[: self.shots]), tokenize=False,
                                            add_generation_prompt=True)

    def _choice_ids(self, context: str) -> tuple[list[int], list[int]]:
        """(shared prefix of the continuations, last token of each of the four letters)."""
        delimiter = "" if self.chat else " "
        ctx = self.tok(context, add_special_tokens=False)["input_ids"]  # special tokens sit at the ends: left out
        conts = []
        for letter in LETTERS:
            whole = self.tok(context + self.space + delimiter + letter, add_special_tokens=False)["input_ids"]
            if whole[: len(ctx)] != ctx:
                raise LabError("this tokenizer merges the prompt's end with the choice letter; MMLU scoring needs "
                               "them apart")
            conts.append(whole[len(ctx):])
        shared = conts[0][:-1]
        if any(c[:-1] != shared for c in conts):
            raise LabError("the choice letters do not differ only in their last token")
        return shared, [c[-1] for c in conts]

    def ids(self, q: Question, dev: list[Question]) -> list[int]:
        return self._encode(self._context(q, dev).rstrip()) + self.choice_ids[0]


EVERY_POSITION = 1 << 62  # a prompt length past any position: a plan's generation phase does nothing in MMLU


@torch.inference_mode()
def run_batch(loaded, scorer: Scorer, batch: list[tuple[Question, list[int]]], tracker) -> list[dict]:
    """Score a batch; return one result row per question. The questions of one subject share their shots: where
    the model can continue a cached prompt (lab.fast.prefix), those run once per subject."""
    tracker.prompt_len = EVERY_POSITION
    share = prefix.supports(loaded.model)
    subjects: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(batch):
        subjects.setdefault(q.subject if share else "", []).append(i)
    logits: list[torch.Tensor | None] = [None] * len(batch)
    for members in subjects.values():
        for i, row in zip(members, _last_logits(loaded, [batch[i][1] for i in members], share)):
            logits[i] = row
    rows = torch.stack(logits).float().log_softmax(-1)
    choice = rows[:, scorer.choice_ids[1]]  # (B, 4) log-likelihoods
    out = []
    for (q, ids), lls in zip(batch, choice.tolist()):
        pred = max(range(4), key=lambda i: lls[i])
        out.append({"key": q.key, "subject": q.subject, "category": category(q.subject), "tokens": len(ids),
                    "answer": LETTERS[q.answer], "prediction": LETTERS[pred], "correct": float(pred == q.answer),
                    "loglik": [round(v, 4) for v in lls]})
    return out


def _last_logits(loaded, rows: list[list[int]], share: bool) -> torch.Tensor:
    """(B, V) logits at each row's last token: the shared prefix once where `share` and it is long enough, else
    one right-padded forward."""
    pad = pad_id(loaded.tokenizer)
    if share and len(rows) > 1 and prefix.shared_length(rows) >= prefix.MIN_SHARED:
        return prefix.last_logits(loaded.model, rows, pad, loaded.device)
    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows], device=loaded.device)
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows], device=loaded.device)
    last = torch.tensor([[len(ids) - 1] for ids in rows], device=loaded.device)
    # logits only at each row's last position: a 256k vocabulary over every position would not fit
    return loaded.model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=last).logits[:, 0]


def summary(rows: list[dict]) -> dict:
    return {"accuracy": round(mean(r["correct"] for r in rows), 4), "questions": len(rows),
            "by_category": mean_by(rows, "category", "correct"), "by_subject": mean_by(rows, "subject", "correct")}


class MMLUProbe:
    name, spec = "mmlu", MMLUSpec
    summary = staticmethod(summary)

    def prepare(self, loaded, spec: MMLUSpec) -> Prepared:
        questions, dev = load_questions(spec)
        scorer = Scorer(loaded.tokenizer, spec.shots, spec.chat, spec.bos)
        share = prefix.supports(loaded.model)

        def answer(batch, tracker):
            return run_batch(loaded, scorer, batch, tracker)

        def work(done: set[str]) -> Work:
            items = [(q, scorer.ids(q, dev[q.subject])) for q in questions if q.key not in done]
            # longest first: out-of-memory shows up at once; by subject where their shots run once per batch
            items.sort(key=lambda item: (item[0].subject if share else "", -len(item[1])))
            return Work(items, len(items[0][1]) if items else 0, spec.batch_size, answer)

        return Prepared(len(questions), work)
