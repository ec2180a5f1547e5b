import pytest
import torch

from lab.fast import decode, jamba_decode
from lab.interventions import BlocksOff, Plan, Sparsify, apply_plan
from lab.interventions.plan import NeedleAttention
from lab.models import ModelSpec, load
from lab.probes import needle
from lab.probes.needle import NeedleSpec, PromptBuilder

from conftest import ids

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CUDA graph)")
PLANS = {"base": Plan(), "heads and moe off": Plan(heads_off=((2, 0), (2, 3)), off=(BlocksOff("moe", (1,)),)),
         "sparsify": Plan(sparsify=Sparsify(1)), "attention off": Plan(off=(BlocksOff("attention"),))}
_LOADED: dict = {}


def _load(name: str, device: str = "cpu", dtype: str = "float32", fast: bool = True):
    key = (name, device, dtype, fast)
    if key not in _LOADED:
        _LOADED[key] = load(ModelSpec(name, device=device, dtype=dtype, fast=fast))
    return _LOADED[key]


def _groups(device) -> list[torch.Tensor]:
    """Three prompt lengths (several rows in some), as the needle probe hands them over."""
    return [ids(2, 20, seed=1).to(device), ids(1, 33, seed=2).to(device), ids(3, 9, seed=3).to(device)]


CASES = [pytest.param("random:jamba", plan, id=f"random:jamba-{key}") for key, plan in PLANS.items()]
CASES.append(pytest.param("toy-jamba", PLANS["heads and moe off"], id="toy-jamba"))  # its plans: the needle test


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("name, plan", CASES)
def test_jamba_decoder_matches_generate_and_teacher_forcing(name, plan, device):
    """All prompt lengths decode together; each row's tokens and logits are generate()'s for its group alone,
    and the logits those of one forward pass over the prompt and the decoded tokens."""
    loaded = _load(name, device)
    model, groups, new = loaded.model, _groups(device), 10
    assert jamba_decode.supports(model)
    with apply_plan(model, loaded.anatomy, plan), torch.no_grad():
        tokens, logits = jamba_decode.greedy(model, groups, new, return_logits=True)
        expected = [model.generate(group, max_new_tokens=new, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=256, eos_token_id=None)
                    for group in groups]
        forced = [model(input_ids=out.sequences[:, :-1]).logits[:, group.shape[1] - 1:]
                  for group, out in zip(groups, expected)]
    atol = 1e-4 if device == "cpu" else 1e-3
    assert torch.equal(tokens, torch.cat([out.sequences[:, -new:] for out in expected]))
    assert torch.allclose(logits, torch.cat([torch.stack(out.logits, 1) for out in expected]), atol=atol)
    assert torch.allclose(logits, torch.cat(forced).float(), atol=atol)


def test_jamba_decoder_stops_when_every_row_has_eos():
    model = _load("random:jamba").model
    group = ids(1, 12)
    full = jamba_decode.greedy(model, [group], 20)
    eos = int(full[0, 3])  # a token made early; the check runs every 8 steps
    stopped = jamba_decode.greedy(model, [group], 20, eos_id=eos)
    assert (stopped == eos).any(1).all() and stopped.shape[1] < 20
    assert torch.equal(stopped, full[:, :stopped.shape[1]])


def test_jamba_decoder_only_where_it_applies():
    loaded = _load("random:jamba")
    model = loaded.model
    assert jamba_decode.supports(model) and not decode.supports(model)
    assert not jamba_decode.supports(_load("random:jamba", fast=False).model)
    assert not jamba_decode.supports(load(ModelSpec("random:recurrent_gemma", device="cpu")).model)
    model.set_experts_implementation("eager")  # its loop over experts synchronises with the host
    try:
        assert not jamba_decode.supports(model)
    finally:
        model.set_experts_implementation("grouped_mm")
    assert jamba_decode.supports(model)


def test_jamba_without_experts_decodes_on_any_experts_implementation():
    """A dense Jamba (MLPs only) has no experts loop to avoid: the decoder takes it and matches generate()."""
    from transformers import JambaForCausalLM

    base = _load("random:jamba").model.config
    config = type(base)(**{**base.to_dict(), "num_experts": 1, "experts_implementation": "eager"})
    torch.manual_seed(0)
    model = JambaForCausalLM(config).eval()
    assert model.config._experts_implementation == "eager" and jamba_decode.supports(model)
    groups = _groups("cpu")[:2]
    with torch.no_grad():
        tokens, logits = jamba_decode.greedy(model, groups, 6, return_logits=True)
        expected = [model.generate(group, max_new_tokens=6, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=256, eos_token_id=None)
                    for group in groups]
    assert torch.equal(tokens, torch.cat([out.sequences[:, -6:] for out in expected]))
    assert torch.allclose(logits, torch.cat([torch.stack(out.logits, 1) for out in expected]), atol=1e-4)


NEEDLE_PLANS = {"base": Plan(), "sparsify": Plan(sparsify=Sparsify(2)),
                "needle omitted in generation": Plan(needle_attention=NeedleAttention(generation="omit")),
                "attention off in generation": Plan(off=(BlocksOff("attention"),), phase="generation"),
                "sparsify in generation": Plan(sparsify=Sparsify(1), phase="generation"),
                "attention off in prefill": Plan(off=(BlocksOff("attention"),), phase="prefill")}


@pytest.mark.parametrize("boundary", ["prompt", "last-prompt-token"])
@pytest.mark.parametrize("plan", NEEDLE_PLANS.values(), ids=NEEDLE_PLANS.keys())
def test_needle_probe_answers_the_same_with_the_jamba_decoder(plan, boundary, monkeypatch):
    """toy-jamba's needle answers per trial, with the fixed-buffer decoder (fast paths on) and with generate()
    (off), whatever the plan's phase and the phase boundary: every length is decoded together."""
    spec = NeedleSpec(task="passkey", lengths=(256, 300), depths=(50,), max_new_tokens=8, phase_boundary=boundary)
    calls = []
    real = jamba_decode.greedy
    monkeypatch.setattr(jamba_decode, "greedy", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    rows = {}
    for fast in (True, False):
        loaded = _load("toy-jamba", fast=fast)
        trials = [PromptBuilder(loaded.tokenizer, spec).build(*cell) for cell in spec.cells()]
        with apply_plan(loaded.model, loaded.anatomy, plan) as tracker:
            rows[fast] = needle.run_batch(loaded, spec, trials, tracker)
    assert len(calls) == 1  # once, in one batch, for the model on the fast paths
    assert [r["output"] for r in rows[True]] == [r["output"] for r in rows[False]]
    assert any(r["output"] for r in rows[True])


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jamba_cuda_graph_decoder_equals_the_eager_step(dtype, monkeypatch):
    """One step captured as a CUDA graph and replayed gives what the same step run eagerly gives; in float32
    (torch's grouped product copies to the host there) the steps run eagerly."""
    model = _load("random:jamba", "cuda", dtype).model
    groups = _groups("cuda")
    captured = []
    graph = decode._graph
    monkeypatch.setattr(decode, "_graph", lambda step, room, device: captured.append(1) or graph(step, room, device))
    graphed = jamba_decode.greedy(model, groups, 12, return_logits=True)
    assert captured == ([1] if dtype == "bfloat16" else [])
    monkeypatch.setattr(decode, "_graph", lambda step, room, device: step)
    eager = jamba_decode.greedy(model, groups, 12, return_logits=True)
    assert torch.equal(graphed[0], eager[0])
    assert torch.allclose(graphed[1], eager[1], atol=1e-5 if dtype == "float32" else 1e-2)
