"""LMU math against an independent float64 implementation written here (not imported from the package)."""

from __future__ import annotations

import math

import pytest
import torch

from lmu_asr.model.lmu import LegendreMemory, LMULayer, discretize_zoh, lmu_matrices


def reference_matrices(order: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Voelker et al. 2019, eq. (2), entry by entry."""
    A = torch.zeros(order, order, dtype=torch.float64)
    B = torch.zeros(order, dtype=torch.float64)
    for i in range(order):
        B[i] = (2 * i + 1) * (-1) ** i / theta
        for j in range(order):
            A[i, j] = (2 * i + 1) / theta * (-1 if i < j else (-1) ** (i - j + 1))
    return A, B


def reference_discrete(order: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ZOH with dt=1 by the textbook formula Ā = e^A, B̄ = A^{-1}(Ā - I)B (a different route from the package)."""
    A, B = reference_matrices(order, theta)
    Abar = torch.linalg.matrix_exp(A)
    Bbar = torch.linalg.solve(A, (Abar - torch.eye(order, dtype=torch.float64)) @ B)
    return Abar, Bbar


def reference_memory(u: torch.Tensor, order: int, theta: float) -> torch.Tensor:
    """m_t = Ā m_{t-1} + B̄ u_t, m_{-1} = 0, in float64, one frame at a time."""
    Abar, Bbar = reference_discrete(order, theta)
    batch, time, channels = u.shape
    m = torch.zeros(batch, channels, order, dtype=torch.float64)
    out = []
    for t in range(time):
        m = torch.einsum("ij,bcj->bci", Abar, m) + u[:, t, :, None].double() * Bbar
        out.append(m)
    return torch.stack(out, dim=1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("order,theta", [(1, 1.0), (6, 10.0), (32, 57.5)])
def test_matrices_match_the_paper(order: int, theta: float) -> None:
    A, B = lmu_matrices(order, theta)
    A_ref, B_ref = reference_matrices(order, theta)
    assert A.dtype == torch.float64 and B.dtype == torch.float64
    assert A.shape == (order, order) and B.shape == (order,)
    torch.testing.assert_close(A, A_ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(B, B_ref, rtol=0, atol=1e-15)


def test_zoh_matches_textbook_formula() -> None:
    A, B = lmu_matrices(24, 30.0)
    Abar, Bbar = discretize_zoh(A, B)
    Abar_ref, Bbar_ref = reference_discrete(24, 30.0)
    torch.testing.assert_close(Abar, Abar_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(Bbar, Bbar_ref, rtol=1e-8, atol=1e-12)


def test_delay_property() -> None:
    """The Legendre memory reconstructs the input delayed by θ: decode with the shifted Legendre polynomials at 1."""
    order, theta = 12, 50.0
    t = torch.arange(400, dtype=torch.float64)
    u = torch.sin(2 * math.pi * t / 180.0)[None, :, None]
    m = LegendreMemory(order, theta)(u.float())[0, :, 0].double()  # (T, order)
    # P_i(1) of the shifted Legendre basis is 1 for every i: u(t - θ) ≈ Σ_i m_i(t)
    delayed = m.sum(-1)
    err = (delayed[150:] - u[0, 150 - int(theta):400 - int(theta), 0]).abs().max().item()
    assert err < 0.05, f"memory does not hold the delayed input (max error {err:.3f})"


def test_parallel_and_step_match_float64_recurrence() -> None:
    """The contract: order 192, theta 400, time 1000, float32, rel. error <= 1e-4 (forward and step)."""
    torch.manual_seed(0)
    u = torch.randn(2, 1000, 3)
    lm = LegendreMemory(192, 400.0)
    ref = reference_memory(u, 192, 400.0)
    out = lm(u)
    assert out.shape == (2, 1000, 3, 192) and out.dtype == torch.float32
    assert rel(out, ref) <= 1e-4
    # step over the sequence in uneven chunks of frames, carrying the state between calls
    state, outs, t = None, [], 0
    for n in (1, 7, 300, 2, 690):
        for k in range(t, t + n):
            m, state = lm.step(u[:, k], state)
            outs.append(m)
        t += n
    assert t == 1000
    assert rel(torch.stack(outs, dim=1), ref) <= 1e-4


@pytest.mark.parametrize("time", [1, 5, 1023, 1500])
def test_any_length_and_end_padding_does_not_change_the_past(time: int) -> None:
    torch.manual_seed(time)
    lm = LegendreMemory(16, 40.0)
    u = torch.randn(1, time, 2)
    # Causal convolution: the past never sees the padding. Numerically the FFT spreads rounding error (~1e-7 of
    # the whole signal's norm) over all frames, so junk padding of the same magnitude is checked to 1e-5.
    padded = torch.cat([u, torch.randn(1, 37, 2)], dim=1)
    assert rel(lm(padded)[:, :time], lm(u)) < 1e-5
    assert rel(lm(u), reference_memory(u, 16, 40.0)) < 1e-4


def _layers(memory_dim: int, chunk: int = 16) -> dict[str, LMULayer]:
    torch.manual_seed(1)
    layers = {mode: LMULayer(24, 20, 32, 50.0, memory_dim=memory_dim, mode=mode, chunk=chunk)
              for mode in LMULayer.MODES}
    state = layers["memory"].state_dict()
    for layer in layers.values():
        layer.load_state_dict(state)
    return layers


def test_memory_form_is_the_definition() -> None:
    """The "memory" layer path is exactly act(W_m · LegendreMemory(W_u x) + W_x x + b)."""
    layer = _layers(3)["memory"]
    x = torch.randn(2, 45, 24)
    m = layer.memory(layer.u_proj(x))  # (B, T, C, order)
    expected = layer.act(m.flatten(2) @ layer.mem_proj.weight.T + layer.in_proj(x))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory_dim", [1, 3])
def test_fused_forms_equal_the_memory_form(memory_dim: int) -> None:
    layers = _layers(memory_dim)
    x = torch.randn(3, 77, 24)  # 77: not a multiple of the chunk
    ref = layers["memory"](x)
    for mode in ("fft", "chunk"):
        assert rel(layers[mode](x), ref) < 1e-5, mode
    # gradients agree too (the training path)
    grads = {}
    for mode, layer in layers.items():
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in layer.parameters()])
    assert rel(grads["fft"], grads["memory"]) < 1e-4
    assert rel(grads["chunk"], grads["memory"]) < 1e-4


def test_layer_streaming_equals_parallel() -> None:
    layer = _layers(2)["fft"]
    x = torch.randn(2, 90, 24)
    ref = layer(x)
    state, outs, t = None, [], 0
    for n in (5, 16, 1, 40, 28):
        h, state = layer.forward_chunk(x[:, t:t + n], state)
        outs.append(h)
        t += n
    assert rel(torch.cat(outs, dim=1), ref) < 1e-5
    state, outs = None, []
    for k in range(90):
        h, state = layer.step(x[:, k], state)
        outs.append(h)
    assert rel(torch.stack(outs, dim=1), ref) < 1e-5


def test_memory_is_float32_under_bf16_autocast() -> None:
    layer = _layers(2)["fft"]
    x = torch.randn(2, 64, 24)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = layer.u_proj(x)
        mem = layer.memory_contribution(u)
        out = layer(x)
    assert mem.dtype == torch.float32
    assert rel(out.float(), ref) < 2e-2  # bf16 matmuls around an fp32 memory


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="order"):
        lmu_matrices(0, 1.0)
    with pytest.raises(ValueError, match="mode"):
        LMULayer(8, 8, 4, 4.0, mode="wavelet")
