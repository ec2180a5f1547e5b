import pytest

from lab.interventions import BlocksOff, Plan, Sparsify
from lab.interventions.plan import NeedleAttention
from lab.interventions import Site, edit, resolve

from conftest import tiny


def test_toggles_produce_the_right_plan():
    anatomy = tiny("jamba").anatomy  # attention in layer 2; ssm in 0, 1, 3; moe in 1, 3
    plan = edit.toggle_block(Plan(), anatomy, 2, "attention")
    assert plan.off == (BlocksOff("attention"),)  # the only attention layer: "all attention"
    plan = edit.toggle_block(plan, anatomy, 1, "ssm")
    assert plan.off == (BlocksOff("attention"), BlocksOff("ssm", (1,)))
    plan = edit.toggle_block(plan, anatomy, 2, "attention")
    assert plan.off == (BlocksOff("ssm", (1,)),)
    plan = edit.toggle_kind(plan, anatomy, "ssm")
    assert plan.off == (BlocksOff("ssm"),)
    plan = edit.toggle_kind(plan, anatomy, "ssm")
    assert plan.is_empty
    plan = edit.toggle_layer(Plan(), anatomy, 3)
    assert plan.blocks_off(anatomy) == [(3, "moe"), (3, "ssm")]
    assert edit.toggle_layer(plan, anatomy, 3).is_empty


def test_head_toggles_and_keep_sets():
    anatomy = tiny("jamba").anatomy
    plan = edit.toggle_head(Plan(), anatomy, 2, 1)
    assert plan.heads_off == ((2, 1),) and resolve(plan, anatomy).is_off(Site(2, "attention", 1))
    assert edit.toggle_head(plan, anatomy, 2, 1).heads_off == ()
    keep = Plan(keep_heads=((2, 0),))
    flipped = edit.toggle_head(keep, anatomy, 2, 0)
    assert flipped.keep_heads is None and flipped.heads_off == ((2, 0), (2, 1), (2, 2), (2, 3))


def test_sparsify_phase_and_mode_steps():
    anatomy = tiny("jamba").anatomy  # 4 heads
    plan = edit.step_sparsify(Plan(), anatomy, -1)
    assert plan.sparsify == Sparsify(3)
    assert edit.step_sparsify(plan, anatomy, +1).sparsify is None
    assert edit.step_sparsify(Plan(sparsify=Sparsify(0)), anatomy, -1).sparsify == Sparsify(0)
    assert edit.next_phase(Plan()).phase == "prefill"
    assert edit.next_phase(edit.next_phase(Plan())).phase == "generation"
    assert edit.next_mode(Plan()).mode == "mean"
    assert Plan(off=(BlocksOff("attention"),), phase="generation").describe(anatomy) == \
        "attention off in 1/1 layers, generation only"


def test_a_plan_resolves_once_to_canonical_sites():
    from lab.errors import LabError

    anatomy = tiny("jamba").anatomy
    plan = Plan(off=(BlocksOff("ssm", (1,)), BlocksOff("attention")), keep_heads=((2, 1), (2, 3)))
    resolved = resolve(plan, anatomy)
    assert resolved.names() == ["L1.ssm", "L2.attn", "L2.attn.h0", "L2.attn.h2"]
    assert resolved.heads_by_layer() == {2: {0, 2}}
    assert resolved.is_off(Site(2, "attention")) and not resolved.is_off(Site(2, "attention", 1))
    assert all(Site.parse(name) in resolved.blocks | resolved.heads for name in resolved.names())
    assert str(Site.parse("L12.attn.h7")) == "L12.attn.h7"
    for bad in ("L2.ssm.h1", "layer2", "L2.attention"):
        with pytest.raises(LabError):
            Site.parse(bad)
    with pytest.raises(LabError, match="out of range"):
        resolve(Plan(heads_off=((2, 9),)), anatomy)


def test_needle_modes_cycle_per_phase():
    anatomy = tiny("jamba").anatomy
    plan = edit.next_needle_mode(Plan(), "generation")
    assert plan.needle_attention == NeedleAttention("omit", "keep")
    assert plan.describe(anatomy) == "needle: omit in generation, keep in prefill"
    seen = [plan.needle_attention.generation]
    for _ in range(4):
        plan = edit.next_needle_mode(plan, "generation")
        seen.append(plan.needle_attention.generation if plan.needle_attention else None)
    assert seen == ["omit", "only", "balanced", "null", None]  # back at keep/keep: the op leaves the plan
    plan = Plan(needle_attention=NeedleAttention("omit", "null"))
    plan = edit.next_needle_mode(plan, "prefill")
    assert plan.needle_attention.prefill == "follow"
    assert plan.describe(anatomy) == "needle: omit in generation and prefill"
    assert edit.next_needle_mode(plan, "prefill").needle_attention.prefill == "keep"
    scoped = Plan(needle_attention=NeedleAttention("null", layers=(2,)))
    assert edit.next_needle_mode(scoped, "generation").needle_attention == NeedleAttention("keep", layers=(2,))


@pytest.mark.parametrize("seed", ["2", "5"])
def test_site_names_order_a_block_before_its_head_0_whatever_the_hash_seed(seed):
    """Head 0 sorted as if it were the whole block, so the order followed the set's (string hash) order."""
    import os
    import subprocess
    import sys

    code = ("from lab.interventions.sites import Resolved, Site; from lab.interventions.plan import Plan; "
            "print(Resolved(Plan(), frozenset({Site(2, 'attention')}), frozenset({Site(2, 'attention', 0)})).names())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": seed}).stdout
    assert out.strip() == "['L2.attn', 'L2.attn.h0']"
