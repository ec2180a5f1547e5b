"""The needle-attention plan op: modes on the probabilities, phases, windows, decoding paths, presets, toys."""

from dataclasses import replace

import pytest
import torch

from lab import presets
from lab.errors import LabError
from lab.fast import decode
from lab.interventions import Plan, apply_plan, resolve
from lab.interventions.plan import NeedleAttention
from lab.runner import Finished, run
from lab.store import Store

from conftest import ids, tiny

NEEDLE = [(8, 14)]  # token positions [start, end) in the prompts below
PROMPT_LEN = 40  # of 48 tokens: positions 40.. are the generation phase


def _plan(generation="keep", prefill="keep", **scope) -> Plan:
    return Plan(needle_attention=NeedleAttention(generation, prefill, **scope))


def _needles(rows, spans=NEEDLE, length=PROMPT_LEN) -> dict:
    return {tuple(row[:length]): spans for row in rows.tolist()}


def _run(loaded, x, plan, needles, prompt_len=PROMPT_LEN):
    """(logits, {layer: (probabilities, attention output)}) of one teacher-forced forward under `plan`."""
    seen = {}
    handles = [loaded.model.get_submodule(block.path).register_forward_hook(
        lambda m, a, out, layer=layer: seen.__setitem__(layer, out)) for layer, block in loaded.anatomy.blocks("attention")]
    try:
        with torch.no_grad(), apply_plan(loaded.model, loaded.anatomy, plan, prompt_len=prompt_len) as tracker:
            tracker.needles = needles
            logits = loaded.model(input_ids=x).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, {layer: (out[1], out[0]) for layer, out in seen.items()}


def _visible(anatomy, layer, steps):
    """(T, S) bool: causal, inside the layer's window."""
    q, k = torch.arange(steps)[:, None], torch.arange(steps)[None]
    window = anatomy.attention(layer).window
    return (k <= q) & ((q - k < window) if window else True)


@pytest.mark.parametrize("arch", ["recurrent_gemma", "jamba"])
def test_modes_change_the_probabilities_as_the_paper_defines(arch):
    loaded = tiny(arch)  # recurrent_gemma: window 32, so generation queries see only part of the needle
    x = ids(2, 48, seed=4)
    needles = _needles(x)
    _, base = _run(loaded, x, _plan(), needles)
    needle = torch.zeros(48, dtype=torch.bool)
    needle[8:14] = True
    pre, gen = slice(0, PROMPT_LEN), slice(PROMPT_LEN, 48)
    layer = loaded.anatomy.attention_layers[0]  # later layers see what the op changed before them
    p = base[layer][0]
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)  # eager probabilities
    _, omit = _run(loaded, x, _plan("omit", "keep"), needles)
    _, only = _run(loaded, x, _plan("only", "follow"), needles)
    _, null = _run(loaded, x, _plan("null", "omit"), needles)
    _, balanced = _run(loaded, x, _plan("balanced", "keep"), needles)
    assert torch.equal(omit[layer][0][:, :, pre], p[:, :, pre])
    assert torch.equal(omit[layer][0][:, :, gen], p[:, :, gen] * ~needle)
    assert torch.equal(only[layer][0], p * needle)
    assert torch.equal(null[layer][0][:, :, pre], p[:, :, pre] * ~needle)
    assert not null[layer][0][:, :, gen].any()
    shown = _visible(loaded.anatomy, layer, 48) & needle  # (T, S)
    mass = (p * needle).sum((1, 3), keepdim=True)  # over heads and needle keys, per query
    expected = torch.where(shown, mass / (p.shape[1] * shown.sum(-1, keepdim=True).clamp(min=1)), 0).expand_as(p)
    assert torch.allclose(balanced[layer][0][:, :, gen], expected[:, :, gen], atol=1e-7)
    assert torch.equal(balanced[layer][0][:, :, pre], p[:, :, pre])
    if arch == "recurrent_gemma":  # the last queries see no needle token: balanced leaves them nothing
        assert not shown[47].any() and shown[40].any()


def test_chosen_heads_only_and_the_output_follows_the_probabilities():
    loaded = tiny("jamba")
    layer = loaded.anatomy.attention_layers[0]
    x = ids(2, 48, seed=5)
    needles = _needles(x)
    base_logits, base = _run(loaded, x, _plan(), needles)
    _, one = _run(loaded, x, _plan("null", "keep", heads=((layer, 1),)), needles)
    p, new = base[layer][0], one[layer][0]
    assert not new[:, 1, PROMPT_LEN:].any()
    assert torch.equal(new[:, [0, 2, 3]], p[:, [0, 2, 3]]) and torch.equal(new[:, 1, :PROMPT_LEN], p[:, 1, :PROMPT_LEN])
    # null everywhere: the attention output is the output projection's bias (zero for Jamba)
    _, null = _run(loaded, x, _plan("null", "follow"), needles)
    assert not null[layer][1].any()
    # omitting a needle of no tokens redoes probs @ values and changes nothing
    logits, _ = _run(loaded, x, _plan("omit", "follow"), _needles(x, spans=[]))
    assert torch.allclose(logits, base_logits, atol=1e-6)


def _generate(loaded, plan, prompt, needles, new=4):
    with torch.no_grad(), apply_plan(loaded.model, loaded.anatomy, plan) as tracker:
        tracker.needles = needles
        out = loaded.model.generate(prompt, max_new_tokens=new, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=256, eos_token_id=None)
    return out.sequences, torch.stack(out.logits, 1)


CONDITIONS = [("keep", "keep"), ("omit", "keep"), ("omit", "follow"), ("only", "keep"), ("balanced", "keep"),
              ("balanced", "only"), ("null", "omit")]


@pytest.mark.parametrize("arch", ["recurrent_gemma", "jamba"])
def test_cached_generate_agrees_with_teacher_forcing(arch):
    """Two needles per prompt (multi-key tasks: every needle); in recurrent_gemma's window of 32 the first
    leaves the window during generation."""
    loaded = tiny(arch)
    prompt = ids(2, PROMPT_LEN, seed=6) + 1
    needles = _needles(prompt, spans=[(6, 12), (30, 33)])
    base = None
    for generation, prefill in CONDITIONS:
        plan = _plan(generation, prefill)
        sequences, steps = _generate(loaded, plan, prompt, needles)
        full, _ = _run(loaded, sequences[:, :-1], plan, needles)
        assert torch.allclose(full[:, PROMPT_LEN - 1:], steps, atol=1e-5), (generation, prefill)
        base = steps if base is None else base
        if generation != "keep":
            assert (steps - base).abs().max() > 1e-3, (generation, prefill)


def test_ring_decoder_agrees_with_teacher_forcing():
    """lab's ring-buffer decoder: prompts of two lengths decode together, slots wrap around the window."""
    loaded = tiny("recurrent_gemma")
    model, anatomy = loaded.model, loaded.anatomy
    long, short = ids(2, 45, seed=7), ids(1, 36, seed=8)
    needles = {**_needles(long, [(20, 26)], 45), **_needles(short, [(5, 9), (12, 14)], 36)}
    for generation, prefill in CONDITIONS[1:]:
        plan = _plan(generation, prefill)
        with torch.no_grad(), apply_plan(model, anatomy, plan) as tracker:
            tracker.needles = needles
            tokens, logits = decode.greedy(model, [long, short], 6, return_logits=True)
        for rows, prompt in ((slice(0, 2), long), (slice(2, 3), short)):
            full, _ = _run(loaded, torch.cat([prompt, tokens[rows, :-1]], 1), plan, needles, prompt.shape[1])
            assert torch.allclose(full[:, prompt.shape[1] - 1:], logits[rows], atol=1e-5), (generation, prefill)


def test_removal_restores_the_model_exactly():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    loaded = tiny("recurrent_gemma")
    model, anatomy = loaded.model, loaded.anatomy
    x = ids(2, 48, seed=9)
    impl = model.config._attn_implementation
    with torch.no_grad():
        before = model(input_ids=x).logits
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    plan = _plan("balanced", "omit")
    _run(loaded, x, plan, _needles(x))
    with pytest.raises(RuntimeError, match="boom"):
        with apply_plan(model, anatomy, plan):
            assert model.config._attn_implementation == "eager" and hooks() > 0
            raise RuntimeError("boom")
    assert model.config._attn_implementation == impl and hooks() == 0
    assert ALL_ATTENTION_FUNCTIONS.get("eager") is None  # transformers' own eager again
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)


def test_prompts_without_needles_have_no_needle_tokens_and_unknown_ones_are_an_error():
    """MMLU or the batch-size measurement under the plan: no needle; a prompt the probe did not hand over: an error."""
    loaded = tiny("jamba")
    x = ids(1, 30)
    base, _ = _run(loaded, x, _plan(), {})
    assert torch.allclose(_run(loaded, x, _plan("omit", "follow"), {})[0], base, atol=1e-6)
    _, only = _run(loaded, x, _plan("only", "follow"), {})
    assert not any(probs.any() for probs, _ in only.values())
    with pytest.raises(LabError, match="none of the needle probe's prompts"):
        _run(loaded, x, _plan("omit"), _needles(ids(1, 30, seed=1), length=30))


@pytest.mark.parametrize("table, message", [
    ({"generation": "hide"}, "plan.needle_attention.generation: 'hide' is not one of keep, omit, only, balanced, null"),
    ({"generation": "follow"}, "plan.needle_attention.generation: 'follow' is not one of"),
    ({"prefill": "half"}, "plan.needle_attention.prefill: 'half' is not one of keep, omit, only, balanced, null, follow"),
    ({"generation": "omit", "phase": "both"}, "plan.needle_attention: unknown key 'phase'"),
    ({"layers": []}, "plan.needle_attention.layers: give at least one attention layer"),
    ({"heads": [[2]]}, "plan.needle_attention.heads: expected [layer, head] pairs"),
    ("omit", "plan.needle_attention: expected a table"),
])
def test_bad_needle_tables_are_one_line_errors(table, message):
    with pytest.raises(LabError, match=message.replace("[", r"\[").replace("(", r"\(")) as error:
        Plan.from_dict({"needle_attention": table})
    assert "\n" not in str(error.value)


def test_needle_table_round_trips_and_resolves_to_sites():
    anatomy = tiny("recurrent_gemma").anatomy  # attention in layers 2 and 5, 4 heads each
    plan = Plan.from_dict({"needle_attention": {"generation": "omit", "prefill": "follow", "layers": [5],
                                                 "heads": [[2, 1], [2, 3]]}}, anatomy)
    assert plan.needle_attention == NeedleAttention("omit", "follow", (5,), ((2, 1), (2, 3)))
    assert Plan.from_dict(plan.to_dict()) == plan
    preset = presets.parse(f'[model]\nname = "random:recurrent_gemma"\n{_toml(plan)}')
    assert preset.plan_for(anatomy) == plan
    assert resolve(plan, anatomy).needle_by_layer() == {2: {1, 3}, 5: {0, 1, 2, 3}}
    assert resolve(_plan("omit"), anatomy).needle_by_layer() == {2: {0, 1, 2, 3}, 5: {0, 1, 2, 3}}
    assert Plan.from_dict({"needle_attention": {}}).needle_attention == NeedleAttention()
    for table, message in (({"layers": [0]}, "plan.needle_attention.layers: layer 0 has no attention"),
                           ({"heads": [[2, 4]]}, "plan.needle_attention.heads: head 4 is out of range")):
        with pytest.raises(LabError, match=message):
            Plan.from_dict({"needle_attention": table}, anatomy)


def _toml(plan: Plan) -> str:
    import tomli_w

    return tomli_w.dumps({"plan": plan.to_dict()})


def test_plan_in_words():
    anatomy = tiny("jamba").anatomy
    assert _plan("omit", "keep").describe(anatomy) == "needle: omit in generation, keep in prefill"
    assert _plan("only", "follow").describe(anatomy) == "needle: only in generation and prefill"
    assert _plan("null", "keep", layers=(2,), heads=((2, 0),)).describe(anatomy) == \
        "needle: null in generation, keep in prefill (layer 2 and 1 head)"
    both = Plan(off=(), heads_off=((2, 0),), phase="generation", needle_attention=NeedleAttention("omit"))
    assert both.describe(anatomy) == "1/4 heads off, generation only; needle: omit in generation, keep in prefill"


NEEDLE_PRESETS = [f"{model}-needle-{g}-{p}" for model in ("recurrentgemma-2b", "toy-recurrentgemma", "toy-jamba")
                  for g in ("keep", "omit", "only", "balanced") for p in ("keep", "follow")]


def test_needle_presets_are_the_papers_conditions_on_the_base_presets():
    names = set(presets.list_presets())
    for name in NEEDLE_PRESETS:
        preset = presets.load(name)
        model, generation, prefill = name.rsplit("-", 3)[0].removesuffix("-needle"), *name.rsplit("-", 2)[1:]
        base = presets.load(f"{model}-base")
        assert preset.model == base.model and preset.needle == base.needle and preset.mmlu is None, name
        plan = Plan.from_dict(preset.plan)
        assert plan.needle_attention == NeedleAttention(generation, prefill) and plan.with_(needle_attention=None).is_empty
    assert sorted(n for n in names if "-needle-" in n) == sorted(NEEDLE_PRESETS)


def _toy_run(tmp_path, name: str, lengths: tuple[int, ...]) -> dict:
    """A preset's needle probe on a small grid: {trial key: row}."""
    preset = presets.load(name)
    preset = replace(preset, mmlu=None, needle=replace(preset.needle, lengths=lengths, depths=(0, 50, 100)))
    store = Store(tmp_path / "toys.sqlite")
    events = list(run(preset, store))
    assert isinstance(events[-1], Finished) and events[-1].status == "done"
    return {row["key"]: row for row in store.trials(events[-1].run_id)}


@pytest.mark.parametrize("toy, lengths", [("toy-recurrentgemma", (256, 512)), ("toy-jamba", (256,))])
def test_on_the_toys_keep_is_the_base_model_and_omit_removes_retrieval(tmp_path, toy, lengths):
    base = _toy_run(tmp_path, f"{toy}-base", lengths)
    keep = _toy_run(tmp_path, f"{toy}-needle-keep-keep", lengths)
    omit = _toy_run(tmp_path, f"{toy}-needle-omit-follow", lengths)
    assert [row["output"] for row in keep.values()] == [base[key]["output"] for key in keep]
    assert sum(row["exact"] for row in base.values()) == len(base) == 3 * len(lengths)
    assert sum(row["exact"] for row in omit.values()) == 0


@pytest.mark.parametrize("phase", ["generation", "both"])
@pytest.mark.parametrize("mode", ["generate", "fast"])
def test_the_papers_boundary_moves_the_needle_ops_phase_as_the_hooks(mode, phase):
    """With the paper's last-prompt-token boundary the needle op takes the last prompt token as a generation step,
    as the paper's sampler feeds it (and as the plan's hooks do): for a plan acting in one phase and for the
    needle presets' plans, which act in both phases (their prefill and generation modes differ); decoded and
    teacher-forced alike. Jamba: its global attention lets the last prompt token see the needle (the toy
    RecurrentGemma's window of 32 does not)."""
    from lab.models.generation import greedy
    from lab.probes import needle

    loaded = tiny("jamba")
    plan = replace(_plan(generation="omit"), phase=phase)
    spec = needle.NeedleSpec(task="passkey", mode=mode, max_new_tokens=2, phase_boundary="last-prompt-token")
    trial = needle.PromptBuilder(loaded.tokenizer, spec).build(300, 50, 0)
    at = -1 if mode == "generate" else 0  # teacher forcing keeps the logits from the last prompt token on

    def first_logits(answer) -> torch.Tensor:
        seen = []
        handle = loaded.model.register_forward_hook(
            lambda module, args, out: None if seen else seen.append(out.logits[0, at].float()))
        try:
            with apply_plan(loaded.model, loaded.anatomy, plan) as tracker:
                answer(tracker)
        finally:
            handle.remove()
        return seen[0]

    def one_short(end: int):
        def answer(tracker):
            tracker.needles, tracker.prompt_len = {tuple(trial.ids): trial.needle_spans}, end
            if mode == "generate":
                greedy(loaded, [trial.ids], 2)
                return
            answer_ids = loaded.tokenizer(trial.answer, add_special_tokens=False)["input_ids"]
            loaded.model(input_ids=torch.tensor([trial.ids + answer_ids]), use_cache=False,
                         logits_to_keep=len(answer_ids) + 1)
        return answer

    lab = first_logits(lambda tracker: needle.run_batch(loaded, spec, [trial], tracker))
    torch.testing.assert_close(lab, first_logits(one_short(len(trial.ids) - 1)), atol=1e-4, rtol=0)
    assert (lab - first_logits(one_short(len(trial.ids)))).abs().max() > 1e-3  # the boundary matters here


def test_mmlu_under_a_needle_plan_scores_as_the_base_model():
    """MMLU prompts hold no needle, so omitting it changes nothing (it crashed: the op sized its needle table by
    MMLU's prompt length past every position)."""
    from lab.probes import mmlu

    loaded = tiny("jamba")
    work = mmlu.MMLUProbe().prepare(loaded, mmlu.MMLUSpec(limit=2)).work(set())

    def scored(plan) -> torch.Tensor:
        with apply_plan(loaded.model, loaded.anatomy, plan) as tracker:
            return torch.tensor([r["loglik"] for r in sorted(work.answer(work.items, tracker), key=lambda r: r["key"])])

    torch.testing.assert_close(scored(_plan(generation="omit", prefill="omit")), scored(Plan()), atol=1e-4, rtol=0)
