"""Prompts that share a prefix with one of them, prefilled from that trunk's states (lab.fast.fork)."""

import importlib.util
import os
import threading

import pytest
import torch

from lab.fast import decode, fork, jamba_decode
from lab.fast.host import on_device
from lab.interventions import BlocksOff, Plan, Sparsify, apply_plan
from lab.models import ModelSpec, load
from lab.models.generation import greedy
from lab.probes import needle
from lab.probes.needle import NeedleSpec, PromptBuilder

from conftest import tiny


def _stream(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _needle_rows(lengths=(90, 130), depths=(0, 40, 45, 75, 100)) -> list[list[int]]:
    """As the paper's grid: one haystack cut to every length, a needle of its own at every depth."""
    hay = _stream(200)
    rows = []
    for length in lengths:
        for i, depth in enumerate(depths):
            at = (length - 8) * depth // 100
            own = _stream(8, seed=100 + length + i)
            rows.append([1] + hay[:at] + own + hay[at:length - 9])
    return rows


def test_plan_starts_each_prompt_inside_the_prefix_it_shares(monkeypatch):
    monkeypatch.setattr(fork, "MIN_SHARED", 16)
    monkeypatch.setattr(fork, "OVERHEAD", dict.fromkeys(fork.OVERHEAD, 16))
    rows = _needle_rows()
    forks = fork.plan(rows, "recurrent_gemma")
    assert forks is not None
    assert sorted(i for group in forks.groups for i in group) == list(range(len(rows)))
    for group in forks.groups:
        assert len({len(rows[i]) - forks.starts[i] for i in group}) == 1  # one width: no padding
    for i, start in enumerate(forks.starts):
        assert rows[i][:start] == forks.trunk[:start] and start <= len(rows[i]) - fork.OWN
    assert len(forks.trunk) == max(forks.starts) and forks.taps == tuple(sorted(set(forks.starts) - {0}))
    assert forks.saved == sum(forks.starts) - len(forks.trunk) > sum(map(len, rows)) // 3  # needles at 0-100 %


def test_a_trunk_keeps_the_conv_inputs_before_each_tapped_position():
    """The `width` inputs before each position, zeros before the first token; positions past the input kept none."""
    from lab.fast.taps import Taps

    inputs = torch.arange(1.0, 13.0).reshape(1, 2, 6)  # (batch, channels, time)
    tapped = Taps((2, 6, 9))
    tapped.keep_inputs("layer", inputs, 3)
    kept = tapped.get("layer", "conv")
    assert sorted(kept) == [2, 6]
    assert kept[2].tolist() == [[[0.0, 1.0, 2.0], [0.0, 7.0, 8.0]]] and kept[2].is_contiguous()
    assert kept[6].tolist() == [[[4.0, 5.0, 6.0], [10.0, 11.0, 12.0]]]


def test_groups_cost_the_fewest_tokens():
    """Rows that must compute 10, 12 and 100 tokens, 16 tokens a forward: the first two together (12 each),
    the third alone; all in one forward where a forward costs 512. A row too short to compute the widest's
    tokens is never in its group."""
    assert fork._groups([10, 12, 100], [200, 200, 200], 512) == ([[0, 1, 2]], 512 + 3 * 100)
    assert fork._groups([10, 12, 100], [200, 200, 200], 16) == ([[0, 1], [2]], 2 * 16 + 2 * 12 + 100)
    groups, _ = fork._groups([10, 90, 100], [200, 95, 200], 16)
    assert [1, 2] not in groups


def test_no_forks_where_little_is_shared(monkeypatch):
    monkeypatch.setattr(fork, "MIN_SHARED", 16)
    monkeypatch.setattr(fork, "OVERHEAD", dict.fromkeys(fork.OVERHEAD, 16))
    assert fork.plan([_stream(100, seed=s) for s in range(4)], "recurrent_gemma") is None  # nothing shared
    assert fork.plan([[1] * 10 + _stream(100, seed=s) for s in range(4)], "recurrent_gemma") is None  # too little
    assert fork.plan([_stream(100)], "recurrent_gemma") is None  # one prompt
    with fork.disabled():
        assert fork.plan(_needle_rows(), "recurrent_gemma") is None


def _small(monkeypatch):
    """Thresholds for prompts of a hundred tokens."""
    monkeypatch.setattr(fork, "MIN_SHARED", 16)
    monkeypatch.setattr(fork, "OVERHEAD", dict.fromkeys(fork.OVERHEAD, 16))


def _groups(forks, rows):
    return [torch.tensor([rows[i][forks.starts[i]:] for i in group]) for group in forks.groups]


DECODERS = {"jamba": jamba_decode, "recurrent_gemma": decode}


@pytest.mark.parametrize("arch", list(DECODERS))
@pytest.mark.parametrize("plan", [Plan(), Plan(heads_off=((2, 0),), off=(BlocksOff("mlp", (0,)),))],
                         ids=["base", "heads and mlp off"])
def test_forked_prefill_decodes_as_whole_prompts(plan, arch, monkeypatch):
    """The trunk, then each group's rows from their own starts (recurrent states and conv inputs from the trunk,
    its keys before each start; RecurrentGemma's 32-key window reaching back into the trunk's keys, or before
    position 0): the decoder's tokens and logits are those of whole prefills."""
    _small(monkeypatch)
    loaded = tiny(arch)
    rows = _needle_rows()
    forks = fork.plan(rows, arch)
    assert forks is not None and any(len({forks.starts[i] for i in group}) > 1 for group in forks.groups)
    whole = [torch.tensor([rows[i]]) for group in forks.groups for i in group]  # each alone, in the same order
    with apply_plan(loaded.model, loaded.anatomy, plan):
        tokens, logits = DECODERS[arch].greedy(loaded.model, _groups(forks, rows), 6, return_logits=True,
                                               forks=forks)
        whole_tokens, whole_logits = DECODERS[arch].greedy(loaded.model, whole, 6, return_logits=True)
    torch.testing.assert_close(logits, whole_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, whole_tokens)


@pytest.mark.parametrize("config", [dict(attention_window_size=256), dict(conv1d_width=1)],
                         ids=["window longer than the prompts", "no conv state"])
def test_forked_recurrentgemma_configs(config, monkeypatch):
    """A window (256) longer than every prompt: each row's window reaches before position 0, where the ring
    buffer must hold no key while decoding. A convolution of width 1 keeps no inputs (a reviewing helper:
    its rows kept every input, decoding off by 0.28, and groups of several widths crashed)."""
    from transformers import AutoModelForCausalLM

    import lab.fast
    from lab.models.tiny import tiny_config

    _small(monkeypatch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("recurrent_gemma", **config)).eval()
    lab.fast.apply(model)
    rows = _needle_rows()
    forks = fork.plan(rows, "recurrent_gemma")
    whole = [torch.tensor([rows[i]]) for group in forks.groups for i in group]
    tokens, logits = decode.greedy(model, _groups(forks, rows), 6, return_logits=True, forks=forks)
    whole_tokens, whole_logits = decode.greedy(model, whole, 6, return_logits=True)
    torch.testing.assert_close(logits, whole_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, whole_tokens)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="lab's Triton kernels on the CPU: Triton's interpreter (TRITON_INTERPRET=1)")
def test_forked_recurrent_blocks_in_labs_kernels(monkeypatch):
    """RecurrentGemma's recurrent blocks through lab's kernels (the convolution reading each row's conv inputs
    at its start, the RG-LRU from its state, the trunk's states kept at the taps): logits of whole prefills."""
    from lab.fast import griffin

    _small(monkeypatch)
    loaded = tiny("recurrent_gemma")
    monkeypatch.setattr(griffin, "triton_applies", lambda *tensors: True)
    rows = _needle_rows()
    forks = fork.plan(rows, "recurrent_gemma")
    whole = [torch.tensor([rows[i]]) for group in forks.groups for i in group]
    calls = []
    kernel = griffin._rglru
    monkeypatch.setattr(griffin, "_rglru", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    tokens, logits = decode.greedy(loaded.model, _groups(forks, rows), 4, return_logits=True, forks=forks)
    assert calls  # the kernels ran
    whole_tokens, whole_logits = decode.greedy(loaded.model, whole, 4, return_logits=True)
    torch.testing.assert_close(logits, whole_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, whole_tokens)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (lab's Triton kernels)")


@gpu
@pytest.mark.parametrize("arch, dtype, atol", [("jamba", "float32", 1e-3), ("jamba", "bfloat16", 0.15),
                                               ("recurrent_gemma", "bfloat16", 0.15)])
def test_forked_prefill_on_the_gpu_kernels(arch, dtype, atol, monkeypatch):
    """On a GPU the trunk's scans run in segments and the groups continue from their states through lab's
    kernels (RecurrentGemma's attention over the trunk's keys in its window kernel); the decoding steps are a
    CUDA graph: logits as from whole prefills (bf16: within its rounding)."""
    _small(monkeypatch)
    loaded = load(ModelSpec(f"random:{arch}", device="cuda", dtype=dtype))
    assert fork.supports(loaded.model)
    rows = _needle_rows()
    forks = fork.plan(rows, arch)
    groups = [g.cuda() for g in _groups(forks, rows)]
    full = [torch.tensor([rows[i]]).cuda() for group in forks.groups for i in group]
    with apply_plan(loaded.model, loaded.anatomy, Plan()):
        _, logits = DECODERS[arch].greedy(loaded.model, groups, 6, return_logits=True, forks=forks)
        _, whole = DECODERS[arch].greedy(loaded.model, full, 6, return_logits=True)
    diff = (logits - whole).abs().max().item()
    assert diff <= atol, diff
    assert (logits[:, 0].argmax(-1) == whole[:, 0].argmax(-1)).float().mean().item() >= 0.9


@gpu
@pytest.mark.parametrize("arch", list(DECODERS))
def test_the_forked_prefill_and_decoding_never_wait_for_the_gpu(arch, monkeypatch):
    """From the trunk to the decoding steps' graph the host queues work without waiting for the GPU (each wait
    leaves it idle while the host queues more: torch.tensor(list, device=...) in every attention layer did, and
    torch.cuda.graph before its capture)."""
    _small(monkeypatch)
    loaded = load(ModelSpec(f"random:{arch}", device="cuda", dtype="bfloat16"))
    rows = _needle_rows()
    forks = fork.plan(rows, arch)
    groups = [g.cuda() for g in _groups(forks, rows)]
    with apply_plan(loaded.model, loaded.anatomy, Plan()):
        DECODERS[arch].greedy(loaded.model, groups, 4, forks=forks)  # Triton compiles its kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            DECODERS[arch].greedy(loaded.model, groups, 4, forks=forks)
        finally:
            torch.cuda.set_sync_debug_mode("default")


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def _on(arch: str, device: str):
    """The same random model wherever it goes: built on the CPU, then moved."""
    loaded = load(ModelSpec(f"random:{arch}", device="cpu"))
    loaded.model.to(device)
    return loaded


def _forked_and_whole(loaded, arch):
    """The forked and the whole prefills' decoding logits, from a thread whose current GPU is the first (as a
    console worker's): Triton launches its kernels on the current GPU, CUDA graphs capture on its streams."""
    rows = _needle_rows()
    forks = fork.plan(rows, arch)
    device = loaded.device
    groups = [g.to(device) for g in _groups(forks, rows)]
    full = [torch.tensor([rows[i]], device=device) for group in forks.groups for i in group]
    out = {}

    def work():
        with apply_plan(loaded.model, loaded.anatomy, Plan()):
            out["forked"] = DECODERS[arch].greedy(loaded.model, groups, 6, return_logits=True, forks=forks)[1]
            out["whole"] = DECODERS[arch].greedy(loaded.model, full, 6, return_logits=True)[1]

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return out


@two_gpus
@pytest.mark.parametrize("arch", list(DECODERS))
def test_a_model_on_the_second_gpu_computes_what_it_does_on_the_first(arch, monkeypatch):
    """--device cuda:1: lab's kernels, the forked prefill and the decoding graph act on the model's GPU."""
    _small(monkeypatch)
    first, second = (_forked_and_whole(_on(arch, f"cuda:{i}"), arch) for i in (0, 1))
    for kind in ("forked", "whole"):
        assert second[kind].device.index == 1
        torch.testing.assert_close(second[kind].cpu(), first[kind].cpu(), atol=1e-5, rtol=1e-5)


@two_gpus
@pytest.mark.parametrize("arch", list(DECODERS))
def test_a_model_split_over_two_gpus_computes_what_it_does_on_one(arch):
    """device_map: the layers on the second GPU run lab's kernels there (decoding is transformers' there)."""
    from accelerate import dispatch_model

    one, split = _on(arch, "cuda:0"), _on(arch, "cpu")
    layers = len(split.anatomy.layers)
    final_norm = "model.final_norm" if arch == "recurrent_gemma" else "model.final_layernorm"
    dispatch_model(split.model, device_map={"model.embed_tokens": 0, "lm_head": 0, final_norm: 1,
                                            **{f"model.layers.{i}": int(i >= layers // 2) for i in range(layers)}})
    assert {p.device.index for p in split.model.model.layers[-1].parameters()} == {1}
    prompt = torch.tensor([_needle_rows()[-1]])
    logits = {}

    def work():
        with torch.inference_mode():
            logits["one"] = one.model(prompt.to("cuda:0")).logits.cpu()
            logits["split"] = split.model(prompt.to("cuda:0")).logits.cpu()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    torch.testing.assert_close(logits["split"], logits["one"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_integers_reach_the_device_as_given(device):
    """Lists as int64 (as torch.tensor makes them), a tensor in its own dtype; anything but integers is refused
    (numpy would cut floats to integers)."""
    listed, given = on_device([[3, -1], [4, 1]], device), on_device(torch.tensor([5, 9, 2], dtype=torch.int32), device)
    assert (listed.tolist(), listed.dtype, listed.device.type) == ([[3, -1], [4, 1]], torch.int64, device)
    assert (given.tolist(), given.dtype, given.device.type) == ([5, 9, 2], torch.int32, device)
    assert on_device([], device).dtype == torch.int64
    for wrong in ([1.5, 2.0], [True, False], torch.tensor([0.5])):
        with pytest.raises(TypeError):
            on_device(wrong, device)


@pytest.mark.parametrize("plan, shares", [(Plan(), True), (Plan(heads_off=((2, 1),)), True),
                                          (Plan(off=(BlocksOff("mlp"),), phase="prefill"), False),
                                          (Plan(sparsify=Sparsify(1)), False)],
                         ids=["base", "heads off", "prefill only", "sparsify"])
def test_greedy_forks_only_where_the_plan_acts_alike_everywhere(plan, shares, monkeypatch):
    """A plan that tells prompt from generation by position, or scores heads over a whole prompt, sees every
    prompt whole."""
    _small(monkeypatch)
    planned = []
    real = fork.plan
    monkeypatch.setattr(fork, "plan", lambda rows, model_type: planned.append(real(rows, model_type)) or planned[-1])
    for arch in DECODERS:
        loaded = tiny(arch)
        with apply_plan(loaded.model, loaded.anatomy, plan) as tracker:
            greedy(loaded, _needle_rows(), 4, static=True, tracker=tracker)
    assert (len(planned) == 2 and None not in planned) == shares
    assert shares or not planned


@pytest.mark.parametrize("arch", list(DECODERS))
def test_needle_grid_with_one_haystack_scores_the_same_forked(arch, monkeypatch):
    """The paper's protocol (one haystack per trial): every row as with whole prompts."""
    _small(monkeypatch)
    loaded = tiny(arch)
    spec = NeedleSpec(task="passkey", lengths=(400, 600), depths=(0, 50, 100), haystack_per="trial",
                      max_new_tokens=6)
    builder = PromptBuilder(loaded.tokenizer, spec)
    trials = [builder.build(*cell) for cell in spec.cells()]
    assert fork.plan([t.ids for t in trials], arch) is not None
    with apply_plan(loaded.model, loaded.anatomy, Plan()) as tracker:
        forked = needle.run_batch(loaded, spec, trials, tracker)
        with fork.disabled():
            whole = needle.run_batch(loaded, spec, trials, tracker)
    assert forked == whole


@pytest.mark.parametrize("arch", list(DECODERS))
def test_forked_prefill_on_eager_attention(arch, monkeypatch):
    """Eager attention adds the mask to the scores: the group's mask must be additive there (a boolean one
    hid nothing from it)."""
    _small(monkeypatch)
    loaded = load(ModelSpec(f"random:{arch}", device="cpu", attn_implementation="eager"))
    assert DECODERS[arch].supports(loaded.model) and fork.supports(loaded.model)
    rows = _needle_rows()
    forks = fork.plan(rows, arch)
    whole = [torch.tensor([rows[i]]) for group in forks.groups for i in group]
    _, logits = DECODERS[arch].greedy(loaded.model, _groups(forks, rows), 4, return_logits=True, forks=forks)
    _, whole_logits = DECODERS[arch].greedy(loaded.model, whole, 4, return_logits=True)
    torch.testing.assert_close(logits, whole_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", list(DECODERS))
def test_prompts_too_short_to_share_run_whole(arch):
    """A one-token prompt beside sharing ones, and prompts that share only their first token: the answers of
    whole prompts (a one-token trunk recorded no states)."""
    loaded = tiny(arch)
    hay = _stream(300)
    same = [1] + _stream(199, seed=999)
    for rows in ([[5], hay, hay[:250]], [same, list(same)] + [[1] + _stream(n - 1, seed=n) for n in (201, 202, 203)]):
        with fork.disabled():
            whole = greedy(loaded, rows, 3, static=True)
        assert greedy(loaded, rows, 3, static=True) == whole
        forks = fork.plan(rows, arch)
        assert forks is None or len(forks.trunk) >= fork.OWN


@pytest.mark.parametrize("arch", list(DECODERS))
def test_only_models_that_decode_from_fixed_buffers_share(arch):
    """A model on transformers' own code (fast off) decodes with generate(): lab bench must not count tokens as
    shared there."""
    from lab.models.generation import shares_prefixes

    assert shares_prefixes(tiny(arch).model)
    assert not shares_prefixes(load(ModelSpec(f"random:{arch}", device="cpu", fast=False)).model)


@pytest.mark.parametrize("arch", list(DECODERS))
def test_a_group_that_runs_out_of_memory_continues_in_halves(arch, monkeypatch):
    """The decoder's halving on out-of-memory keeps each half's rows with their own starts."""
    _small(monkeypatch)
    loaded = tiny(arch)
    rows = _needle_rows()
    forks = fork.plan(rows, arch)
    assert any(len(group) > 1 and any(forks.starts[i] for i in group) for group in forks.groups)
    real, failed = fork.continued, []

    def once(model, trunk, ids, starts):
        if ids.shape[0] > 1 and not failed:
            failed.append(ids.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, trunk, ids, starts)

    monkeypatch.setattr(fork, "continued", once)
    whole = [torch.tensor([rows[i]]) for group in forks.groups for i in group]
    _, logits = DECODERS[arch].greedy(loaded.model, _groups(forks, rows), 4, return_logits=True, forks=forks)
    _, whole_logits = DECODERS[arch].greedy(loaded.model, whole, 4, return_logits=True)
    assert failed
    torch.testing.assert_close(logits, whole_logits, atol=1e-4, rtol=1e-4)
