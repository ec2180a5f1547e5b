"""Needle attention and sparsification inside lab's window kernel (RecurrentGemma and Jamba on lab's fast paths):
the kernel's split output and online head scores against eager attention, and whole models against the
eager route. The kernel tests run on a GPU, or on a CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

import importlib.util
import os

import pytest
import torch

from lab.fast import attention
from lab.fast import state as fast_state
from lab.interventions import Plan, Sparsify, apply_plan, hooks
from lab.interventions.plan import NeedleAttention
from lab.models import ModelSpec, load

from conftest import ids

ON_GPU = torch.cuda.is_available()
kernel = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton on a GPU, or Triton's interpreter (TRITON_INTERPRET=1)")
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter runs the kernel in float32
NEEDLE = [(8, 14)]
PROMPT_LEN = 40
MODES = [("omit", "keep"), ("only", "follow"), ("null", "omit"), ("balanced", "keep"), ("keep", "balanced"),
         ("omit", "follow")]


def _inputs(batch=2, heads=4, kv=2, steps=150, dim=32, window=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, steps, dim, generator=g) * torch.linspace(0.3, 3, heads)[:, None, None]  # heads differ
    k, v = (torch.randn(batch, kv, steps, dim, generator=g) for _ in range(2))
    i = torch.arange(steps)
    mask = ((i[None] <= i[:, None]) & (i[None] > i[:, None] - window)).expand(batch, 1, steps, steps).clone()
    mask[-1, :, :, steps - 7:] = False  # right padding in the last row
    needle = torch.zeros(batch, steps, dtype=torch.bool)
    needle[:, 20:26] = True
    needle[-1, 100:103] = True
    q, k, v = (t.to(DEVICE, DTYPE) for t in (q, k, v))  # the reference starts from the same rounded inputs
    return [q, k, v, mask.to(DEVICE), needle.to(DEVICE)], window


def _eager_probs(q, k, v, mask):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1).float(), v.repeat_interleave(groups, 1).float()
    scores = (q.float() @ k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(), v


@kernel
def test_the_kernel_splits_the_output_at_the_needle_as_eager_attention_does():
    from lab.fast import triton_griffin

    (q, k, v, mask, needle), window = _inputs()
    parts = triton_griffin.window_attention_parts(q, k, v, mask, window, q.shape[-1] ** -0.5, needle=needle)
    p, values = _eager_probs(q, k, v, mask)
    on_needle = needle[:, None, None, :]
    tolerance = 2e-2 if ON_GPU else 1e-5
    for got, expected in [(parts.out, p.masked_fill(on_needle, 0) @ values),
                          (parts.needle_out, p.masked_fill(~on_needle, 0) @ values),
                          (parts.needle_values, (mask & on_needle).float() @ values)]:
        expected = expected.transpose(1, 2)
        assert ((got.float() - expected).norm() / expected.norm()).item() < tolerance
    assert torch.allclose(parts.mass, (p * on_needle).sum(-1), atol=tolerance)
    assert torch.equal(parts.shown, (mask & on_needle).sum(-1).float().expand_as(parts.shown))


@kernel
def test_rows_continuing_a_trunks_keys_attend_as_eager_attention_does():
    """lab.fast.fork's rows: queries at the last 150 of 210 keys, each row's keys before its first left out
    (before position 0), a 40-key window that reaches back into the first 60 (the trunk's)."""
    from lab.fast import triton_griffin

    g = torch.Generator().manual_seed(1)
    batch, heads, kv, steps, span, dim, window = 3, 4, 2, 150, 60, 32, 40
    q = torch.randn(batch, heads, steps, dim, generator=g)
    k, v = (torch.randn(batch, kv, span + steps, dim, generator=g) for _ in range(2))
    first = torch.tensor([0, 25, 60])
    at, cols = torch.arange(steps)[:, None] + span, torch.arange(span + steps)[None]
    mask = ((cols <= at) & (cols > at - window))[None] & (cols[None] >= first[:, None, None])
    q, k, v = (t.to(DEVICE, DTYPE) for t in (q, k, v))
    out = triton_griffin.continued_attention(q, k, v, first.to(DEVICE), window, dim ** -0.5)
    p, values = _eager_probs(q, k, v, mask[:, None].to(DEVICE))
    torch.testing.assert_close(out.float(), (p @ values).transpose(1, 2), atol=2e-2 if ON_GPU else 1e-5, rtol=0)


@kernel
@pytest.mark.parametrize("metric", ["entropy", "l2"])
def test_online_head_scores_pick_the_heads_eager_weights_pick(metric):
    """The kernel's per-query head scores against hooks.head_scores on eager weights: the same top-k heads
    wherever the k-th and the next score are apart (ties aside)."""
    from lab.fast import triton_griffin

    (q, k, v, mask, _), window = _inputs(heads=8, seed=3)
    parts = triton_griffin.window_attention_parts(q, k, v, mask, window, q.shape[-1] ** -0.5, metric=metric)
    p, _ = _eager_probs(q, k, v, mask)
    expected = hooks.head_scores(p.to(DTYPE), metric, "fp32")  # (B, H, T), as the sparsifier scores them
    margin = (5e-2 if metric == "entropy" else 1e-2) if ON_GPU else 1e-3  # bf16 on a GPU: p ln p sums drift more
    assert torch.allclose(parts.score, expected, atol=margin / 2)
    for keep in (1, 3, 6):
        ranked = expected.sort(1, descending=True).values
        clear = (ranked[:, keep - 1] - ranked[:, keep]) > margin  # (B, T)
        chosen = lambda s: torch.zeros_like(s).scatter_(1, s.topk(keep, 1).indices, 1.0)  # noqa: E731
        assert clear.float().mean() > 0.5  # most queries are compared
        assert torch.equal(chosen(parts.score).transpose(1, 2)[clear], chosen(expected).transpose(1, 2)[clear])


@pytest.fixture(params=["recurrent_gemma", "jamba"])
def model(request):
    loaded = load(ModelSpec(f"random:{request.param}", device=DEVICE, dtype="bfloat16" if ON_GPU else "float32"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in loaded.model.named_parameters():
            if name.endswith("o_proj.bias"):
                param.normal_(0, 0.5)
        for _, block in loaded.anatomy.blocks("attention"):  # attention that is not uniform, and heads of different
            module = loaded.model.get_submodule(block.path)  # sharpness: few near-ties for the sparsifier in bf16
            for proj in (module.q_proj, module.k_proj):
                proj.weight.normal_(0, proj.weight.shape[1] ** -0.5)
            sharpness = torch.linspace(0.5, 6, block.heads, device=DEVICE).repeat_interleave(block.head_dim)
            module.q_proj.weight.mul_(sharpness[:, None])
    assert loaded.model.config._attn_implementation == "sdpa"
    return loaded


def _logits(loaded, x, plan, route, monkeypatch):
    """Teacher-forced logits under `plan` through the eager route or lab's attention entry (route "entry"), and
    the head scores the sparsifier chose by, per attention layer in call order."""
    monkeypatch.setattr(attention, "takes_attention_ops", lambda m: route == "entry")
    scores, kept = [], hooks._Sparsifier._kept
    monkeypatch.setattr(hooks._Sparsifier, "_kept", lambda self, score: scores.append(score.float()) or kept(self, score))
    with torch.no_grad(), apply_plan(loaded.model, loaded.anatomy, plan, prompt_len=PROMPT_LEN) as tracker:
        tracker.needles = {tuple(row[:PROMPT_LEN]): NEEDLE for row in x.tolist()}
        return loaded.model(input_ids=x).logits.float(), scores


def _same_choice_but_near_ties(eager: torch.Tensor, entry: torch.Tensor, k: int, tie: float) -> bool:
    """Whether the top-k heads by `entry` scores (B, H, T) are those by `eager` wherever eager's k-th and next
    score differ by more than `tie`, and those queries are most of them."""
    ranked = eager.sort(1, descending=True).values
    clear = (ranked[:, k - 1] - ranked[:, k]) > tie
    chosen = [torch.zeros_like(s).scatter_(1, s.topk(k, 1).indices, 1.0).transpose(1, 2)[clear] for s in (eager, entry)]
    return clear.float().mean().item() > 0.5 and torch.equal(*chosen)


def _plans(layer: int):
    return [Plan(needle_attention=NeedleAttention(g, p)) for g, p in MODES] + [
        Plan(needle_attention=NeedleAttention("only", "keep", heads=((layer, 0), (layer, 3)))),
        Plan(sparsify=Sparsify(1, "entropy")), Plan(sparsify=Sparsify(2, "l2"), phase="generation")]


def test_ops_in_the_attention_entry_equal_the_eager_route_and_leave_nothing_behind(model, monkeypatch):
    """Through lab's attention entry (on a CPU its eager fallback; on a GPU the kernel for the prompt) the
    logits equal the eager route's (sparsification in bf16: the first layer's head scores and choices, ties
    aside); afterwards no op is left on any module and sdpa is still in use."""
    x = ids(2, 48, seed=4).to(DEVICE)
    modules = [model.model.get_submodule(b.path) for _, b in model.anatomy.blocks("attention")]
    for plan in _plans(model.anatomy.attention_layers[0]):
        eager, eager_scores = _logits(model, x, plan, "eager", monkeypatch)
        entry, entry_scores = _logits(model, x, plan, "entry", monkeypatch)
        if ON_GPU and plan.sparsify is not None:  # bf16: a near-tie may choose another head, and later layers differ
            assert torch.allclose(entry_scores[0], eager_scores[0], atol=2.5e-2)  # the first layer sees the same input
            assert _same_choice_but_near_ties(eager_scores[0], entry_scores[0], plan.sparsify.k, 4e-2)
            continue
        error = ((entry - eager).norm() / eager.norm()).item()
        assert error < (3e-2 if ON_GPU else 1e-5), plan.to_dict()
        assert all(fast_state.attention_op(m) is None for m in modules)
        assert model.model.config._attn_implementation == "sdpa"


@kernel
def test_the_kernel_route_equals_the_eager_route(model, monkeypatch):
    """The whole model with the kernel computing every prompt's attention (on a CPU: the interpreter)."""
    if not ON_GPU:
        monkeypatch.setattr(attention, "_kernel_applies", lambda query, key: True)
    calls = []
    parts = attention.window_parts
    monkeypatch.setattr(attention, "window_parts", lambda *a, **kw: calls.append(1) or parts(*a, **kw))
    test_ops_in_the_attention_entry_equal_the_eager_route_and_leave_nothing_behind(model, monkeypatch)
    assert calls  # the kernel did run


@kernel
def test_jambas_causal_convolution_in_labs_kernel_matches_transformers(monkeypatch):
    """Jamba's conv over the in-projection's (batch, time, 2 x channels) memory seen as (batch, channels, time),
    with the fused silu, against transformers' causal_conv1d_fn."""
    from lab import fast
    from lab.fast import mamba, triton_griffin

    fast.install()
    if not ON_GPU:  # Triton's interpreter on the CPU
        monkeypatch.setattr(mamba, "triton_applies", lambda *tensors: True)
    calls = []
    conv = triton_griffin.causal_conv
    monkeypatch.setattr(triton_griffin, "causal_conv", lambda *a, **k: calls.append(1) or conv(*a, **k))

    g = torch.Generator().manual_seed(0)
    projected = torch.randn(2, 37, 2 * 48, generator=g).to(DEVICE, DTYPE).transpose(1, 2)  # (B, 2D, T) view
    x, _ = projected.chunk(2, dim=1)
    weight, bias = torch.randn(48, 4, generator=g).to(DEVICE, DTYPE), torch.randn(48, generator=g).to(DEVICE, DTYPE)
    expected = mamba._originals["conv"](x, weight, bias, activation="silu").float()
    token = mamba._mixer_fast.set(True)
    try:
        got = mamba.causal_conv1d_fn(x, weight, bias, activation="silu")
    finally:
        mamba._mixer_fast.reset(token)
    assert calls and got.shape == expected.shape  # lab's kernel ran
    # bf16: transformers rounds the convolution before its silu, lab once after it (a bf16 step apart at most)
    assert torch.allclose(got.float(), expected, rtol=2e-2 if ON_GPU else 1e-5, atol=2e-2 if ON_GPU else 1e-5)


@kernel
@pytest.mark.parametrize("steps", [2, 37])
def test_recurrentgemmas_rotary_embedding_in_labs_kernel_matches_transformers(steps, monkeypatch):
    """RecurrentGemma's attention with queries and keys rotated in lab's kernel (half of each head's dims)
    against transformers' forward."""
    from lab.fast import griffin, triton_griffin

    loaded = load(ModelSpec("random:recurrent_gemma", device=DEVICE, dtype="float32"))
    module = loaded.model.model.layers[2].temporal_block
    assert type(module).__name__ == "RecurrentGemmaAttention"
    if not ON_GPU:
        monkeypatch.setattr(griffin, "triton_applies", lambda *tensors: True)
    calls = []
    rotary = triton_griffin.rotary
    monkeypatch.setattr(triton_griffin, "rotary", lambda *a: calls.append(1) or rotary(*a))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, steps, loaded.model.config.hidden_size, generator=g).to(DEVICE)
    positions = (torch.arange(steps) + 5).expand(2, -1).to(DEVICE)
    with torch.no_grad():
        got, _ = type(module).forward(module, hidden, positions, None)
        expected, _ = griffin._originals["attention"](module, hidden, positions, None)
    assert len(calls) == 2  # queries and keys
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@kernel
def test_the_rotary_kernel_stands_aside_where_it_cannot_act(monkeypatch):
    """Head dims not a power of two (the kernel's range), a projection that wants a gradient (the kernel has no
    backward), the deprecated past_key_values keyword: transformers' results, its cache filled."""
    from transformers import DynamicCache
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaAttention

    from lab import fast
    from lab.fast import griffin, triton_griffin
    from lab.models.tiny import tiny_config

    fast.install()
    if not ON_GPU:
        monkeypatch.setattr(griffin, "triton_applies",  # as lab.fast.state's, the device aside
                            lambda *tensors: not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))
    calls = []
    rotary = triton_griffin.rotary
    monkeypatch.setattr(triton_griffin, "rotary", lambda *a: calls.append(1) or rotary(*a))
    g = torch.Generator().manual_seed(0)
    for config, trained in ((tiny_config("recurrent_gemma", num_attention_heads=4, head_dim=24), None),
                            (tiny_config("recurrent_gemma"), "k_proj")):
        module = RecurrentGemmaAttention(config, layer_idx=0).to(DEVICE)
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(name.startswith(trained or "-"))
        hidden = torch.randn(2, 9, config.hidden_size, generator=g).to(DEVICE)
        positions = torch.arange(9).expand(2, -1).to(DEVICE)
        got, _ = type(module).forward(module, hidden, positions, None)
        expected, _ = griffin._originals["attention"](module, hidden, positions, None)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert got.requires_grad == (trained is not None)
    assert not calls
    cache = DynamicCache()
    with torch.no_grad():
        type(module).forward(module, hidden, positions, None, past_key_values=cache)
    assert calls and cache.get_seq_length(0) == 9


@kernel
def test_recurrentgemma_decodes_through_labs_kernels_as_transformers_does(monkeypatch):
    """Greedy decoding from fixed buffers with RecurrentGemma's prefill and one-token steps in lab's kernels
    (the recurrent block's step: the convolution over its conv inputs, the RG-LRU from its state; the attention
    over the ring buffers in the decode kernel) against the same decoder on transformers' code: the same
    logits."""
    from lab.fast import decode, griffin, triton_griffin

    loaded = load(ModelSpec("random:recurrent_gemma", device=DEVICE, dtype="float32"))
    prompts = [ids(2, 40, seed=1).to(DEVICE), ids(1, 23, seed=3).to(DEVICE)]  # two lengths, one batch
    monkeypatch.setattr(griffin, "triton_applies", lambda *tensors: False)
    tokens, logits = decode.greedy(loaded.model, prompts, 6, return_logits=True)
    monkeypatch.undo()
    if not ON_GPU:
        monkeypatch.setattr(griffin, "triton_applies", lambda *tensors: True)
        monkeypatch.setattr(attention, "_kernel_applies", lambda *tensors: True)
    steps, attended = [], []
    step, decoding = griffin._step, triton_griffin.decode_attention
    monkeypatch.setattr(griffin, "_step", lambda *a: steps.append(1) or step(*a))
    monkeypatch.setattr(triton_griffin, "decode_attention", lambda *a: attended.append(1) or decoding(*a))
    kernel_tokens, kernel_logits = decode.greedy(loaded.model, prompts, 6, return_logits=True)
    assert steps and (attended or ON_GPU)  # the steps ran in lab's kernels (on a GPU: attention in bf16 only)
    torch.testing.assert_close(kernel_logits, logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(kernel_tokens, tokens)


@kernel
@pytest.mark.parametrize("programs", [1, 10_000], ids=["keys in one chunk", "keys in chunks side by side"])
@pytest.mark.parametrize("hide", ["finfo.min", "-inf"])
def test_the_decode_kernel_matches_eager_attention(programs, hide, monkeypatch):
    """One query token per row against a decoder's buffers (two query heads per key head, 150 slots, an
    additive mask hiding some of them: the decoders' finite minimum, or -inf with a whole tile of keys hidden
    in a row; a row with a mask of its own): eager attention's output."""
    from lab.fast import triton_griffin

    monkeypatch.setattr(triton_griffin, "DECODE_PROGRAMS", programs)
    g = torch.Generator().manual_seed(5)
    batch, heads, kv, keys, dim = 3, 4, 2, 150, 32
    q = torch.randn(batch, heads, 1, dim, generator=g)
    k, v = (torch.randn(batch, kv, keys, dim, generator=g) for _ in range(2))
    hidden = torch.rand(batch, keys, generator=g) < 0.3
    hidden[1, :70] = True  # the first tile of keys (and chunk) of row 1
    hidden[:, 100] = False  # every row sees a key
    q, k, v = (t.to(DEVICE, DTYPE) for t in (q, k, v))
    low = torch.finfo(DTYPE).min if hide == "finfo.min" else float("-inf")
    mask = torch.where(hidden, low, 0.0).to(DEVICE, DTYPE)[:, None, None, :]
    out = triton_griffin.decode_attention(q, k, v, mask, dim ** -0.5)
    scores = q.float() @ k.float().repeat_interleave(2, 1).transpose(2, 3) * dim ** -0.5 + mask.float()
    expected = (torch.softmax(scores, -1) @ v.float().repeat_interleave(2, 1)).transpose(1, 2)
    assert out.shape == (batch, 1, heads, dim)
    tolerance = 2e-2 if ON_GPU else 1e-5
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@kernel
def test_only_decoding_steps_lab_knows_take_the_decode_kernel(monkeypatch):
    """The sdpa entry sends a one-token call to the decode kernel only where sdpa would do the same: not with a
    mask for other rows or value heads of another size, nor for a model outside RecurrentGemma and Jamba (whose
    calls lab knows); scaling 0 stays 0, a strided mask is read as it lies."""
    from lab.fast import triton_griffin

    loaded = load(ModelSpec("random:recurrent_gemma", device=DEVICE, dtype="float32"))
    module = loaded.model.model.layers[2].temporal_block
    monkeypatch.setattr(attention, "_kernel_applies", lambda *tensors: True)
    calls = []
    decoding = triton_griffin.decode_attention
    monkeypatch.setattr(triton_griffin, "decode_attention", lambda *a: calls.append(a[-1]) or decoding(*a))
    g = torch.Generator().manual_seed(8)
    heads, kv, dim = module.num_attention_heads, module.num_key_value_heads, module.head_dim
    q = torch.randn(2, heads, 1, dim, generator=g).to(DEVICE)
    k, v = (torch.randn(2, kv, 40, dim, generator=g).to(DEVICE) for _ in range(2))
    mask = torch.zeros(1, 1, 1, 1, device=DEVICE).expand(2, 1, 1, 40)  # strided
    wider = torch.randn(2, kv, 40, 2 * dim, device=DEVICE)
    for call, taken in [((q, k, v, mask), True), ((q, k, wider, mask), False)]:
        calls.clear()
        out, _ = attention.windowed_sdpa(module, *call, scaling=0.0)
        expected, _ = attention._originals["sdpa"](module, *call, scaling=0.0)
        assert bool(calls) == taken
        tolerance = 2e-3 if ON_GPU else 1e-5  # float32 products on a GPU: TF32 inside the kernel
        torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    calls.clear()
    with pytest.raises(RuntimeError):  # rows the mask does not have: sdpa's own error
        attention.windowed_sdpa(module, q, k, v, mask[:1].expand(3, 1, 1, 40))
    module.config.model_type = "bamba"
    try:
        attention.windowed_sdpa(module, q, k, v, mask)
    finally:
        module.config.model_type = "recurrent_gemma"
    assert not calls


@kernel
def test_the_window_kernel_routes_keep_a_scaling_of_zero(monkeypatch):
    """A scaling of 0 (every allowed key weighted alike) is a scale like any other: a whole prompt's windowed
    attention and rows continuing a trunk's keys keep it, as sdpa does."""
    loaded = load(ModelSpec("random:recurrent_gemma", device=DEVICE, dtype="float32"))
    module = loaded.model.model.layers[2].temporal_block
    monkeypatch.setattr(attention, "_kernel_applies", lambda *tensors: True)
    (q, k, v, mask, _), window = _inputs(heads=module.num_attention_heads, kv=module.num_key_value_heads,
                                         dim=module.head_dim)
    out, _ = attention.windowed_sdpa(module, q, k, v, mask, sliding_window=window, scaling=0.0)
    expected, _ = attention._originals["sdpa"](module, q, k, v, mask, sliding_window=window, scaling=0.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    span, steps = 60, q.shape[2] - 60
    first = torch.tensor([0, 25], device=DEVICE)
    at, cols = torch.arange(steps)[:, None] + span, torch.arange(span + steps)[None]
    seen = ((cols <= at) & (cols > at - window))[None] & (cols[None] >= first.cpu()[:, None, None])
    out, _ = attention.windowed_sdpa(module, q[:, :, span:], k, v, attention.Continued(first), sliding_window=window,
                                     scaling=0.0)
    expected, _ = attention._originals["sdpa"](module, q[:, :, span:], k, v, seen[:, None].to(DEVICE),
                                               sliding_window=window, scaling=0.0)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
