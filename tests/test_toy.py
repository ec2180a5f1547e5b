"""The shipped toy models: load offline through the normal path and show the paper's effect."""

import functools
import json

import pytest
import torch

from lab.interventions import BlocksOff, Plan, apply_plan
from lab.models import load
from lab.models.loading import BUILTIN_DIR
from lab.probes import needle
from lab.probes.needle import NeedleSpec, PromptBuilder

TOYS = {  # name -> (architecture, attention layers, heads per layer, window)
    "toy-recurrentgemma": ("recurrent_gemma", [2, 5], 8, 2048),
    "toy-jamba": ("jamba", [2, 5], 8, None),
}


load_once = functools.cache(load)  # each toy loaded once for the module: plans leave the model as they found it


@pytest.fixture(scope="module", params=list(TOYS))
def toy(request):
    return load_once(request.param)


def test_shipped_files_load_offline(toy):
    folder = BUILTIN_DIR / toy.spec.name
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # safetensors only
    architecture, layers, heads, window = TOYS[toy.spec.name]
    anatomy = toy.anatomy
    assert anatomy.architecture == architecture and anatomy.attention_layers == layers
    assert anatomy.attention(layers[0]).heads == heads and anatomy.attention(layers[0]).window == window
    facts = json.loads((folder / "training.json").read_text())
    assert facts["parameters"] == toy.num_params


def test_both_toys_fit_in_25_mb():
    assert sum(p.stat().st_size for name in TOYS for p in (BUILTIN_DIR / name).iterdir()) < 25 * 2**20


def test_toy_jamba_has_mamba_and_experts():
    anatomy = load_once("toy-jamba").anatomy
    assert len(anatomy.blocks("ssm")) == 4 and len(anatomy.blocks("moe")) == 3


def _run(toy, plan, spec, cells):
    builder = PromptBuilder(toy.tokenizer, spec)
    trials = [builder.build(*c) for c in cells]
    with apply_plan(toy.model, toy.anatomy, plan) as tracker:
        return needle.run_batch(toy, spec, trials, tracker)


@pytest.mark.parametrize("length", [256, 1024, 2048])
def test_base_retrieves_and_attention_off_does_not(toy, length):
    spec = NeedleSpec(task="passkey", mode="fast")
    cells = [(length, depth, 0) for depth in (0, 50, 100)]
    assert [r["exact"] for r in _run(toy, Plan(), spec, cells)] == [1.0, 1.0, 1.0]
    assert [r["exact"] for r in _run(toy, Plan(off=(BlocksOff("attention"),)), spec, cells)] == [0.0, 0.0, 0.0]


def test_generation_answers_the_pass_key(toy):
    spec = NeedleSpec(task="passkey", mode="generate", max_new_tokens=8)
    rows = _run(toy, Plan(), spec, [(768, 30, 0), (768, 70, 1)])
    assert all(r["exact"] == 1.0 and r["answer"] in r["output"] for r in rows)


def test_fast_mode_does_not_reward_copying_the_input():
    """A model that predicts its own input token sees the answer under teacher forcing; it must not pass."""
    loaded = load("random:jamba")

    class Echo(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, **kwargs):
            out = self.inner(input_ids=input_ids, **kwargs)
            keep = kwargs.get("logits_to_keep", 0)  # the positions the caller asks logits for, as a model does
            shown = input_ids[:, -keep:] if keep else input_ids
            out.logits = torch.nn.functional.one_hot(shown, out.logits.shape[-1]).float()
            return out

    echo = type(loaded)(Echo(loaded.model), loaded.tokenizer, loaded.anatomy, loaded.spec)
    spec = NeedleSpec(task="sentence", mode="fast")
    trial = PromptBuilder(loaded.tokenizer, spec).build(600, 50, 0)
    with apply_plan(loaded.model, loaded.anatomy, Plan()) as tracker:
        row = needle.run_batch(echo, spec, [trial], tracker)[0]
    assert needle.PAPER_NEEDLE[:-1] in row["output"] + "."  # the shifted echo contains the needle text...
    assert row["exact"] == 0.0 and row["score"] < 0.2  # ...but not as the greedy continuation


def test_top_retrieval_heads_carry_retrieval(toy):
    """Keeping only the top 15 % of heads by retrieval score keeps the pass key. In toy-recurrentgemma removing
    them loses it; toy-jamba spreads retrieval over all 8 heads of layer 5, so there the others still find it."""
    from lab.probes.heads import HeadsSpec, head_scores, keep_set, ranking

    scores = head_scores(toy, HeadsSpec(lengths=(512,), depths=(20, 80), trials=1, max_new_tokens=8))
    keep = keep_set(ranking(scores, "retrieval"), 0.15)
    assert len(keep) == 3
    if toy.spec.name == "toy-recurrentgemma":  # the score is the share of answer tokens a head copied
        assert [round(v, 3) for _, v in ranking(scores, "retrieval")[:3]] == [0.833] * 3
    spec = NeedleSpec(task="passkey", mode="fast")
    cells = [(1024, depth, 1) for depth in (10, 50, 90)]
    assert [r["exact"] for r in _run(toy, Plan(keep_heads=tuple(keep)), spec, cells)] == [1.0, 1.0, 1.0]
    if toy.spec.name == "toy-recurrentgemma":
        assert [r["exact"] for r in _run(toy, Plan(heads_off=tuple(keep)), spec, cells)] == [0.0, 0.0, 0.0]


def test_base_knows_the_toy_facts_and_attention_off_does_not():
    """A sample of the toy-knowledge figures (10 test questions per subject, 5-shot, as the card measures), for
    toy-recurrentgemma only: toy-jamba has not learned to answer (its card reports chance)."""
    toy = load_once("toy-recurrentgemma")
    from lab.probes import mmlu

    questions, dev = mmlu.load_questions(mmlu.MMLUSpec(limit=10))
    scorer = mmlu.Scorer(toy.tokenizer, 5)
    items = [(q, scorer.ids(q, dev[q.subject])) for q in questions]

    def accuracy(plan):
        with apply_plan(toy.model, toy.anatomy, plan) as tracker:
            rows = mmlu.run_batch(toy, scorer, items, tracker)
        return sum(r["correct"] for r in rows) / len(rows)

    assert len(items) == 40
    assert accuracy(Plan()) >= 0.8
    assert accuracy(Plan(off=(BlocksOff("attention"),))) <= 0.45


def test_training_rows_supervise_what_the_context_determines():
    from lab.models.tiny import EOS, byte_tokenizer
    from lab.toy.train import Sampler

    sampler = Sampler(byte_tokenizer(), seed=0, copy_share=0.5)
    ids, mask = sampler.copy(300)
    assert len(ids) == len(mask) == 300 and 0 < sum(mask) < 300
    runs, start = [], None
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    for a, b in runs[:-1]:  # every repeat (but a cut-off last one) copies a string seen before the gap
        repeat = ids[a:b]
        assert any(ids[j:j + len(repeat)] == repeat for j in range(a - len(repeat) + 1))
    ids, mask = sampler.needle(512)
    answer = [t for t, m in zip(ids, mask) if m]
    assert answer[-1] == EOS and mask[-len(answer):] == [1] * len(answer)
    question = Sampler(byte_tokenizer(), seed=0, open_book_share=1.0)._question()
    assert any(question.startswith(fact + "\n\n") for fact in sampler.facts)  # open book: the fact comes first
    batch, weights = sampler.batch(6, 400)
    assert batch.shape == weights.shape and batch.shape[0] == 6


def test_config_overrides_replace_any_field():
    from lab.toy.train import build_model

    model = build_model("toy-jamba", {"vocab_size": 300, "num_hidden_layers": 3, "mamba_d_conv": 8})
    assert model.config.vocab_size == 300 and model.get_input_embeddings().num_embeddings == 300
    assert model.config.num_hidden_layers == 3 and model.model.layers[0].mamba.conv1d.kernel_size == (8,)
