import torch

from lab import fast
from lab.interventions import BlocksOff, Plan, apply_plan
from lab.models import load

from conftest import ids


def test_linear_scan_matches_the_loop():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 150, 8, generator=g)
    a[:, 0] = 0
    a[:, 70] = 0  # resets
    x = torch.randn(3, 150, 8, generator=g)
    h0 = torch.randn(3, 8, generator=g)
    h, expected = h0.clone(), []
    for t in range(150):
        h = a[:, t] * h + x[:, t]
        expected.append(h)
    out, last = fast.linear_scan(a, x, h0)
    assert torch.allclose(out, torch.stack(expected, 1), atol=1e-4)
    assert torch.allclose(last, expected[-1], atol=1e-4)


def test_gradients_are_finite_through_resets():
    a = torch.rand(2, 40, 4)
    a[:, 0] = 0
    a.requires_grad_(True)
    x = torch.randn(2, 40, 4, requires_grad=True)
    fast.linear_scan(a, x)[0].sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(x.grad).all()


def _reference_vs_fast(loaded, x, plan, prompt_len, prompt):
    """(full logits, planned logits, cached-generate step logits) with lab.fast off and on."""
    model, anatomy = loaded.model, loaded.anatomy
    outs = {}
    try:
        for on in (False, True):
            fast.enable(on)
            with torch.no_grad():
                full = model(input_ids=x).logits
                with apply_plan(model, anatomy, plan, prompt_len=prompt_len):
                    planned = model(input_ids=x).logits
                gen = model.generate(x[:, :prompt], max_new_tokens=5, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=256, eos_token_id=None)
            outs[on] = (full, planned, torch.stack(gen.logits, 1))
    finally:
        fast.enable(True)
    return outs[False], outs[True]


def test_recurrentgemma_fast_path_matches_reference_with_plans():
    plan = Plan(off=(BlocksOff("attention"),), phase="generation")
    reference, quick = _reference_vs_fast(load("random:recurrent_gemma"), ids(2, 200), plan, 150, 50)
    for a, b in zip(reference, quick):
        assert torch.allclose(a, b, atol=1e-4)
    assert fast.enabled()


def test_jamba_parallel_selective_scan_matches_reference(monkeypatch):
    from lab.fast import mamba

    monkeypatch.setattr(mamba, "PARALLEL_DEVICES", {"cuda", "cpu"})  # CI has no GPU: run that path here
    plan = Plan(off=(BlocksOff("attention"),), phase="generation")
    reference, quick = _reference_vs_fast(load("random:jamba"), ids(2, 160), plan, 100, 40)
    for a, b in zip(reference, quick):
        assert torch.allclose(a, b, atol=1e-4)
