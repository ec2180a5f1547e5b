"""Prompts that share a prefix: the prefix once, the rest continued from its cache (lab.fast.prefix)."""

import pytest
import torch

from lab import fast
from lab.interventions import BlocksOff, Plan, Sparsify, apply_plan
from lab.fast import prefix
from lab.models import ModelSpec, load
from lab.probes import mmlu

from conftest import tiny


def _rows(shared: int, rest: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    head = torch.randint(3, 250, (shared,), generator=g).tolist()
    return [head + torch.randint(3, 250, (n,), generator=g).tolist() for n in rest]


def _plain(model, rows: list[list[int]]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([model(input_ids=torch.tensor([row])).logits[0, -1] for row in rows])


PLANS = {"none": Plan(), "heads off": Plan(heads_off=((2, 0), (2, 3))), "mlp off": Plan(off=(BlocksOff("mlp"),)),
         "sparsify": Plan(sparsify=Sparsify(2))}


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_continued_prompts_give_the_logits_of_whole_ones(plan):
    """Jamba's Mamba layers continue from the cached state (transformers' prefill would start from zeros), its
    attention sees the cached keys, padding stays out: logits as for each prompt alone, under a plan too."""
    loaded = load(ModelSpec("random:jamba", device="cpu"))
    rows = _rows(70, (9, 3, 14, 1))
    assert prefix.supports(loaded.model) and prefix.shared_length(rows) == 70
    with apply_plan(loaded.model, loaded.anatomy, plan) as tracker:
        tracker.prompt_len = mmlu.EVERY_POSITION
        shared = prefix.last_logits(loaded.model, rows, 0, "cpu")
        alone = _plain(loaded.model, rows)
    torch.testing.assert_close(shared, alone, atol=1e-4, rtol=1e-4)


def test_a_row_keeps_a_token_of_its_own():
    assert prefix.shared_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert prefix.shared_length([[5, 2], [1, 2]]) == 0


def test_only_models_that_continue_exactly_share():
    assert not prefix.supports(tiny("recurrent_gemma").model)  # its prefill ignores a cached state
    loaded = load(ModelSpec("random:jamba", device="cpu"))
    fast.apply(loaded.model, False)  # transformers' own scan starts from zeros
    assert not prefix.supports(loaded.model)


def test_mmlu_scores_the_same_with_shared_shots(monkeypatch):
    """toy-jamba's five-shot MMLU: each subject's shots once per batch, the same log-likelihoods as whole
    prompts."""
    loaded = tiny("jamba")
    spec = mmlu.MMLUSpec(limit=3)
    calls = []
    real = prefix.last_logits
    monkeypatch.setattr(prefix, "last_logits", lambda *args: calls.append(1) or real(*args))

    def scored(share: bool) -> list[dict]:
        monkeypatch.setattr(prefix, "supports", lambda model: share)
        work = mmlu.MMLUProbe().prepare(loaded, spec).work(set())
        with apply_plan(loaded.model, loaded.anatomy, Plan()) as tracker:
            return sorted(work.answer(work.items, tracker), key=lambda r: r["key"])

    shared, whole = scored(True), scored(False)
    subjects = {r["subject"] for r in whole}
    assert len(calls) == len(subjects) > 1
    assert [r["prediction"] for r in shared] == [r["prediction"] for r in whole]
    for a, b in zip(shared, whole):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (lab's Triton scan from a cached state)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_continued_prompts_on_the_gpu(dtype):
    loaded = load(ModelSpec("random:jamba", device="cuda", dtype=dtype))
    rows = _rows(300, (9, 3, 140, 1))
    with apply_plan(loaded.model, loaded.anatomy, Plan()) as tracker:
        tracker.prompt_len = mmlu.EVERY_POSITION
        shared = prefix.last_logits(loaded.model, rows, 0, "cuda").float()
        with torch.inference_mode():
            alone = torch.stack([loaded.model(input_ids=torch.tensor([row], device="cuda")).logits[0, -1]
                                 for row in rows]).float()
    error = ((shared - alone).norm() / alone.norm()).item()
    assert error < (1e-4 if dtype == "float32" else 3e-2)


def test_haystack_per_trial_is_one_text_for_every_length_and_depth():
    from lab.probes import needle

    tok = tiny("jamba").tokenizer
    spec = needle.NeedleSpec(task="passkey", lengths=(800, 1200), depths=(50, 80), haystack_per="trial")
    builder = needle.PromptBuilder(tok, spec)
    deep, shallow, other = builder.build(1200, 80, 0), builder.build(800, 50, 0), builder.build(1200, 80, 1)
    start = shallow.needle_spans[0][0]
    assert deep.ids[:start] == shallow.ids[:start]  # the same haystack up to the shallower needle
    assert deep.ids[:start] != other.ids[:start]  # another trial, another text
    per_cell = needle.PromptBuilder(tok, needle.NeedleSpec(task="passkey", lengths=(800, 1200), depths=(50, 80)))
    assert per_cell.build(1200, 80, 0).ids[:start] != per_cell.build(800, 50, 0).ids[:start]
