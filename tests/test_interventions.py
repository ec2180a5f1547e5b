import pytest
import torch
import torch.nn.functional as F

from lab.errors import LabError
from lab.interventions import BlocksOff, Plan, Sparsify, apply_plan, calibrate, kv_group_heads

from conftest import HYBRIDS, ids, tiny


def logits(loaded, x, plan=None, **kwargs):
    with torch.no_grad():
        if plan is None:
            return loaded.model(input_ids=x).logits
        with apply_plan(loaded.model, loaded.anatomy, plan, **kwargs):
            return loaded.model(input_ids=x).logits


def delta(a, b):
    return (a - b).abs().max().item()


def test_each_block_kind_changes_logits_and_layers_differ(any_model):
    x = ids()
    base = logits(any_model, x)
    for kind in ("attention", "ssm", "mlp", "moe"):
        layers = [i for i, _ in any_model.anatomy.blocks(kind)]
        outs = [logits(any_model, x, Plan(off=(BlocksOff(kind, (i,)),))) for i in layers]
        for out in outs:
            assert delta(out, base) > 0
        if len(outs) >= 2:
            assert delta(outs[0], outs[1]) > 0


def test_removal_restores_bitwise(any_model):
    x = ids()
    before = logits(any_model, x)
    plans = [Plan(off=(BlocksOff(kind),), phase=phase) for kind, phase in (("ssm", "both"), ("mlp", "generation"))
             if any_model.anatomy.blocks(kind)]  # pure Mamba has no MLP
    if any_model.anatomy.attention_layers:
        plans += [Plan(heads_off=((any_model.anatomy.attention_layers[0], 0),)), Plan(sparsify=Sparsify(1))]
    impl = any_model.model.config._attn_implementation
    for plan in plans:
        logits(any_model, x, plan)
    assert torch.equal(before, logits(any_model, x))
    assert any_model.model.config._attn_implementation == impl


def test_heads_off_folded_into_weight_equals_hook_and_restores(hybrid):
    """Heads zeroed at every position are folded into o_proj's weight; the hook path gives the same logits."""
    x = ids()
    model, anatomy = hybrid.model, hybrid.anatomy
    layer = anatomy.attention_layers[0]
    proj = model.get_submodule(anatomy.attention(layer).out_proj)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = Plan(heads_off=((layer, 0), (layer, 1)))
    with torch.inference_mode(), apply_plan(model, anatomy, plan):
        weights = [model.get_submodule(b.out_proj).weight.data_ptr() for _, b in anatomy.blocks("attention")]
        shared = weights.count(proj.weight.data_ptr()) > 1
        assert bool(proj._forward_pre_hooks) == shared  # folded unless layers share the weight (Zamba ties them)
        assert (proj.weight[:, : 2 * anatomy.attention(layer).head_dim].abs().sum() == 0) != shared
        folded = model(input_ids=x).logits
    hooked = logits(hybrid, x, plan.with_(phase="prefill"), prompt_len=x.shape[1])  # phase-aware: hook path
    assert torch.allclose(folded, hooked, atol=1e-6)
    assert delta(folded, logits(hybrid, x)) > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_removal_restores_after_exception():
    loaded = tiny("jamba")
    x = ids()
    before = logits(loaded, x)
    layer = loaded.anatomy.attention_layers[0]
    plan = Plan(sparsify=Sparsify(1), off=(BlocksOff("ssm"),), heads_off=((layer, 0),))
    with pytest.raises(RuntimeError):
        with apply_plan(loaded.model, loaded.anatomy, plan):
            raise RuntimeError("boom")
    assert torch.equal(before, logits(loaded, x))


def _output_hook(value_fn):
    def hook(module, args, output):
        out = output[0]
        return (value_fn(out),) + tuple(output[1:])
    return hook


def test_all_heads_off_equals_zero_output_minus_bias(hybrid):
    x = ids()
    model, anatomy = hybrid.model, hybrid.anatomy
    for layer, block in anatomy.blocks("attention"):
        heads_off = logits(hybrid, x, Plan(heads_off=tuple((layer, h) for h in range(block.heads))))
        block_off = logits(hybrid, x, Plan(off=(BlocksOff("attention", (layer,)),)))
        bias = model.get_submodule(block.out_proj).bias
        if bias is None:
            assert torch.equal(heads_off, block_off)
        else:
            assert delta(heads_off, block_off) > 0  # the bias survives head ablation
            handle = model.get_submodule(block.path).register_forward_hook(
                _output_hook(lambda out: bias.expand_as(out).to(out.dtype)))
            try:
                with torch.no_grad():
                    only_bias = model(input_ids=x).logits
            finally:
                handle.remove()
            assert torch.allclose(heads_off, only_bias, atol=1e-6)


def test_one_head_moves_less_than_its_block(hybrid):
    x = ids()
    base = logits(hybrid, x)
    for layer, block in hybrid.anatomy.blocks("attention"):
        one = delta(logits(hybrid, x, Plan(heads_off=((layer, 0),))), base)
        whole = delta(logits(hybrid, x, Plan(off=(BlocksOff("attention", (layer,)),))), base)
        assert 0 < one < whole


def test_sparsify_bounds(hybrid):
    x = ids()
    model = hybrid.model
    heads = max(b.heads for _, b in hybrid.anatomy.blocks("attention"))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        eager_base = logits(hybrid, x)
    finally:
        model.set_attn_implementation(previous)
    assert torch.allclose(logits(hybrid, x, Plan(sparsify=Sparsify(heads))), eager_base, atol=1e-6)
    all_off = logits(hybrid, x, Plan(keep_heads=()))
    assert torch.allclose(logits(hybrid, x, Plan(sparsify=Sparsify(0))), all_off, atol=1e-5)
    middle = logits(hybrid, x, Plan(sparsify=Sparsify(1, "l2")))
    assert delta(middle, eager_base) > 0 and delta(middle, all_off) > 0


def test_sparsify_keeps_lowest_entropy_heads():
    """k=1: per token, only the head whose attention row has the lowest entropy reaches o_proj."""
    loaded = tiny("jamba")
    model, anatomy = loaded.model, loaded.anatomy
    block = anatomy.attention(anatomy.attention_layers[0])
    proj, attn = model.get_submodule(block.out_proj), model.get_submodule(block.path)
    seen = {}
    x = ids(1, 12)
    with apply_plan(model, anatomy, Plan(sparsify=Sparsify(1))), torch.no_grad():
        hooks = [proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].clone())),
                 attn.register_forward_hook(lambda m, a, o: seen.update(out=o[0], w=o[1]))]
        try:
            model(input_ids=x)
        finally:
            for hook in hooks:
                hook.remove()
    w = seen["w"][0].float()  # (H, T, K)
    best = (-(w * torch.log2(w + 1e-12)).sum(-1)).argmin(0)  # lowest entropy head per token
    heads_in = seen["in"][0].reshape(12, block.heads, -1)
    kept = torch.zeros_like(heads_in)
    kept[torch.arange(12), best] = heads_in[torch.arange(12), best]
    expected = F.linear(kept.reshape(12, -1), proj.weight, proj.bias)
    # token 0 attends to itself only: every head ties at entropy 0, so compare from token 1 on
    assert torch.allclose(seen["out"][0, 1:], expected[1:], atol=1e-5)


@pytest.mark.parametrize("phase", ["prefill", "generation", "both"])
def test_generation_phase_leaves_prompt_untouched(hybrid, phase):
    x = ids(2, 16)
    prompt_len = 10
    base = logits(hybrid, x)
    plan = Plan(off=(BlocksOff("attention"),), heads_off=(), phase=phase)
    out = logits(hybrid, x, plan, prompt_len=prompt_len)
    if phase == "generation":
        assert torch.equal(out[:, :prompt_len], base[:, :prompt_len])
        assert delta(out[:, prompt_len:], base[:, prompt_len:]) > 0
    elif phase == "prefill":
        assert delta(out[:, :prompt_len], base[:, :prompt_len]) > 0
    else:
        assert delta(out, base) > 0


def _plans(anatomy):
    layer = anatomy.attention_layers[0]
    return [Plan(off=(BlocksOff("attention"),)), Plan(heads_off=((layer, 0),), off=(BlocksOff("ssm"),)),
            Plan(sparsify=Sparsify(1))]


@pytest.mark.parametrize("phase", ["prefill", "generation", "both"])
@pytest.mark.parametrize("arch", HYBRIDS)
def test_cached_generate_agrees_with_teacher_forcing(arch, phase):
    loaded = tiny(arch)
    model, anatomy = loaded.model, loaded.anatomy
    prompt = ids(2, 12, seed=3) + 1
    for plan in _plans(anatomy):
        plan = plan.with_(phase=phase)
        with torch.no_grad(), apply_plan(model, anatomy, plan):
            gen = model.generate(prompt, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=256, eos_token_id=None)
        step_logits = torch.stack(gen.logits, 1)  # (B, 4, V)
        full = logits(loaded, gen.sequences[:, :-1], plan, prompt_len=prompt.shape[1])
        assert torch.allclose(full[:, prompt.shape[1] - 1:], step_logits, atol=2e-4), (arch, plan)


def test_mean_mode_replaces_with_calibration_means():
    loaded = tiny("recurrent_gemma")
    model, anatomy = loaded.model, loaded.anatomy
    plan = Plan(off=(BlocksOff("attention", (2,)),), heads_off=((5, 1),), mode="mean")
    with pytest.raises(LabError, match="calibration"):
        with apply_plan(model, anatomy, plan):
            pass
    means = calibrate(model, anatomy, plan, [ids(2, 24, seed=5)])
    assert means[("block", 2, "attention")].shape == (64,)
    assert means[("heads", 5)].shape == (64,)
    seen = {}
    x = ids()
    with apply_plan(model, anatomy, plan, means=means), torch.no_grad():
        handle = model.get_submodule(anatomy.attention(2).path).register_forward_hook(
            lambda m, a, o: seen.__setitem__("out", o[0]))
        try:
            mean_out = model(input_ids=x).logits
        finally:
            handle.remove()
    assert torch.allclose(seen["out"], means[("block", 2, "attention")].expand_as(seen["out"]))
    zero_out = logits(loaded, x, plan.with_(mode="zero"))
    assert delta(mean_out, zero_out) > 0


def test_kv_group_helper():
    anatomy = tiny("jamba").anatomy  # 4 query heads, 2 KV heads
    assert kv_group_heads(anatomy, 2, 1) == [(2, 2), (2, 3)]
    plan = Plan.from_dict({"kv_heads_off": [[2, 0]]}, anatomy)
    assert plan.heads_off == ((2, 0), (2, 1))
    with pytest.raises(LabError, match="KV head 2 is out of range"):
        kv_group_heads(anatomy, 2, 2)


def test_accelerate_device_map(tmp_path):
    """Our hooks compose with accelerate's dispatch hooks (device_map / offload) on CPU."""
    from accelerate import cpu_offload

    from lab.models import ModelSpec, load

    source = tiny("bamba")
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    loaded = load(ModelSpec(str(tmp_path), device="device_map", dtype="float32"))
    x = ids()
    base = logits(loaded, x)
    cpu_offload(loaded.model, execution_device=torch.device("cpu"))
    assert any(hasattr(m, "_hf_hook") for m in loaded.model.modules())
    plan = Plan(off=(BlocksOff("attention", (1,)),), heads_off=((3, 1),), sparsify=Sparsify(2))
    assert torch.allclose(logits(loaded, x), base)
    assert delta(logits(loaded, x, plan), base) > 0
    assert torch.allclose(logits(loaded, x, plan), logits(source, x, plan), atol=1e-5)
    assert torch.equal(logits(loaded, x), logits(loaded, x))


def test_sparsify_scores_in_the_models_dtype_as_the_authors_did():
    """score_dtype = "model" sums the entropy in bf16 (the authors' code), "fp32" (lab's default) in fp32;
    a plan written without it keeps its old form, so stored fingerprints stay."""
    from lab.interventions.hooks import head_scores

    assert Plan.from_dict({"sparsify": {"k": 1}}).to_dict()["sparsify"] == {"k": 1, "metric": "entropy"}
    plan = Plan.from_dict({"sparsify": {"k": 1, "score_dtype": "model"}})
    assert plan.sparsify.score_dtype == "model" and Plan.from_dict(plan.to_dict()) == plan
    with pytest.raises(LabError, match="plan.sparsify.score_dtype: 'bf16' is not one of fp32, model"):
        Plan.from_dict({"sparsify": {"k": 1, "score_dtype": "bf16"}})
    probs = torch.softmax(torch.randn(1, 4, 3, 50, generator=torch.Generator().manual_seed(0)), -1).bfloat16()
    fp32, model = head_scores(probs, "entropy", "fp32"), head_scores(probs, "entropy", "model")
    assert fp32.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert torch.allclose(fp32, model.float(), atol=0.05)
    loaded = tiny("jamba")
    x = ids()
    base = logits(loaded, x)
    assert delta(logits(loaded, x, plan), base) > 0
    assert torch.equal(logits(loaded, x), base)
