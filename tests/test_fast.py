import contextlib

import pytest
import torch

from lab import fast
from lab.interventions import BlocksOff, Plan, Sparsify, apply_plan
from lab.models import ModelSpec, load

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


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the Triton scan)")


@gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_matches_the_doubling_scan(out_dtype):
    g = torch.Generator().manual_seed(0)
    a, x, h0 = torch.rand(3, 1000, 300, generator=g), torch.randn(3, 1000, 300, generator=g), torch.randn(3, 300)
    a[:, 0] = 0
    with torch.no_grad():
        out, last = fast.linear_scan(a.cuda(), x.cuda(), h0.cuda(), out_dtype=out_dtype)
        ref_out, ref_last = fast.linear_scan(a, x, h0)
    assert out.dtype == out_dtype and last.dtype == torch.float32
    assert torch.allclose(out.float().cpu(), ref_out, atol=1e-4 if out_dtype == torch.float32 else 3e-2)
    assert torch.allclose(last.cpu(), ref_last, atol=1e-4)


def _reference_vs_fast(loaded, x, plan, prompt_len, prompt):
    """(full logits, planned logits, cached-generate step logits) with lab.fast off and on."""
    model, anatomy = loaded.model, loaded.anatomy
    outs = {}
    try:
        for on in (False, True):
            fast.apply(model, on)
            with torch.no_grad():
                full = model(input_ids=x).logits
                with apply_plan(model, anatomy, plan, prompt_len=prompt_len):
                    planned = model(input_ids=x).logits
                gen = model.generate(x[:, :prompt], max_new_tokens=5, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=256, eos_token_id=None)
            outs[on] = (full, planned, torch.stack(gen.logits, 1))
    finally:
        fast.apply(model, True)
    return outs[False], outs[True]


def test_recurrentgemma_fast_path_matches_reference_with_plans():
    plan = Plan(off=(BlocksOff("attention"),), phase="generation")
    loaded = load(ModelSpec("random:recurrent_gemma", device="cpu"))
    reference, quick = _reference_vs_fast(loaded, ids(2, 200), plan, 150, 50)
    for a, b in zip(reference, quick):
        assert torch.allclose(a, b, atol=1e-4)
    assert fast.enabled(loaded.model)


def _scan_calls(monkeypatch) -> list:
    """Record calls of lab's parallel scan (RecurrentGemma's RG-LRU prefill on the fast path)."""
    from lab.fast import scan

    calls = []
    real = scan.linear_scan
    monkeypatch.setattr(scan, "linear_scan", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def test_fast_paths_are_chosen_per_model(monkeypatch):
    """ModelSpec(fast=False) puts its own model on the reference code and leaves other models as they were."""
    calls = _scan_calls(monkeypatch)
    quick = load(ModelSpec("random:recurrent_gemma", device="cpu"))
    reference = load(ModelSpec("random:recurrent_gemma", device="cpu", fast=False))
    with torch.no_grad():
        expected = reference.model(input_ids=ids(1, 40)).logits
        assert not calls and not fast.enabled(reference.model)
        got = quick.model(input_ids=ids(1, 40)).logits
    assert calls and fast.enabled(quick.model)
    assert torch.allclose(got, expected, atol=1e-4)
    assert fast.enabled()  # the default for models never given to lab.fast.apply


def test_static_decoder_only_for_models_on_the_fast_paths():
    from lab.fast import decode

    assert decode.supports(load(ModelSpec("random:recurrent_gemma", device="cpu")).model)
    assert not decode.supports(load(ModelSpec("random:recurrent_gemma", device="cpu", fast=False)).model)


def test_jamba_mixers_follow_their_own_model(monkeypatch):
    from lab.fast import mamba

    monkeypatch.setattr(mamba, "PARALLEL_DEVICES", {"cuda", "cpu"})
    calls = []
    real = mamba.linear_scan
    monkeypatch.setattr(mamba, "linear_scan", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    reference = load(ModelSpec("random:jamba", device="cpu", fast=False))
    quick = load(ModelSpec("random:jamba", device="cpu"))
    with torch.no_grad():
        reference.model(input_ids=ids(1, 30))
        assert not calls
        quick.model(input_ids=ids(1, 30))
    assert calls


def test_lab_fast_has_no_import_cycle():
    """Edges: every `lab.fast...` import in lab/fast/*.py, at any depth; `from lab.fast import x` reaches x when
    it is a module, else the package (__init__)."""
    import ast
    from pathlib import Path

    folder = Path(fast.__file__).parent
    modules = {path.stem for path in folder.glob("*.py")}
    edges = {}
    for path in folder.glob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lab.fast"):
                names = [alias.name for alias in node.names]
                if node.module == "lab.fast":
                    targets |= {name if name in modules else "__init__" for name in names}
                else:
                    targets.add(node.module.split(".")[2])
            elif isinstance(node, ast.ImportFrom) and node.module == "lab" and any(a.name == "fast" for a in node.names):
                targets.add("__init__")
        edges[path.stem] = targets - {path.stem}
    for start in edges:  # nothing reaches back to where it started
        seen, todo = set(), list(edges[start])
        while todo:
            module = todo.pop()
            assert module != start, f"import cycle: lab.fast.{start} is imported back by what it imports"
            if module not in seen:
                seen.add(module)
                todo += edges.get(module, ())


def test_windowed_attention_in_query_chunks_matches_one_masked_product(monkeypatch):
    from lab.fast import attention

    monkeypatch.setattr(attention, "QUERY_CHUNK", 24)  # window 32, 200 tokens: chunks start before and past it
    plan = Plan(heads_off=((2, 1),))
    reference, quick = _reference_vs_fast(load(ModelSpec("random:recurrent_gemma", device="cpu")), ids(2, 200), plan, 150, 50)
    for a, b in zip(reference, quick):
        assert torch.allclose(a, b, atol=1e-4)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_recurrentgemma_fast_path_on_gpu_matches_reference(dtype, monkeypatch):
    """lab's kernels (norm, convolution, RG-LRU, MLP) and chunked windowed attention against transformers'."""
    from lab.fast import attention

    monkeypatch.setattr(attention, "QUERY_CHUNK", 64)
    plan = Plan(off=(BlocksOff("attention"),), phase="generation")
    loaded = load(ModelSpec("random:recurrent_gemma", device="cuda", dtype=dtype))
    with torch.no_grad():  # trained-looking norms and biases, not their zero initialisation
        for name, param in loaded.model.named_parameters():
            if "norm" in name or "bias" in name:
                param.normal_(0, 0.3)
    reference, quick = _reference_vs_fast(loaded, ids(2, 300).cuda(), plan, 200, 80)
    for a, b in zip(reference, quick):
        error = ((a.float() - b.float()).norm() / a.float().norm()).item()
        assert error < (1e-5 if dtype == "float32" else 2e-2)


@gpu
@pytest.mark.parametrize("shape", [(2, 4, 1, 300, 64, 100), (1, 4, 2, 200, 256, 2048), (2, 2, 2, 97, 32, 16)])
def test_window_attention_kernel_matches_sdpa(shape):
    """lab's windowed flash attention (bf16) against sdpa in float32: MQA/GQA, padding, window < and > length."""
    from lab.fast import triton_griffin

    batch, heads, kv, steps, dim, window = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, heads, steps, dim, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(batch, kv, steps, dim, device="cuda", generator=g).bfloat16() for _ in range(2))
    i = torch.arange(steps, device="cuda")
    mask = ((i[None] <= i[:, None]) & (i[None] > i[:, None] - window)).expand(batch, 1, steps, steps).clone()
    mask[-1, :, :, steps - 10:] = False  # right padding in the last row
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(heads // kv, 1), v.float().repeat_interleave(heads // kv, 1),
        attn_mask=mask, scale=dim ** -0.5).transpose(1, 2)
    out = triton_griffin.window_attention(q, k, v, mask, window, dim ** -0.5)
    assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2


def test_jamba_parallel_selective_scan_matches_reference(monkeypatch):
    from lab.fast import mamba

    monkeypatch.setattr(mamba, "PARALLEL_DEVICES", {"cuda", "cpu"})  # CI has no GPU: run that path here
    plan = Plan(off=(BlocksOff("attention"),), phase="generation")
    reference, quick = _reference_vs_fast(load(ModelSpec("random:jamba", device="cpu")), ids(2, 160), plan, 100, 40)
    for a, b in zip(reference, quick):
        assert torch.allclose(a, b, atol=1e-4)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jamba_fused_selective_scan_on_gpu_matches_reference(dtype):
    plan = Plan(off=(BlocksOff("attention"),), phase="generation")
    loaded = load(ModelSpec("random:jamba", device="cuda", dtype=dtype))
    reference, quick = _reference_vs_fast(loaded, ids(2, 160).cuda(), plan, 100, 40)
    for a, b in zip(reference, quick):
        error = ((a.float() - b.float()).norm() / a.float().norm()).item()
        assert error < (1e-5 if dtype == "float32" else 2e-2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])  # a CUDA graph on the GPU
@pytest.mark.parametrize("plan", [Plan(), Plan(heads_off=((2, 0),), off=(BlocksOff("mlp", (1,)),)),
                                  Plan(sparsify=Sparsify(1))])
def test_static_decoder_matches_generate_past_the_window(plan, device):
    from lab.fast import decode

    # attention window 32: a 50-token prompt and 12 new tokens wrap the ring buffer
    loaded = load(ModelSpec("random:recurrent_gemma", device=device, dtype="float32"))
    model = loaded.model
    assert decode.supports(model)
    prompt = ids(2, 50).to(device)
    with apply_plan(model, loaded.anatomy, plan), torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=12, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=256, eos_token_id=None)
        tokens, logits = decode.greedy(model, [prompt], 12, return_logits=True)
    assert torch.allclose(logits, torch.stack(expected.logits, 1), atol=1e-4 if device == "cpu" else 1e-3)
    assert torch.equal(tokens, expected.sequences[:, 50:])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_static_decoder_decodes_prompts_of_several_lengths_together(device):
    """Groups of 20 (inside the window), 45 and 70 tokens (past it) decode as one batch, each row as if alone."""
    from lab.fast import decode

    loaded = load(ModelSpec("random:recurrent_gemma", device=device, dtype="float32"))
    model = loaded.model
    groups = [ids(2, 20, seed=1).to(device), ids(1, 70, seed=2).to(device), ids(3, 45, seed=3).to(device)]
    with torch.no_grad():
        tokens, logits = decode.greedy(model, groups, 10, return_logits=True)
        alone = [decode.greedy(model, [group], 10, return_logits=True) for group in groups]
    assert torch.allclose(logits, torch.cat([l for _, l in alone]), atol=1e-4 if device == "cpu" else 1e-3)
    assert torch.equal(tokens, torch.cat([t for t, _ in alone]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
@pytest.mark.parametrize("arch", ["recurrent_gemma", "jamba"])
@pytest.mark.parametrize("plan", [Plan(sparsify=Sparsify(1), phase="generation"),
                                  Plan(off=(BlocksOff("attention"),), phase="prefill")], ids=["generation", "prefill"])
def test_a_plan_of_one_phase_decodes_in_one_graph(plan, arch, device, monkeypatch):
    """The needle probe decodes every length together under a plan that acts in one phase (the paper's
    generation-only sparsification, its last-prompt-token boundary): on a CPU its answers are generate()'s; on
    a GPU the step is captured once and replays what the same step run eagerly gives."""
    from lab.fast import decode
    from lab.probes import needle

    loaded = load(ModelSpec(f"random:{arch}", device=device, dtype="bfloat16" if device == "cuda" else "float32"))
    spec = needle.NeedleSpec(task="passkey", lengths=(256, 300), depths=(0, 50), max_new_tokens=8,
                             phase_boundary="last-prompt-token")
    trials = [needle.PromptBuilder(loaded.tokenizer, spec).build(*cell) for cell in spec.cells()]
    captured, graph = [], decode._graph

    def answers() -> list[str]:
        with apply_plan(loaded.model, loaded.anatomy, plan) as tracker:
            return [r["output"] for r in needle.run_batch(loaded, spec, trials, tracker)]

    monkeypatch.setattr(decode, "_graph", lambda step, room, device: captured.append(1) or graph(step, room, device))
    first = answers()
    if device == "cuda":
        monkeypatch.setattr(decode, "_graph", lambda step, room, device: step)
    else:
        fast.apply(loaded.model, False)  # generate(), one length at a time
    assert captured == ([1] if device == "cuda" else [])
    assert any(first) and first == answers()


def test_triton_launches_on_the_gpu_of_its_tensors(monkeypatch):
    """Triton launches on the current GPU: a model on cuda:1 (or a layer a device_map put there), driven from a
    thread whose current GPU is the first, gets its kernels launched on its own GPU."""
    from lab.fast.state import on_its_gpu

    current, entered = [0], []

    @contextlib.contextmanager
    def on(device):
        entered.append(device.index)
        before, current[0] = current[0], device.index
        yield
        current[0] = before

    class Tensor:  # a CUDA tensor's device, without a GPU
        def __init__(self, index):
            self.device = torch.device("cuda", index)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", on)
    launched = on_its_gpu(lambda x, scale=1: (current[0], scale))
    assert launched(Tensor(1), scale=2) == (1, 2) and current == [0]
    assert launched(x=Tensor(1)) == (1, 1)  # by keyword too
    assert launched(Tensor(0)) == (0, 1) and entered == [1, 1]  # already current: no switch
    assert launched(torch.zeros(1)) == (0, 1) and entered == [1, 1]  # the CPU (Triton's interpreter)


@pytest.mark.parametrize("free, emptied", [(3 << 30, False), (1 << 20, True)])
def test_the_decoding_graph_is_captured_without_waiting_unless_memory_is_short(free, emptied, monkeypatch):
    """The capture does not wait for the GPU (no synchronise, no emptied cache), except where the GPU has less
    free memory than the step needs: a capture allocates from a pool of its own, which cannot take the cache's
    free blocks, so the cache is emptied first. The warm-up is a real step; the first replay is skipped. All of it
    on the step's GPU, which need not be the current one."""
    from lab.fast import decode

    calls, current = [], ["cuda:0"]

    @contextlib.contextmanager
    def on(device):
        before, current[0] = current[0], str(device)
        yield
        current[0] = before

    class Stream:
        def wait_stream(self, other):
            calls.append("wait")

    class Graph:
        def capture_begin(self):
            calls.append("begin")

        def capture_end(self):
            calls.append("end")

        def replay(self):
            calls.append("replay")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *device: (free, 8 << 30))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *device: calls.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "device", on)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: int(current[0][-1]))
    replay = decode._graph(lambda: calls.append(f"step on {current[0]}"), room=1 << 30, device=torch.device("cuda:1"))
    replay()
    monkeypatch.setattr(Graph, "replay", lambda self: calls.append(f"replay on {current[0]}"))
    replay()
    assert calls == (["wait", "step on cuda:1", "wait"] + ["empty"] * emptied
                     + ["begin", "step on cuda:1", "end", "replay on cuda:1"])
    assert current == ["cuda:0"]
