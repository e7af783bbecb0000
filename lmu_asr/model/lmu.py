"""Legendre Memory Unit math: continuous (A, B), ZOH discretisation, parallel and streaming forms.

The LMU memory is a linear time-invariant system, m_t = Ā m_{t-1} + B̄ u_t with m_{-1} = 0, so over a whole
sequence it is a causal convolution of u with the impulse response H[k] = Ā^k B̄. That is what makes training
parallel (Chilkuri & Eliasmith 2021): no loop over time, only convolutions and matmuls.

Three parallel forms of the LMU *layer* are provided, all computing the same function:

``memory``
    materialise the memory with :class:`LegendreMemory` (FFT), then project it. Simple and the reference the other
    forms are tested against; it builds a (batch, time, channels, order) tensor.
``fft``
    fold the memory->hidden projection into the convolution kernel (K[k] = W_m H[k], shape (time, channels,
    hidden)) and convolve by FFT: the order dimension never appears in a batch-sized tensor.
``chunk``
    matmuls within chunks of L frames (a Toeplitz block of the folded kernel) plus the memory state carried across
    chunk boundaries with Ā^L; everything is a dense matmul, which tensor cores like and FFTs are not.

Which is fastest depends on device, channels and length; ``lmuasr bench model`` measures it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lmu_matrices(order: int, theta: float) -> tuple[Tensor, Tensor]:
    """Continuous-time (A, B) of the Legendre delay system (Voelker, Kajić & Eliasmith 2019), float64.

    A[i, j] = (2i+1)/θ · (-1 if i < j else (-1)^(i-j+1)),  B[i] = (2i+1)(-1)^i / θ.
    """
    if order < 1 or theta <= 0:
        raise ValueError(f"need order >= 1 and theta > 0, got order={order}, theta={theta}")
    i = torch.arange(order, dtype=torch.float64)
    r = (2 * i + 1)[:, None] / theta
    ii, jj = i[:, None], i[None, :]
    sign = torch.where(ii < jj, -torch.ones(()), (-1.0) ** (ii - jj + 1))
    A = r * sign
    B = (2 * i + 1) * (-1.0) ** i / theta
    return A, B


def discretize_zoh(A: Tensor, B: Tensor, dt: float = 1.0) -> tuple[Tensor, Tensor]:
    """Zero-order-hold discretisation via one matrix exponential of the augmented system [[A, B], [0, 0]].

    This gives Ā = e^{A dt} and B̄ = ∫_0^dt e^{A s} ds B exactly, without inverting A.
    """
    n = A.shape[0]
    aug = torch.zeros(n + 1, n + 1, dtype=torch.float64)
    aug[:n, :n] = A.to(torch.float64) * dt
    aug[:n, n] = B.to(torch.float64) * dt
    e = torch.linalg.matrix_exp(aug)
    return e[:n, :n].contiguous(), e[:n, n].contiguous()


def impulse_response(Abar: Tensor, Bbar: Tensor, length: int) -> Tensor:
    """H[k] = Ā^k B̄ for k < length, shape (length, order), float64, by doubling (log2(length) matmuls)."""
    H = Bbar[None, :].to(torch.float64)
    power = Abar.to(torch.float64)  # Ā^{len(H)}
    while H.shape[0] < length:
        H = torch.cat([H, H @ power.T], dim=0)
        power = power @ power
    return H[:length].contiguous()


def state_powers(Abar: Tensor, length: int) -> Tensor:
    """P[i] = Ā^{i+1} for i < length, shape (length, order, order), float64 (carries a state into a chunk)."""
    P = Abar.to(torch.float64)[None]
    power = P[0]  # Ā^{len(P)}
    while P.shape[0] < length:
        P = torch.cat([P, torch.matmul(power, P)], dim=0)
        power = power @ power
    return P[:length].contiguous()


def _next_capacity(length: int) -> int:
    return 1 << max(10, math.ceil(math.log2(max(length, 1))))


class LegendreMemory(nn.Module):
    """The LMU memory (ZOH, dt = 1) of each input channel, parallel (FFT) and one step at a time.

    ``forward(u)``: u (batch, time, channels) -> memory (batch, time, channels, order), with the convention
    m_t = Ā m_{t-1} + B̄ u_t, m_{-1} = 0 (the memory at t includes u_t). The FFT length is at least 2·time, so
    there is no circular wrap-around, and the convolution is causal, so frames appended at the end (padding) never
    change earlier memories. ``step(u_t, state)`` runs the recurrence for streaming.

    The impulse response is computed in float64 and cached up to a power-of-two capacity, sized at build time for
    the longest sequence training will see (``max_len``): growing it inside a compiled step would break the graph
    and force a recompile. Inference on longer audio grows it on demand, outside any compiled region.
    """

    def __init__(self, order: int, theta: float, max_len: int = 1024) -> None:
        super().__init__()
        self.order = int(order)
        self.theta = float(theta)
        A, B = lmu_matrices(self.order, self.theta)
        Abar, Bbar = discretize_zoh(A, B)
        # float64 masters (for growing H exactly) and float32 working copies; none are parameters.
        self.register_buffer("Abar64", Abar, persistent=False)
        self.register_buffer("Bbar64", Bbar, persistent=False)
        self.register_buffer("Abar", Abar.float(), persistent=False)
        self.register_buffer("Bbar", Bbar.float(), persistent=False)
        self.register_buffer("H", impulse_response(Abar, Bbar, _next_capacity(max_len)).float(), persistent=False)

    @torch.compiler.disable
    def ensure_length(self, length: int) -> None:
        """Grow the cached impulse response to cover ``length`` frames (rare: capacity doubles)."""
        if self.H.shape[0] >= length:
            return
        H = impulse_response(self.Abar64.cpu(), self.Bbar64.cpu(), _next_capacity(length))
        self.H = H.to(device=self.Abar.device, dtype=torch.float32)

    def impulse(self, length: int) -> Tensor:
        """H[:length] in float32, (length, order)."""
        if self.H.shape[0] < length:
            self.ensure_length(length)
        return self.H[:length]

    def forward(self, u: Tensor) -> Tensor:
        batch, time, channels = u.shape
        H = self.impulse(time)
        n = 2 * time
        with torch.autocast(device_type=u.device.type, enabled=False):
            Uf = torch.fft.rfft(u.float(), n=n, dim=1)  # (B, F, C)
            Hf = torch.fft.rfft(H, n=n, dim=0)  # (F, order)
            M = torch.fft.irfft(Uf[..., None] * Hf[None, :, None, :], n=n, dim=1)
        return M[:, :time]

    def step(self, u_t: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One frame: u_t (batch, channels) -> (m_t, new state), both (batch, channels, order)."""
        u_t = u_t.float()
        m = u_t[..., None] * self.Bbar
        if state is not None:
            m = m + state @ self.Abar.T
        return m, m


class LMULayer(nn.Module):
    """Parallel LMU layer: u = W_u x; memory m of u; h = act(W_m m + W_x x + b).

    ``forward(x)`` is the training path (``mode``: "fft", "chunk" or "memory", see the module docstring);
    ``forward_chunk(x, state)`` and ``step(x_t, state)`` are the streaming paths and equal ``forward`` on the same
    frames (the state is the LMU memory at the end of what was seen).
    """

    MODES = ("fft", "chunk", "memory")  # training forms; "dft" (export) is set by lmu_asr.export

    def __init__(self, d_model: int, hidden: int, order: int, theta: float, memory_dim: int = 1,
                 mode: str = "fft", chunk: int = 64, activation: str = "gelu", max_len: int = 1024) -> None:
        super().__init__()
        if mode not in (*self.MODES, "dft"):
            raise ValueError(f"unknown LMU mode {mode!r}; choose from {self.MODES}")
        self.mode, self.chunk = mode, int(chunk)
        self.memory_dim, self.hidden, self.order = memory_dim, hidden, order
        self.memory = LegendreMemory(order, theta, max_len)
        self.u_proj = nn.Linear(d_model, memory_dim)
        self.mem_proj = nn.Linear(memory_dim * order, hidden, bias=False)  # W_m
        self.in_proj = nn.Linear(d_model, hidden)  # W_x, b
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "tanh": nn.Tanh()}[activation]
        self.register_buffer("powers", state_powers(self.memory.Abar64, self.chunk).float(), persistent=False)
        # W_m sees up to memory_dim*order correlated inputs; scale it down so h starts O(1).
        nn.init.normal_(self.mem_proj.weight, std=1.0 / math.sqrt(memory_dim * order))

    def _folded_kernel(self, H: Tensor) -> Tensor:
        """K[k, c, h] = Σ_o W_m[h, c·order+o] H[k, o]: the memory->hidden projection folded into the kernel."""
        W = self.mem_proj.weight.float().view(self.hidden, self.memory_dim, self.order)
        return torch.einsum("ko,hco->kch", H, W)

    def memory_contribution(self, u: Tensor) -> Tensor:
        """W_m m_t for every t, (batch, time, hidden), computed in float32 by the configured parallel form."""
        with torch.autocast(device_type=u.device.type, enabled=False):
            u = u.float()
            if self.mode == "memory":
                m = self.memory(u)
                return self.mem_proj(m.flatten(2))
            if self.mode == "fft":
                return self._fft(u)
            if self.mode == "dft":
                return self._dft(u)
            return self._chunked(u, None)[0]

    def _fft(self, u: Tensor) -> Tensor:
        time = u.shape[1]
        n = 2 * time
        K = self._folded_kernel(self.memory.impulse(time))  # (T, C, hidden)
        Kf = torch.fft.rfft(K, n=n, dim=0)  # (F, C, hidden)
        Uf = torch.fft.rfft(u, n=n, dim=1)  # (B, F, C)
        if self.memory_dim == 1:
            Yf = Uf * Kf[None, :, 0, :]
        else:
            Yf = torch.einsum("bfc,fch->bfh", Uf, Kf)
        return torch.fft.irfft(Yf, n=n, dim=1)[:, :time]

    def _dft(self, u: Tensor) -> Tensor:
        """The ``memory`` or ``fft`` form with its FFTs written as real DFT matmuls: what ONNX can express.

        ONNX has no real FFT that exporters produce from torch.fft, and the chunked form loops over a dynamic
        number of chunks. A length-n DFT is two (n x F) matmuls with cos/sin matrices built in the graph from the
        sequence length (angles from integer ``t*f mod n``, exact in float32), so the export keeps a dynamic time
        axis. It costs O(T^2) like attention, and it transforms whichever is narrower: the memory (C x order
        channels, then ``mem_proj``) or the folded kernel's output (hidden channels).
        """
        time = u.shape[1]
        t = torch.arange(time, device=u.device)
        f = torch.arange(time + 1, device=u.device)
        n_t = 2 * (t[-1:] + 1)  # n as a tensor: exporters cannot take a remainder by a symbolic size
        angle = torch.remainder(t[:, None] * f[None, :], n_t).to(u.dtype) * (2 * math.pi) / n_t.to(u.dtype)
        cos, sin = torch.cos(angle), torch.sin(angle)
        weight = torch.full((time + 1,), 2.0, dtype=u.dtype, device=u.device) / n_t.to(u.dtype)
        weight = torch.cat([weight[:1] * 0.5, weight[1:-1], weight[-1:] * 0.5])  # DC and Nyquist once
        Ur, Ui = torch.einsum("btc,tf->bfc", u, cos), -torch.einsum("btc,tf->bfc", u, sin)
        H = self.memory.impulse(time)  # (T, order)
        if self.memory_dim * self.order <= self.hidden:  # transform the memory, then project it
            Hr, Hi = cos.T @ H, -(sin.T @ H)  # (F, order)
            Mr = Ur[..., None] * Hr[None, :, None, :] - Ui[..., None] * Hi[None, :, None, :]
            Mi = Ur[..., None] * Hi[None, :, None, :] + Ui[..., None] * Hr[None, :, None, :]
            m = (torch.einsum("bfco,tf->btco", Mr * weight[None, :, None, None], cos)
                 - torch.einsum("bfco,tf->btco", Mi * weight[None, :, None, None], sin))
            return self.mem_proj(m.flatten(2))
        K = self._folded_kernel(H)  # (T, C, hidden)
        Kr, Ki = torch.einsum("tf,tch->fch", cos, K), -torch.einsum("tf,tch->fch", sin, K)
        Yr = torch.einsum("bfc,fch->bfh", Ur, Kr) - torch.einsum("bfc,fch->bfh", Ui, Ki)
        Yi = torch.einsum("bfc,fch->bfh", Ur, Ki) + torch.einsum("bfc,fch->bfh", Ui, Kr)
        return (torch.einsum("bfh,tf->bth", Yr * weight[None, :, None], cos)
                - torch.einsum("bfh,tf->bth", Yi * weight[None, :, None], sin))

    def _chunked(self, u: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """Chunked form; returns (W_m m for every frame, final memory state (batch, C, order))."""
        batch, time, C = u.shape
        L = min(self.chunk, time)
        J = -(-time // L)
        pad = J * L - time
        if pad:
            u = F.pad(u, (0, 0, 0, pad))
        H = self.memory.impulse(L)  # (L, order)
        P = self.powers[:L]  # (L, order, order): Ā^{i+1}
        K = self._folded_kernel(H)  # (L, C, hidden)
        # Toeplitz block: T[k, c, i, h] = K[i-k, c, h] for i >= k.
        idx = torch.arange(L, device=u.device)
        diff = idx[None, :] - idx[:, None]  # [k, i] = i - k
        Tk = K[diff.clamp(min=0)] * (diff >= 0)[..., None, None].to(K.dtype)  # (k, i, C, hidden)
        Tk = Tk.permute(0, 2, 1, 3).reshape(L * C, L * self.hidden)
        uc = u.view(batch, J, L, C)
        local = (uc.reshape(batch * J, L * C) @ Tk).view(batch, J, L, self.hidden)
        # End-of-chunk memory of each chunk alone: e_j = Σ_k H[L-1-k] u_j[k].
        ends = torch.einsum("bjkc,ko->bjco", uc, H.flip(0))
        AL = P[L - 1]  # Ā^L
        states = []
        s = state if state is not None else torch.zeros(batch, C, self.order, device=u.device, dtype=u.dtype)
        for j in range(J):  # J = time / L small steps of (B*C, order) @ (order, order)
            states.append(s)
            s = s @ AL.T + ends[:, j]
        carried = torch.stack(states, dim=1)  # (B, J, C, order): memory entering each chunk
        W = self.mem_proj.weight.float().view(self.hidden, C, self.order)
        # contribution of the carried state at offset i: W_m Ā^{i+1} s_j
        WP = torch.einsum("hco,iop->ichp", W, P)  # (L, C, hidden, order)
        from_state = torch.einsum("bjcp,ichp->bjih", carried, WP)
        out = (local + from_state).reshape(batch, J * L, self.hidden)[:, :time]
        if pad:  # the final state must be taken at the true last frame, not after the padding
            s = self._state_after(u[:, (J - 1) * L: time], carried[:, -1], H, P)
        return out, s

    def _state_after(self, u: Tensor, s0: Tensor, H: Tensor, P: Tensor) -> Tensor:
        n = u.shape[1]
        return s0 @ P[n - 1].T + torch.einsum("bkc,ko->bco", u, H[:n].flip(0))

    def forward(self, x: Tensor) -> Tensor:
        u = self.u_proj(x)
        return self.act(self.memory_contribution(u).to(x.dtype) + self.in_proj(x))

    def forward_chunk(self, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """Streaming: process a chunk given the memory state after the previous chunk; returns (h, new state)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            u = self.u_proj(x.float())
            mem, new_state = self._chunked(u, state)
            return self.act(mem + self.in_proj(x.float())), new_state

    def step(self, x_t: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """Streaming, one frame: x_t (batch, d_model) -> (h_t (batch, hidden), new state)."""
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            x_t = x_t.float()
            m, state = self.memory.step(self.u_proj(x_t), state)
            return self.act(self.mem_proj(m.flatten(1)) + self.in_proj(x_t)), state
