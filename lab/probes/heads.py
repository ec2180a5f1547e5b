"""Per-head scores on needle prompts: retrieval score (Wu et al. 2024), attention entropy, needle mass.

For each trial the model answers greedily (under the plan), then one teacher-forced forward pass
over prompt + answer records the attention rows of the answering positions.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from lab.errors import LabError
from lab.interventions import Plan, apply_plan
from lab.probes import needle as needle_probe

SCORES = ("retrieval", "entropy", "needle_mass")


@torch.inference_mode()
def head_scores(loaded, spec: needle_probe.NeedleSpec, plan: Plan | None = None, progress=None) -> dict:
    """{(layer, head): {"retrieval", "entropy", "needle_mass"}} averaged over the spec's trials."""
    model, anatomy = loaded.model, loaded.anatomy
    if not anatomy.attention_layers:
        raise LabError(f"{anatomy.architecture} has no attention heads to score")
    plan = plan or Plan()
    builder = needle_probe.PromptBuilder(loaded.tokenizer, spec)
    sums: dict[tuple[int, int], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    cells = spec.cells()
    counted = 0
    for n, cell in enumerate(cells):
        trial = builder.build(*cell)
        answer = _greedy(loaded, plan, trial.ids, spec.max_new_tokens)
        if not answer:
            continue
        attention = _answer_attention(loaded, plan, trial.ids, answer)
        output = loaded.tokenizer.decode(answer, skip_special_tokens=True)
        # Wu et al. count only samples whose answer recalls the needle
        retrieval_ok = needle_probe.score(trial, output, spec.task)["score"] >= 0.5
        counted += retrieval_ok
        span = {p for s, e in trial.needle_spans for p in range(s, e)}
        span_len = max(1, max((e - s for s, e in trial.needle_spans), default=1))
        ids = trial.ids + answer
        for layer, w in attention.items():  # w: (H, G, K) rows of the G answering positions
            top = w.argmax(-1)  # (H, G)
            entropy = -(w * torch.log(w + 1e-12)).sum(-1).mean(-1)  # (H,)
            mass = w[..., sorted(span)].sum(-1).mean(-1) if span else torch.zeros(w.shape[0])
            for h in range(w.shape[0]):
                key = (layer, h)
                sums[key]["entropy"] += float(entropy[h]) / len(cells)
                sums[key]["needle_mass"] += float(mass[h]) / len(cells)
                if retrieval_ok:
                    sums[key]["retrieval"] += retrieval_hits(top[h].tolist(), ids, answer, span) / span_len
        if progress:
            progress(n + 1, len(cells))
    return {key: {"retrieval": v["retrieval"] / counted if counted else 0.0, "entropy": v["entropy"],
                  "needle_mass": v["needle_mass"]} for key, v in sorted(sums.items())}


def retrieval_hits(top: list[int], ids: list[int], answer: list[int], span: set[int]) -> int:
    """Answer tokens copied by this head: its top-1 key lies in the needle and holds that token."""
    return sum(1 for g, pos in enumerate(top) if pos in span and ids[pos] == answer[g])


def _greedy(loaded, plan: Plan, prompt: list[int], max_new_tokens: int) -> list[int]:
    with apply_plan(loaded.model, loaded.anatomy, plan):
        return needle_probe.greedy(loaded, [prompt], max_new_tokens)[0]


def _answer_attention(loaded, plan: Plan, prompt: list[int], answer: list[int]) -> dict[int, torch.Tensor]:
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
        ids = torch.tensor([prompt + answer], device=loaded.device)
        with apply_plan(model, anatomy, plan, prompt_len=len(prompt)):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    return captured


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
