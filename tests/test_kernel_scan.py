"""lab's two Triton selective scans (tiled, stepping) against a loop over time, in the layouts Jamba's mixer
hands them (channels contiguous for x and the gate, time for dt), from zeros or a cached state. On a GPU, or
on a CPU under Triton's interpreter (TRITON_INTERPRET=1)."""

import importlib.util
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs Triton on a GPU, or Triton's interpreter (TRITON_INTERPRET=1)")
DEVICE = "cuda" if ON_GPU else "cpu"


def _inputs(batch=2, channels=48, steps=37, state=16):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, generator=g)

    x = rand(batch, steps, channels).transpose(1, 2)
    dt = rand(batch, channels, steps) * 0.5
    projected = rand(batch, steps, 2 * state)
    gate = rand(batch, steps, 2 * channels).transpose(1, 2)[:, :channels]
    return dict(x=x, dt=dt, A=-torch.rand(channels, state, device=DEVICE, generator=g) - 0.1,
                B=projected[..., :state].transpose(1, 2), C=projected[..., state:].transpose(1, 2),
                D=rand(channels), z=gate, delta_bias=rand(channels) * 0.1, delta_softplus=True)


def _loop(x, dt, A, B, C, D, z, delta_bias, delta_softplus, initial=None):
    dt = torch.nn.functional.softplus(dt + delta_bias[:, None])
    h = torch.zeros(x.shape[0], x.shape[1], A.shape[1], device=x.device) if initial is None else initial.clone()
    out = []
    for t in range(x.shape[2]):
        h = h * torch.exp(dt[:, :, t, None] * A) + (dt[:, :, t] * x[:, :, t])[..., None] * B[:, None, :, t]
        out.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(out, -1) + x * D[:, None]
    return y * z * torch.sigmoid(z), h


@pytest.mark.parametrize("scan", ["scan_tiles", "scan_steps"])
@pytest.mark.parametrize("cached", [False, True])
def test_scans_match_a_loop_over_time(scan, cached):
    from lab.fast import triton_mamba

    args = _inputs()
    initial = torch.randn(2, 48, 16, device=DEVICE) if cached else None
    out, last = getattr(triton_mamba, scan)(**args, initial=initial)
    expected, state = _loop(**args, initial=initial)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last, state, atol=1e-4, rtol=1e-4)


def test_many_programs_step_few_scan_in_tiles(monkeypatch):
    """Stepping through time wins only with enough programs in flight (see STEPPED_PROGRAMS)."""
    from lab.fast import triton_mamba

    calls = []
    for name in ("scan_tiles", "scan_steps"):
        monkeypatch.setattr(triton_mamba, name, lambda *a, name=name: calls.append(name) or (None, None))
    args = list(_inputs().values())
    monkeypatch.setattr(triton_mamba, "STEPPED_PROGRAMS", 4)  # 2 rows x 2 blocks of 32 channels: 4 programs
    triton_mamba.selective_scan(*args)
    monkeypatch.setattr(triton_mamba, "STEPPED_PROGRAMS", 5)
    triton_mamba.selective_scan(*args)
    assert calls == ["scan_steps", "scan_tiles"]


@pytest.mark.parametrize("chunk", [None, 16])
def test_the_rg_lru_kernel_keeps_the_states_before_the_taps(chunk):
    """RecurrentGemma's RG-LRU kernel on a batch-1 trunk (lab.fast.fork): the states it keeps before positions
    1, 17 and 37 are those of the same kernel run in segments ending there, its output and last state unchanged,
    time scanned whole or in chunks."""
    from lab.fast import triton_griffin

    g = torch.Generator(device=DEVICE).manual_seed(3)
    steps, heads, block = 37, 2, 8
    width = heads * block
    x, y = (torch.randn(1, steps, width, device=DEVICE, generator=g) for _ in range(2))
    gates = torch.randn(heads, steps, 2 * block, device=DEVICE, generator=g)
    bias_x, bias_a = (torch.randn(heads, block, device=DEVICE, generator=g) for _ in range(2))
    param = torch.randn(width, device=DEVICE, generator=g)
    reset = (torch.arange(steps, device=DEVICE) == 0)[None]
    args = (bias_x, bias_a, param)
    out, last, kept = triton_griffin.rglru(x, gates, *args, reset, y, None, keep=(1, 17, 37), chunk=chunk)
    state, outs, states = None, [], []
    for begin, end in ((0, 1), (1, 17), (17, 37)):
        part = slice(begin, end)
        piece, state, _ = triton_griffin.rglru(x[:, part].contiguous(), gates[:, part], *args, reset[:, part],
                                               y[:, part].contiguous(), state)
        outs.append(piece)
        states.append(state)
    torch.testing.assert_close(kept, torch.cat(states), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.cat(outs, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, states[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 16, 48])
@pytest.mark.parametrize("start", [False, True])
def test_the_rg_lru_kernel_matches_transformers_in_chunks_of_time_or_not(chunk, start):
    """lab's RG-LRU kernel (gates, scan, gelu output gate) against transformers' module, from zeros or a state
    (rows continuing a document), across a reset in the middle of a row, whether time is scanned whole or in
    chunks side by side (None: a chunk of every time, as at these sizes); chunks of part of a tile refused."""
    from transformers import RecurrentGemmaConfig
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    from lab.fast import triton_griffin

    g = torch.Generator().manual_seed(4)
    config = RecurrentGemmaConfig(hidden_size=32, lru_width=32, num_attention_heads=2)
    lru = RecurrentGemmaRglru(config)
    for parameter in lru.parameters():
        parameter.data = torch.randn(parameter.shape, generator=g) * 0.5
    lru.to(DEVICE)
    batch, steps = 3, 75
    conv, y = (torch.randn(batch, steps, 32, generator=g).to(DEVICE) for _ in range(2))
    positions = (torch.arange(steps) + 7).expand(batch, -1).clone()  # no reset at 0: the start state counts
    positions[1, 40:] = torch.arange(steps - 40)  # a second document in row 1
    h0 = torch.randn(batch, 32, generator=g).to(DEVICE) if start else None
    assert chunk is None or triton_griffin.rglru_chunk(batch, steps, 32) == 80  # whole: the split is forced
    gate_weights = torch.cat([lru.input_gate_weight, lru.recurrent_gate_weight], -1)
    gates = torch.bmm(conv.reshape(batch * steps, 2, 16).transpose(0, 1), gate_weights)
    out, last, _ = triton_griffin.rglru(conv, gates, lru.input_gate_bias, lru.recurrent_gate_bias,
                                        lru.recurrent_param, positions.to(DEVICE) == 0, y, h0, chunk=chunk)
    lru.recurrent_states = h0
    with torch.no_grad():
        expected = lru(conv, positions.to(DEVICE)) * torch.nn.functional.gelu(y, approximate="tanh")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, lru.recurrent_states, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of"):
        triton_griffin.rglru(conv, gates, lru.input_gate_bias, lru.recurrent_gate_bias, lru.recurrent_param,
                             positions.to(DEVICE) == 0, y, h0, chunk=20)


def test_a_decoding_step_of_the_rg_lru_kernel_matches_transformers():
    """One token per row from each row's state (the decoding step's own kernel), a row starting a document:
    transformers' RG-LRU step."""
    from transformers import RecurrentGemmaConfig
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    from lab.fast import triton_griffin

    g = torch.Generator().manual_seed(6)
    lru = RecurrentGemmaRglru(RecurrentGemmaConfig(hidden_size=48, lru_width=48, num_attention_heads=3))
    for parameter in lru.parameters():
        parameter.data = torch.randn(parameter.shape, generator=g) * 0.5
    lru.to(DEVICE)
    conv, y = (torch.randn(4, 1, 48, generator=g).to(DEVICE) for _ in range(2))
    positions = torch.tensor([[9], [0], [3], [12]], device=DEVICE)
    h0 = torch.randn(4, 48, generator=g).to(DEVICE)
    gates = torch.bmm(conv.reshape(4, 3, 16).transpose(0, 1),
                      torch.cat([lru.input_gate_weight, lru.recurrent_gate_weight], -1))
    out, last, _ = triton_griffin.rglru(conv, gates, lru.input_gate_bias, lru.recurrent_gate_bias,
                                        lru.recurrent_param, positions == 0, y, h0)
    lru.recurrent_states = h0
    with torch.no_grad():
        expected = lru(conv, positions) * torch.nn.functional.gelu(y, approximate="tanh")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, lru.recurrent_states, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("taps", [4, 1])
def test_a_decoding_step_of_the_convolution_matches_transformers(taps):
    """The step's convolution over the kept inputs (a state of any strides) and this token, and the inputs it
    keeps: transformers' decoding step (cat, product, sum; the oldest input dropped); width 1 keeps none."""
    from lab.fast import triton_griffin

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 1, 40, generator=g).to(DEVICE)
    state = torch.randn(3, taps - 1, 40, generator=g).to(DEVICE).transpose(1, 2)  # (B, D, taps - 1), strided
    weight, bias = torch.randn(40, 1, taps, generator=g).to(DEVICE), torch.randn(40, generator=g).to(DEVICE)
    out, kept = triton_griffin.conv_step(x, weight, bias, state)
    inputs = torch.cat([state, x.transpose(1, 2)], -1)
    expected = (inputs * weight[:, 0, :]).sum(-1) + bias
    torch.testing.assert_close(out[:, 0], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(kept, inputs[:, :, 1:])


def test_few_rows_scan_time_in_chunks():
    """Rows x channel blocks under RGLRU_PROGRAMS split a long prompt into chunks (of whole tiles, at least
    RGLRU_MIN_CHUNK times); many rows, or few times, keep one chunk."""
    from lab.fast import triton_griffin

    tile = triton_griffin.RGLRU_CONFIG["BLOCK_T"]
    rows = -(-triton_griffin.RGLRU_PROGRAMS * triton_griffin.RGLRU_CONFIG["BLOCK_D"] // 2560)  # RecurrentGemma-2B
    chunk = triton_griffin.rglru_chunk(1, 3949, 2560)
    assert triton_griffin.RGLRU_MIN_CHUNK <= chunk < 3949 and chunk % tile == 0
    assert triton_griffin.rglru_chunk(1, 300, 2560) >= 300  # one chunk: at least RGLRU_MIN_CHUNK times each
    assert triton_griffin.rglru_chunk(rows, 4096, 2560) >= 4096  # enough programs: one chunk


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decoding_step_updates_the_state_as_transformers_does(dtype):
    """Jamba's one-token step (mamba_selective_state_update): lab's kernel against transformers' torch code, the
    state updated in place in its own dtype (the fixed-buffer decoder keeps the prefill's)."""
    from transformers.models.jamba import modeling_jamba

    from lab.fast import mamba, triton_mamba

    reference = mamba._originals.get("update", modeling_jamba.mamba_selective_state_update)
    g = torch.Generator(device=DEVICE).manual_seed(5)
    batch, channels, size = 3, 48, 16

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(dtype)

    x, dt, z = rand(batch, channels), rand(batch, channels, scale=0.5), rand(batch, channels)
    B, C = rand(batch, size), rand(batch, size)
    A = -torch.rand(channels, size, device=DEVICE, generator=g) - 0.1
    D, bias = torch.randn(channels, device=DEVICE, generator=g), torch.randn(channels, device=DEVICE, generator=g) * 0.1
    state = rand(batch, channels, size)
    expected_state = state.clone()
    expected = reference(expected_state, x, dt, A, B, C, D, dt_bias=bias, dt_softplus=True, z=z)
    out = triton_mamba.selective_state_update(state, x, dt, A, B, C, D, bias, True, z)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(state.float(), expected_state.float(), **tolerance)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)
    assert out.dtype == expected.dtype
