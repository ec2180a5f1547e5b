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
