"""Expert ablation in MoE blocks: plan.experts_off with expert_mode zero or reroute, its sites and sweep axis."""

import json

import pytest
import torch
import torch.nn.functional as F

from lab.cli import main
from lab.errors import LabError
from lab.interventions import Plan, Site, apply_plan, resolve
from lab.sweeps import Options, conditions

from conftest import ids, tiny

MOE = ["jamba", "qwen3_next", "minimax", "granitemoehybrid", "lfm2_moe", "nemotron_h", "kimi_linear"]


def moe_layer(loaded) -> int:
    return loaded.anatomy.blocks("moe")[0][0]


def logits(loaded, tokens, plan=None, prompt_len=None):
    if plan is None:
        with torch.no_grad():
            return loaded.model(input_ids=tokens, use_cache=False).logits
    with apply_plan(loaded.model, loaded.anatomy, plan, prompt_len=prompt_len), torch.no_grad():
        return loaded.model(input_ids=tokens, use_cache=False).logits


def routing(loaded, layer, tokens, plan=None) -> torch.Tensor:
    """The experts the router of `layer` picks for every token (top-k indices)."""
    seen = []
    router = loaded.model.get_submodule(loaded.anatomy.layers[layer].block("moe").router)
    handle = router.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    try:
        logits(loaded, tokens, plan)
    finally:
        handle.remove()
    return torch.cat(seen)


def expert_by_hand(experts, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's MLP on x, from the fused weights (gated: act(gate) * up; NemotronH: act(up))."""
    if hasattr(experts, "gate_up_proj"):
        gate, up = F.linear(x, experts.gate_up_proj[expert]).chunk(2, dim=-1)
        hidden = experts.act_fn(gate) * up
    else:
        hidden = experts.act_fn(F.linear(x, experts.up_proj[expert]))
    return F.linear(hidden, experts.down_proj[expert])


def without_expert_by_hand(experts, expert: int):
    """A forward hook on an experts module: its output minus what `expert` added (its weighted output)."""
    def hook(module, args, output):
        x, index, weights = args
        token, slot = torch.where(index == expert)
        removed = torch.zeros_like(output)
        removed.index_add_(0, token, expert_by_hand(experts, expert, x[token]) * weights[token, slot, None])
        return output - removed
    return hook


# ---- the plan: TOML keys, validation, words ---------------------------------------------------------
def test_a_plan_with_experts_round_trips_and_one_without_serialises_as_before():
    data = {"mode": "zero", "phase": "both", "experts_off": [[1, 2], [3, 0]], "expert_mode": "reroute"}
    plan = Plan.from_dict(data)
    assert plan.experts_off == ((1, 2), (3, 0)) and plan.expert_mode == "reroute"
    assert plan.to_dict() == data and not plan.is_empty
    assert Plan.from_dict({"experts_off": [[1, 2]]}).to_dict() == {"mode": "zero", "phase": "both",
                                                                  "experts_off": [[1, 2]], "expert_mode": "zero"}
    assert Plan().to_dict() == {"mode": "zero", "phase": "both"}  # what every existing preset's plan gives
    assert Plan.from_dict({"heads_off": [[2, 1]]}).to_dict() == {"mode": "zero", "phase": "both",
                                                                "heads_off": [[2, 1]]}


@pytest.mark.parametrize("data, message", [
    ({"experts_off": [[0, 1]]}, r"plan.experts_off: layer 0 has no MoE block \(these do: 1, 3\)"),
    ({"experts_off": [[1, 4]]}, r"plan.experts_off: expert 4 is out of range for layer 1 \(0..3\)"),
    ({"experts_off": [[9, 0]]}, r"plan.experts_off: layer 9 is out of range \(0..3\)"),
    ({"experts_off": [[1, 0]], "expert_mode": "drop"}, r"plan.expert_mode: 'drop' is not one of zero, reroute"),
    ({"experts_off": [1, 0]}, r"plan.experts_off: expected \[layer, expert\] pairs, got 1"),
    ({"experts_off": [[1, 0], [1, 1], [1, 2]], "expert_mode": "reroute"},
     r"plan.experts_off: rerouting leaves 1 of 4 experts in layer 1, fewer than its top-k 2"),
])
def test_bad_experts_are_one_line_errors(data, message):
    with pytest.raises(LabError, match=message) as error:
        Plan.from_dict(data, tiny("jamba").anatomy)
    assert "\n" not in str(error.value)


def test_reroute_needs_a_router():
    from lab.models.anatomy import Anatomy, Block, Layer

    anatomy = Anatomy("made-up", (Layer(0, "moe", (Block("moe", "moe", "model.layers.0.mlp", experts=4, top_k=2),)),))
    assert Plan.from_dict({"experts_off": [[0, 1]]}, anatomy).experts_off == ((0, 1),)  # zero needs none
    with pytest.raises(LabError, match="plan.expert_mode: layer 0's MoE block has no router lab can mask; use zero"):
        Plan.from_dict({"experts_off": [[0, 1]], "expert_mode": "reroute"}, anatomy)


def test_the_cli_reports_a_layer_without_moe_in_one_line(tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text('version = 1\nname = "x"\n[model]\nname = "random:jamba"\n[plan]\nexperts_off = [[2, 0]]\n'
                      '[needle]\ntask = "passkey"\nlengths = [300]\ndepths = [0]\n')
    assert main(["run", str(preset), "--db", str(tmp_path / "db.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lab: plan.experts_off: layer 2 has no MoE block (these do: 1, 3)"


def test_the_plan_says_how_many_experts_are_off():
    anatomy = tiny("jamba").anatomy
    assert Plan.from_dict({"experts_off": [[1, 2]]}).describe(anatomy) == "1/8 experts off (zero)"
    assert (Plan.from_dict({"experts_off": [[1, 2], [3, 1]], "expert_mode": "reroute"}).describe(anatomy)
            == "2/8 experts off (rerouted)")


# ---- anatomy and sites ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MOE)
def test_the_anatomy_names_router_and_experts(arch):
    loaded = tiny(arch)
    blocks = loaded.anatomy.blocks("moe")
    assert blocks
    for _, block in blocks:
        router = loaded.model.get_submodule(block.router)
        experts = loaded.model.get_submodule(block.experts_path)
        assert (block.experts, block.top_k) == (4, 2)
        assert router.weight.shape == (4, loaded.model.config.hidden_size) and experts.num_experts == 4
    moe = [b for layer in loaded.anatomy.to_json()["layers"] for b in layer["blocks"] if b["kind"] == "moe"]
    assert moe[0]["experts"] == 4 and moe[0]["top_k"] == 2 and moe[0]["router"] == blocks[0][1].router


def test_expert_sites_are_named_and_resolved():
    site = Site.parse("L3.moe.e2")
    assert (site.layer, site.kind, site.head, site.expert) == (3, "moe", None, 2) and str(site) == "L3.moe.e2"
    with pytest.raises(LabError, match="only MoE blocks have experts"):
        Site.parse("L3.attn.e2")
    resolved = resolve(Plan.from_dict({"experts_off": [[3, 2], [1, 0]], "heads_off": [[2, 1]]}), tiny("jamba").anatomy)
    assert resolved.names() == ["L1.moe.e0", "L2.attn.h1", "L3.moe.e2"]
    assert resolved.is_off(site) and not resolved.is_off(Site(3, "moe", expert=1))
    assert resolved.experts_by_layer() == {1: {0}, 3: {2}} and not resolved.is_empty


# ---- zero: the expert's output dropped, routing untouched ---------------------------------------------
@pytest.mark.parametrize("arch", MOE)
def test_zero_drops_exactly_the_experts_weighted_output(arch):
    loaded = tiny(arch)
    layer, tokens = moe_layer(loaded), ids()
    experts = loaded.model.get_submodule(loaded.anatomy.layers[layer].block("moe").experts_path)
    handle = experts.register_forward_hook(without_expert_by_hand(experts, 1))
    try:
        reference = logits(loaded, tokens)
    finally:
        handle.remove()
    base = logits(loaded, tokens)
    ablated = logits(loaded, tokens, Plan.from_dict({"experts_off": [[layer, 1]]}))
    assert (ablated - base).abs().max() > 1e-4  # expert 1 mattered
    torch.testing.assert_close(ablated, reference, rtol=1e-5, atol=1e-5)


def test_zero_keeps_the_routing():
    loaded = tiny("jamba")
    plan = Plan.from_dict({"experts_off": [[1, 1]]})
    assert torch.equal(routing(loaded, 1, ids(), plan), routing(loaded, 1, ids()))


def test_zero_in_generation_only_leaves_the_prompt_positions_alone():
    loaded = tiny("jamba")
    tokens = ids()
    base = logits(loaded, tokens)
    ablated = logits(loaded, tokens, Plan.from_dict({"experts_off": [[1, 1], [3, 0]], "phase": "generation"}),
                     prompt_len=12)
    assert torch.equal(ablated[:, :12], base[:, :12])
    assert (ablated[:, 12:] - base[:, 12:]).abs().max() > 1e-4


# ---- reroute: top-k picks other experts --------------------------------------------------------------
@pytest.fixture
def favoured(request):
    """A tiny model whose selection bias (if its router adds one) favours expert 1, so that masking the logit
    alone would still let top-k pick it; put back afterwards."""
    loaded = tiny(request.param)
    block = loaded.anatomy.layers[moe_layer(loaded)].block("moe")
    module, router = loaded.model.get_submodule(block.path), loaded.model.get_submodule(block.router)
    biases = [b for b in (getattr(module, "expert_bias", None), getattr(router, "e_score_correction_bias", None))
              if isinstance(b, torch.Tensor)]
    saved = [b.clone() for b in biases]
    for bias in biases:
        bias[1] = 10.0
    yield loaded
    for bias, old in zip(biases, saved):
        bias.copy_(old)


@pytest.mark.parametrize("favoured", MOE, indirect=True)
def test_reroute_never_picks_the_masked_expert(favoured):
    loaded = favoured
    layer, tokens = moe_layer(loaded), ids()
    assert (routing(loaded, layer, tokens) == 1).any()  # picked without the plan
    rerouted = routing(loaded, layer, tokens, Plan.from_dict({"experts_off": [[layer, 1]], "expert_mode": "reroute"}))
    assert not (rerouted == 1).any()


def _router_by_hand(arch: str, masked: int):
    """The router with one expert's logit at -inf, by hand: Jamba takes the top-2 of the softmax (weights left
    unnormalised), Granite the softmax of the top-2 logits."""
    def hook(router, args, output):
        router_logits = F.linear(args[0], router.weight).float()
        router_logits = router_logits.masked_fill(torch.arange(4) == masked, float("-inf"))
        if arch == "jamba":
            weights, index = torch.softmax(router_logits, -1).topk(router.top_k, dim=-1)
        else:
            top, index = router_logits.topk(router.top_k, dim=-1)
            weights = torch.softmax(top, -1)
        return output[0], weights.to(args[0].dtype), index
    return hook


@pytest.mark.parametrize("arch", ["jamba", "granitemoehybrid"])
def test_reroute_equals_routing_by_hand_without_the_expert(arch):
    loaded = tiny(arch)
    layer = loaded.anatomy.blocks("moe")[-1][0]
    router = loaded.model.get_submodule(loaded.anatomy.layers[layer].block("moe").router)
    handle = router.register_forward_hook(_router_by_hand(arch, 2))
    try:
        reference = logits(loaded, ids())
    finally:
        handle.remove()
    rerouted = logits(loaded, ids(), Plan.from_dict({"experts_off": [[layer, 2]], "expert_mode": "reroute"}))
    zeroed = logits(loaded, ids(), Plan.from_dict({"experts_off": [[layer, 2]]}))
    torch.testing.assert_close(rerouted, reference, rtol=1e-5, atol=1e-5)
    assert (rerouted - zeroed).abs().max() > 1e-4  # another expert took its place


def test_reroute_in_prefill_only_leaves_generation_routing_alone():
    loaded = tiny("jamba")
    tokens = ids()
    base = logits(loaded, tokens)
    plan = Plan.from_dict({"experts_off": [[3, 0], [3, 1]], "expert_mode": "reroute", "phase": "prefill"})
    ablated = logits(loaded, tokens, plan, prompt_len=12)
    assert (ablated[:, :12] - base[:, :12]).abs().max() > 1e-4
    with apply_plan(loaded.model, loaded.anatomy, plan, prompt_len=12):
        picked = routing(loaded, 3, tokens).reshape(2, 20, -1)
    assert not (picked[:, :12] <= 1).any() and (picked[:, 12:] <= 1).any()


# ---- leaving the plan restores the model bitwise ------------------------------------------------------
@pytest.mark.parametrize("mode", ["zero", "reroute"])
def test_leaving_the_plan_restores_outputs_and_weights_bitwise(mode):
    loaded = tiny("lfm2_moe")  # a router with a selection bias (expert_bias)
    state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    before = logits(loaded, ids())
    logits(loaded, ids(), Plan.from_dict({"experts_off": [[1, 0], [2, 3]], "expert_mode": mode}))
    after = logits(loaded, ids())
    assert torch.equal(before, after)
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    for module in loaded.model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks)


def test_an_error_inside_the_router_leaves_no_mode_and_no_hook_behind():
    loaded = tiny("jamba")
    router = loaded.model.get_submodule(loaded.anatomy.layers[1].block("moe").router)

    def fail(module, args):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with apply_plan(loaded.model, loaded.anatomy, Plan.from_dict({"experts_off": [[1, 0]],
                                                                      "expert_mode": "reroute"})):
            handle = router.register_forward_pre_hook(fail)  # runs after the plan's own pre-hook
            try:
                loaded.model(input_ids=ids(), use_cache=False)
            finally:
                handle.remove()
    assert torch._C._len_torch_function_stack() == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())


# ---- the experts sweep axis ---------------------------------------------------------------------------
def test_experts_axis_switches_each_expert_of_each_moe_layer_off_alone():
    anatomy = tiny("jamba").anatomy
    found = conditions(Options("experts"), anatomy, {"heads_off": [[2, 0]]})
    assert [c.label for c in found] == ["base"] + [f"L{l}.moe.e{e}" for l in (1, 3) for e in range(4)]
    assert found[2].value == [1, 1]
    assert found[2].plan == {"heads_off": [[2, 0]], "experts_off": [[1, 1]]}
    rerouted = conditions(Options("experts", layers=(3,), expert_mode="reroute", controls=1, seed=3), anatomy, {})
    assert [c.label for c in rerouted][1:3] == ["L3.moe.e0", "L3.moe.e0 · random 1"]
    assert all(c.plan["expert_mode"] == "reroute" for c in rerouted[1:])
    again = conditions(Options("experts", layers=(3,), expert_mode="reroute", controls=1, seed=3), anatomy, {})
    assert again == rerouted and len(rerouted[2].plan["experts_off"]) == 1


@pytest.mark.parametrize("options, message", [
    (Options("heads", expert_mode="zero"), "--expert-mode does not apply to axis heads"),
    (Options("experts", expert_mode="drop"), "--expert-mode: 'drop' is not one of zero, reroute"),
])
def test_bad_expert_sweep_options_are_one_line(options, message):
    with pytest.raises(LabError, match=message):
        options.validate()


def test_experts_axis_on_a_model_without_moe_and_a_layer_without_moe():
    with pytest.raises(LabError, match="recurrent_gemma has no moe blocks to sweep"):
        conditions(Options("experts"), tiny("recurrent_gemma").anatomy, {})
    with pytest.raises(LabError, match="--layers: layer 2 has no moe block"):
        conditions(Options("experts", layers=(2,)), tiny("jamba").anatomy, {})


def test_options_without_expert_mode_keep_their_dict():
    assert "expert_mode" not in Options("heads").to_dict()  # so earlier sweeps keep their fingerprints
    assert Options("experts", expert_mode="reroute").to_dict()["expert_mode"] == "reroute"


# ---- cached generation and accelerate ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["zero", "reroute"])
@pytest.mark.parametrize("phase", ["prefill", "generation"])
def test_cached_generate_agrees_with_teacher_forcing(mode, phase):
    loaded = tiny("jamba")
    plan = Plan.from_dict({"experts_off": [[1, 0], [3, 2]], "expert_mode": mode, "phase": phase})
    prompt = ids(2, 12, seed=3) + 1
    with torch.no_grad(), apply_plan(loaded.model, loaded.anatomy, plan):
        gen = loaded.model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=256, eos_token_id=None)
    full = logits(loaded, gen.sequences[:, :-1], plan, prompt_len=prompt.shape[1])
    torch.testing.assert_close(full[:, prompt.shape[1] - 1:], torch.stack(gen.logits, 1), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("favoured", ["nemotron_h"], indirect=True)
def test_reroute_under_accelerate_offload_with_buffers(favoured, tmp_path):
    """accelerate moves the router's weight and its selection bias in during each forward."""
    from accelerate import cpu_offload

    from lab.models import ModelSpec, load

    favoured.model.save_pretrained(tmp_path)
    favoured.tokenizer.save_pretrained(tmp_path)
    loaded = load(ModelSpec(str(tmp_path), dtype="float32"))
    cpu_offload(loaded.model, execution_device=torch.device("cpu"), offload_buffers=True)
    layer = moe_layer(loaded)
    plan = Plan.from_dict({"experts_off": [[layer, 1]], "expert_mode": "reroute"})
    assert (routing(loaded, layer, ids()) == 1).any()
    assert not (routing(loaded, layer, ids(), plan) == 1).any()
    torch.testing.assert_close(logits(loaded, ids(), plan), logits(favoured, ids(), plan), rtol=1e-5, atol=1e-5)


def test_lab_sweep_takes_the_expert_mode_from_the_command_line(tmp_path, capsys):
    """`lab sweep --over experts --expert-mode reroute` reroutes each condition's expert; a bad mode is one line."""
    from lab.cli import main

    preset = tmp_path / "p.toml"
    preset.write_text('version = 1\nname = "demo"\n[model]\nname = "random:jamba"\n[needle]\ntask = "passkey"\n'
                      'lengths = [300]\ndepths = [50]\ntrials = 1\nmax_new_tokens = 4\nmode = "fast"\n')
    db = str(tmp_path / "r.sqlite")
    assert main(["sweep", str(preset), "--over", "experts", "--layers", "3", "--expert-mode", "reroute",
                 "--db", db, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c["plan"]["expert_mode"] for c in result["conditions"]] == ["reroute"] * 4
    assert main(["sweep", str(preset), "--over", "experts", "--expert-mode", "drop", "--db", db]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["lab: --expert-mode: 'drop' is not one of zero, reroute"]
