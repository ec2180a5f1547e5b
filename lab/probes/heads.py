"""Per-head scores on needle prompts: retrieval score (Wu et al. 2024), attention entropy, needle mass.

For each trial the model answers greedily (under the plan), then one teacher-forced forward pass
over prompt + answer records the attention rows of the answering positions. Each trial stores one
row with every head's values; the summary averages them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lab.errors import LabError
from lab.interventions import Plan, Site, apply_plan
from lab.models.generation import greedy
from lab.probes import needle as needle_probe
from lab.probes.base import Prepared, mean

SCORES = ("retrieval", "entropy", "needle_mass")


@dataclass(frozen=True)
class HeadsSpec:
    """Needle prompts to score the heads on (the [heads] table of a preset)."""

    task: str = "passkey"
    lengths: tuple[int, ...] = (512,)
    depths: tuple[float, ...] = (10, 50, 90)
    trials: int = 2
    max_new_tokens: int = 16
    haystack: str = "generated"
    seed: int = 0
    batch_size: int = 0  # 0: automatic

    def needle(self) -> needle_probe.NeedleSpec:
        return needle_probe.NeedleSpec(task=self.task, lengths=self.lengths, depths=self.depths, trials=self.trials,
                                       max_new_tokens=self.max_new_tokens, haystack=self.haystack, seed=self.seed,
                                       batch_size=self.batch_size)

    def validate(self) -> HeadsSpec:
        self.needle().validate()
        return self


def _head_of(name: str) -> tuple[int, int]:
    site = Site.parse(name)
    return site.layer, site.head


@torch.inference_mode()
def score_batch(loaded, spec: needle_probe.NeedleSpec, trials: list, tracker) -> list[dict]:
    """One row per trial: the answer, whether it recalls the needle, and [retrieval, entropy, mass] per head."""
    tok = loaded.tokenizer
    tracker.needles = {tuple(t.ids): t.needle_spans for t in trials}  # where a plan's needle-attention op acts
    tracker.prompt_len = None  # the prefill call of generate defines the prompt
    answers = greedy(loaded, [t.ids for t in trials], spec.max_new_tokens)
    rows = []
    for trial, answer in zip(trials, answers):
        output = tok.decode(answer, skip_special_tokens=True)
        # Wu et al. count only samples whose answer recalls the needle
        recalled = needle_probe.score(trial, output, spec.task)["score"] >= 0.5
        heads = _head_values(loaded, trial, answer, tracker) if answer else {}
        rows.append({"key": trial.key, "length": trial.length, "depth": trial.depth, "trial": trial.index,
                     "output": output, "recalled": recalled, "heads": heads})
    return rows


def _head_values(loaded, trial, answer: list[int], tracker) -> dict[str, list[float]]:
    span = {p for s, e in trial.needle_spans for p in range(s, e)}
    ids = trial.ids + answer
    values = {}
    for layer, w in _answer_attention(loaded, trial.ids, answer, tracker).items():  # w: (H, G, K)
        top = w.argmax(-1)  # (H, G)
        entropy = -(w * torch.log(w + 1e-12)).sum(-1).mean(-1)  # (H,)
        mass = w[..., sorted(span)].sum(-1).mean(-1) if span else torch.zeros(w.shape[0])
        for h in range(w.shape[0]):
            # the share of answer tokens this head copied from the needle (Wu et al. divide by the needle's
            # length instead, which caps a passkey head at answer / needle length: docs/fidelity.md, item 12)
            hits = retrieval_hits(top[h].tolist(), ids, answer, span) / len(answer)
            values[str(Site(layer, "attention", h))] = [hits, float(entropy[h]), float(mass[h])]
    return values


def retrieval_hits(top: list[int], ids: list[int], answer: list[int], span: set[int]) -> int:
    """Answer tokens copied by this head: its top-1 key lies in the needle and holds that token."""
    return sum(1 for g, pos in enumerate(top) if pos in span and ids[pos] == answer[g])


def _answer_attention(loaded, prompt: list[int], answer: list[int], tracker) -> dict[int, torch.Tensor]:
    """Attention probabilities of the positions that predict each answer token, per attention layer."""
    model, anatomy = loaded.model, loaded.anatomy
    rows = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))
    captured: dict[int, torch.Tensor] = {}
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    handles = []
    try:
        for layer, block in anatomy.blocks("attention"):
            def keep(module, args, output, layer=layer):
                captured[layer] = output[1][0, :, rows].float().cpu()
            handles.append(model.get_submodule(block.path).register_forward_hook(keep))
        tracker.prompt_len = len(prompt)
        model(input_ids=torch.tensor([prompt + answer], device=loaded.device), use_cache=False, logits_to_keep=1)
    finally:
        tracker.prompt_len = None
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    return captured


def summary(rows: list[dict]) -> dict:
    """Per head: retrieval averaged over the trials that recall the needle, entropy and mass over all
    trials that gave an answer."""
    answered = [r for r in rows if r["heads"]]
    recalled = [r for r in answered if r["recalled"]]
    names = sorted({name for r in answered for name in r["heads"]}, key=_head_of)
    heads = {name: {"retrieval": round(mean(r["heads"][name][0] for r in recalled), 6),
                    "entropy": round(mean(r["heads"][name][1] for r in answered), 6),
                    "needle_mass": round(mean(r["heads"][name][2] for r in answered), 6)} for name in names}
    return {"trials": len(rows), "answered": len(answered), "recalled": len(recalled), "heads": heads}


class HeadsProbe:
    name, spec = "heads", HeadsSpec
    summary = staticmethod(summary)

    def prepare(self, loaded, spec: HeadsSpec) -> Prepared:
        if not loaded.anatomy.attention_layers:
            raise LabError(f"{loaded.anatomy.architecture} has no attention heads to score")
        return needle_probe.prepared(loaded, spec.needle(), score_batch)


def head_scores(loaded, spec: HeadsSpec, plan: Plan | None = None) -> dict[tuple[int, int], dict[str, float]]:
    """Score the heads at once, storing nothing (notebooks, tests); the CLI and the console store a run."""
    work = HeadsProbe().prepare(loaded, spec).work(set())
    with apply_plan(loaded.model, loaded.anatomy, plan or Plan()) as tracker:
        return scores(summary(work.answer(work.items, tracker)))


def scores(summary: dict) -> dict[tuple[int, int], dict[str, float]]:
    """{(layer, head): {"retrieval", "entropy", "needle_mass"}} from a heads summary."""
    return {_head_of(name): values for name, values in summary["heads"].items()}


def ranking(scores: dict, score: str) -> list[tuple[tuple[int, int], float]]:
    """Heads from most to least important by `score` (entropy: lowest first)."""
    if score not in SCORES:
        raise LabError(f"unknown head score {score!r}; use one of {', '.join(SCORES)}")
    sign = 1 if score == "entropy" else -1
    return sorted(((k, v[score]) for k, v in scores.items()), key=lambda kv: (sign * kv[1], kv[0]))


def keep_set(ranked: list, fraction: float) -> list[tuple[int, int]]:
    """The top `fraction` of heads (at least one)."""
    if not 0 < fraction <= 1:
        raise LabError("--keep must be a percentage between 0 and 100")
    n = max(1, math.ceil(fraction * len(ranked)))
    return sorted(head for head, _ in ranked[:n])
