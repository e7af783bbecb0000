"""CTC loss and gradient as two Triton kernels that take their lengths on the device: no host copy, no sync.

Why it exists: ATen's CUDA CTC builds three small tensors from host data in its forward and three in its
backward (``at::tensor(lengths)``, ``batch_offsets.cuda()``), each a blocking host->device copy that waits for
the whole stream. The H200 counted exactly those 6 per training step (raised under AOTAutograd's compiled
forward, where our CTC op runs forward and backward together), and they make a CUDA graph of the whole step
impossible. Given device tensors instead of int lists, ATen copies the lengths back to the host, which is worse.

The kernels compute exactly what ``aten._ctc_loss`` / ``aten._ctc_loss_backward`` compute (tested against them
under Triton's CPU interpreter): per utterance, the forward variables alpha over the blank-extended label
sequence in log space, then the backward variables beta from the last frame down, and, at every frame, the
gradient ATen returns, ``exp(lp) - sum_{s: l'_s = v} exp(alpha + beta - lp + nll)`` (w.r.t. the log-softmax input,
as ATen does). One program per utterance walks its own frames; the label axis is one block of threads. Rows
past an utterance's length get zero gradient; an impossible alignment gives loss inf (the caller zeroes it).

Only the ``(B, S)`` padded target matrix is taken (what the train step passes); targets must not be blank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # a CUDA torch brings triton; the base (CPU) install has none, and every module must still import there
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None  # type: ignore[assignment]


def _jit(fn):  # noqa: ANN001, ANN202
    """``triton.jit`` where triton is installed; the plain function otherwise (never launched then)."""
    return triton.jit(fn) if triton is not None else fn


@_jit
def _lse3(a, b, c):
    """log(e^a + e^b + e^c), -inf when all three are -inf."""
    m = tl.maximum(tl.maximum(a, b), c)
    safe = tl.where(m == float("-inf"), 0.0, m)
    none = tl.where(m == float("-inf"), 1.0, 0.0)  # keeps log() off 0 in the branch not taken
    return tl.where(m == float("-inf"), float("-inf"), safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)
                                                                      + tl.exp(c - safe) + none))


@_jit
def _labels(targets_ptr, tgt_stride, b, s, L, BLANK: tl.constexpr):
    """Extended label l'_s (blank at even s) and whether the s-2 -> s skip is allowed."""
    odd = (s % 2) == 1
    k = (s - 1) // 2
    lab = tl.load(targets_ptr + b * tgt_stride + k, mask=odd & (k < L) & (s >= 1), other=BLANK)
    prev = tl.load(targets_ptr + b * tgt_stride + k - 1, mask=odd & (k >= 1) & (k - 1 < L), other=BLANK)
    skip = odd & (k >= 1) & (lab != prev)
    return lab, skip


@_jit
def _utterance(in_len_ptr, tgt_len_ptr, b, s, T_max):
    """This program's utterance: (frames, labels, extended labels S = 2L+1, lanes s < S)."""
    Tb = tl.minimum(tl.load(in_len_ptr + b), T_max)
    L = tl.load(tgt_len_ptr + b)
    S = 2 * L + 1
    return Tb, L, S, s < S


@_jit
def _alpha_step(src, emit, s, skip, valid):
    """alpha_t from row alpha_{t-1} at ``src`` (read back from memory: the s-1 and s-2 neighbours are other
    threads' values, so every caller puts a barrier between that row's store and this)."""
    a0 = tl.load(src + s)
    a1 = tl.load(src + s - 1, mask=s >= 1, other=float("-inf"))
    a2 = tl.load(src + s - 2, mask=skip, other=float("-inf"))
    return tl.where(valid, _lse3(a0, a1, a2) + emit, float("-inf"))


@_jit
def _ctc_alpha_kernel(lp_ptr, lp_st, lp_sb, targets_ptr, tgt_stride, in_len_ptr, tgt_len_ptr, ring_ptr, ckpt_ptr,
                      nll_ptr, T_max, K, BLANK: tl.constexpr, BLOCK: tl.constexpr):
    """Alpha over the utterance's frames in a two-row ring; every K-th row kept (``ckpt``) for the backward."""
    b = tl.program_id(0)
    s = tl.arange(0, BLOCK)
    Tb, L, S, valid = _utterance(in_len_ptr, tgt_len_ptr, b, s, T_max)
    lab, skip = _labels(targets_ptr, tgt_stride, b, s, L, BLANK)
    ring = ring_ptr + b * 2 * BLOCK
    ckpt = ckpt_ptr + b * ((T_max + K - 1) // K) * BLOCK
    lp_b = lp_ptr + b * lp_sb
    emit = tl.load(lp_b + lab, mask=valid & (s * 0 + Tb > 0), other=float("-inf"))
    alpha = tl.where(valid & (s < 2), emit, float("-inf"))
    tl.store(ring + s, alpha)
    tl.store(ckpt + s, alpha)
    for t in range(1, Tb):
        tl.debug_barrier()  # alpha[t-1] stored by every thread before any reads a neighbour's
        emit = tl.load(lp_b + t * lp_st + lab, mask=valid, other=float("-inf"))
        alpha = _alpha_step(ring + ((t - 1) % 2) * BLOCK, emit, s, skip, valid)
        # the row written now was last read one iteration ago, before this iteration's barrier
        tl.store(ring + (t % 2) * BLOCK + s, alpha)
        tl.store(ckpt + (t // K) * BLOCK + s, alpha, mask=(s * 0 + t % K) == 0)
    # -log p = -logsumexp(alpha[T-1, S-1], alpha[T-1, S-2]), read back as scalars (no reduction: triton's
    # tl.max, tl.sum, tl.cdiv are library functions the CPU interpreter cannot run unless set before triton's import)
    tl.debug_barrier()
    last = ring + (tl.maximum(Tb - 1, 0) % 2) * BLOCK
    e1 = tl.where(Tb > 0, tl.load(last + S - 1), float("-inf"))
    e2 = tl.where((Tb > 0) & (L > 0), tl.load(last + tl.maximum(S - 2, 0)), float("-inf"))
    m = tl.maximum(e1, e2)
    safe = tl.where(m == float("-inf"), 0.0, m)
    total = safe + tl.log(tl.exp(e1 - safe) + tl.exp(e2 - safe) + tl.where(m == float("-inf"), 1.0, 0.0))
    tl.store(nll_ptr + b, -tl.where(m == float("-inf"), float("-inf"), total))


@_jit
def _ctc_beta_grad_kernel(lp_ptr, lp_st, lp_sb, targets_ptr, tgt_stride, in_len_ptr, tgt_len_ptr, ckpt_ptr,
                          seg_ptr, ring_ptr, nll_ptr, grad_ptr, g_st, g_sb, T_max, K, BLANK: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Beta from the last frame down, segment by segment of K frames: each segment's alpha rows are recomputed
    from its checkpoint into ``seg`` first (memory O(sqrt(T)) rows, not T). At each frame, subtracts the label
    posteriors from ``grad``, which the caller filled with exp(lp) on valid frames."""
    b = tl.program_id(0)
    s = tl.arange(0, BLOCK)
    Tb, L, S, valid = _utterance(in_len_ptr, tgt_len_ptr, b, s, T_max)
    nll = tl.load(nll_ptr + b)
    finite = (s * 0 + nll < float("inf")) & (s * 0 + Tb > 0)  # per thread: a mask must be a block
    lab, skip = _labels(targets_ptr, tgt_stride, b, s, L, BLANK)
    # the s -> s+2 skip is allowed when l'_{s+2} is a label other than l'_s: the s+2 entry's own skip flag
    _, skip_next = _labels(targets_ptr, tgt_stride, b, s + 2, L, BLANK)
    ckpt = ckpt_ptr + b * ((T_max + K - 1) // K) * BLOCK
    seg = seg_ptr + b * K * BLOCK
    ring = ring_ptr + b * 2 * BLOCK
    lp_b = lp_ptr + b * lp_sb
    g_b = grad_ptr + b * g_sb
    n_seg = (Tb + K - 1) // K
    for j in range(0, n_seg):
        t0 = (n_seg - 1 - j) * K
        n = tl.minimum(K, Tb - t0)
        tl.debug_barrier()  # the previous segment's beta loop is done with ``seg``
        tl.store(seg + s, tl.load(ckpt + (t0 // K) * BLOCK + s))
        for i in range(1, n):
            tl.debug_barrier()
            emit = tl.load(lp_b + (t0 + i) * lp_st + lab, mask=valid, other=float("-inf"))
            tl.store(seg + i * BLOCK + s, _alpha_step(seg + (i - 1) * BLOCK, emit, s, skip, valid))
        for i in range(0, n):
            t = t0 + n - 1 - i
            tl.debug_barrier()  # beta[t+1] stored by every thread before any reads a neighbour's
            emit = tl.load(lp_b + t * lp_st + lab, mask=valid & finite, other=float("-inf"))
            nxt = ring + ((t + 1) % 2) * BLOCK + s
            b0 = tl.load(nxt)
            b1 = tl.load(nxt + 1, mask=s + 1 < BLOCK, other=float("-inf"))
            b2 = tl.load(nxt + 2, mask=skip_next & (s + 2 < BLOCK), other=float("-inf"))
            last = (s * 0 + t) == Tb - 1
            start = tl.where(valid & ((s == S - 1) | (s == S - 2)), emit, float("-inf"))
            beta = tl.where(last, start, tl.where(valid, _lse3(b0, b1, b2) + emit, float("-inf")))
            tl.store(ring + (t % 2) * BLOCK + s, beta)
            alpha = tl.load(seg + (t - t0) * BLOCK + s, mask=finite, other=float("-inf"))
            post = tl.exp(alpha + beta - tl.where(emit == float("-inf"), 0.0, emit) + nll)
            tl.atomic_add(g_b + t * g_st + lab, -post, mask=valid & finite & (post > 0))


def _block(max_target: int) -> int:
    """Lanes of a program: the extended label sequence (2 S + 1 at most) rounded up to a power of two."""
    return max(16, 1 << (2 * max_target).bit_length())


def ctc_loss_and_grad(log_probs: Tensor, targets: Tensor, input_lengths: Tensor, target_lengths: Tensor,
                      blank: int = 0) -> tuple[Tensor, Tensor]:
    """(per-utterance negative log-likelihood, gradient w.r.t. ``log_probs``), as ATen's two CTC ops give them.

    ``log_probs``: (T, B, V) float32, log-softmax output, any strides with a contiguous vocabulary axis;
    ``targets``: (B, S) integer matrix, entries past each length ignored; lengths: (B,) integer tensors on the
    same device. Nothing here reads a device value on the host: the grid is the batch size and the label block
    is sized from ``targets.shape[1]``. Alpha is kept every K = ceil(sqrt(T)) frames and recomputed in between
    by the backward: ~2 sqrt(T) rows of workspace per utterance instead of ATen's T (a 30 s utterance's labels
    span thousands of lanes), for one more alpha pass.
    """
    if triton is None:
        raise RuntimeError("train.ctc=triton needs the triton package (a CUDA build of torch installs it)")
    T, B, V = log_probs.shape
    if log_probs.dtype != torch.float32 or log_probs.stride(2) != 1:
        log_probs = log_probs.float().contiguous()
    targets = targets.contiguous()
    in_len, tgt_len = input_lengths.to(torch.int64), target_lengths.to(torch.int64)
    block = _block(targets.shape[1])
    warps = max(1, min(16, block // 32))
    K = max(1, math.isqrt(max(T - 1, 0)) + 1)
    dev = log_probs.device
    nll = torch.empty(B, device=dev, dtype=torch.float32)
    if B == 0 or T == 0:
        return nll.fill_(float("inf")), torch.zeros_like(log_probs)
    ring = torch.empty(B, 2, block, device=dev, dtype=torch.float32)
    ckpt = torch.empty(B, -(-T // K), block, device=dev, dtype=torch.float32)
    _ctc_alpha_kernel[(B,)](log_probs, log_probs.stride(0), log_probs.stride(1), targets, targets.stride(0),
                            in_len, tgt_len, ring, ckpt, nll, T, K, BLANK=blank, BLOCK=block, num_warps=warps)
    frames = torch.arange(T, device=dev)[:, None] < in_len[None, :]
    grad = torch.where(frames[..., None], log_probs.exp(), 0.0).contiguous()
    seg = torch.empty(B, K, block, device=dev, dtype=torch.float32)
    _ctc_beta_grad_kernel[(B,)](log_probs, log_probs.stride(0), log_probs.stride(1), targets, targets.stride(0),
                                in_len, tgt_len, ckpt, seg, ring, nll, grad, grad.stride(0), grad.stride(1), T, K,
                                BLANK=blank, BLOCK=block, num_warps=warps)
    # zero_infinity, as the train step asks ATen for: an impossible alignment contributes no gradient
    return nll, torch.where(torch.isinf(nll)[None, :, None], 0.0, grad)
