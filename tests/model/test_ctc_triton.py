"""Our Triton CTC kernels against ATen's, under Triton's CPU interpreter: loss, gradient, impossible alignments,
padding, strides; that they read no device value on the host; and the train step with ``train.ctc=triton``."""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it on Linux x86-64)")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf - inf

CPU = torch.device("cpu")
ATEN = torch.ops.aten


@pytest.fixture(scope="module", autouse=True)
def interpreter():  # noqa: ANN201
    """Kernels are decorated for the interpreter only if TRITON_INTERPRET is set when their module is imported."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    import lmu_asr.model.ctc_triton  # noqa: F401

    yield
    mp.undo()


def aten_ctc(log_probs: torch.Tensor, targets: torch.Tensor, in_len: torch.Tensor,
             tl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The independent reference: ATen's CPU CTC and its backward, zero_infinity as the train step asks."""
    nll, alpha = ATEN._ctc_loss(log_probs, targets, in_len.tolist(), tl.tolist(), 0, True)
    grad = ATEN._ctc_loss_backward(torch.ones_like(nll), log_probs, targets, in_len.tolist(), tl.tolist(), nll,
                                   alpha, 0, True)
    return nll, grad


@pytest.mark.parametrize("seed", range(5))
def test_loss_and_gradient_equal_atens(seed: int) -> None:
    from lmu_asr.model.ctc_triton import ctc_loss_and_grad

    g = torch.Generator().manual_seed(seed)
    T, B, S = int(torch.randint(2, 50, (1,), generator=g)), int(torch.randint(1, 8, (1,), generator=g)), 20
    # (B, T, V) transposed, as the step passes it: the time axis is not the outer one in memory
    log_probs = (3 * torch.randn(B, T, 29, generator=g)).log_softmax(-1).transpose(0, 1)
    in_len = torch.randint(0, T + 1, (B,), generator=g)
    tl = torch.randint(0, S + 1, (B,), generator=g)
    targets = torch.randint(1, 4, (B, S), generator=g)  # three symbols: many repeats, which need a blank between
    nll, grad = ctc_loss_and_grad(log_probs, targets, in_len, tl)
    want_nll, want_grad = aten_ctc(log_probs, targets, in_len, tl)
    finite = torch.isfinite(want_nll)
    assert torch.equal(torch.isfinite(nll), finite)  # too few frames for the labels: inf, as ATen
    torch.testing.assert_close(nll[finite], want_nll[finite], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4)
    assert not grad[:, ~finite].any()  # zero_infinity: an impossible utterance gets no gradient
    for b in range(B):  # frames past an utterance's length get none either
        assert not grad[int(in_len[b]):, b].any()


def test_padding_past_each_length_is_ignored_and_no_host_value_is_read() -> None:
    from lmu_asr.model.ctc_triton import ctc_loss_and_grad

    g = torch.Generator().manual_seed(7)
    log_probs = torch.randn(30, 3, 29, generator=g).log_softmax(-1)
    targets = torch.randint(1, 29, (3, 10), generator=g)
    in_len, tl = torch.tensor([30, 25, 12]), torch.tensor([10, 4, 6])
    noisy = targets.clone()
    for b, n in enumerate(tl.tolist()):
        noisy[b, n:] = torch.randint(1, 29, (10 - n,), generator=g)

    class HostReads(TorchDispatchMode):
        """aten._local_scalar_dense (.item(), int(), .tolist()) and copies between devices: each waits on a GPU."""

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func in (ATEN._local_scalar_dense.default, ATEN.item.default) or (
                    func is ATEN._to_copy.default and "device" in (kwargs or {})):
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with HostReads() as reads:
        got = ctc_loss_and_grad(log_probs, noisy, in_len, tl)
    assert reads.seen == []
    torch.testing.assert_close(got[0], aten_ctc(log_probs, targets, in_len, tl)[0])
    torch.testing.assert_close(got[0], ctc_loss_and_grad(log_probs, targets, in_len, tl)[0])


def runner_for(**sets: object):  # noqa: ANN201
    from lmu_asr.config import load_config
    from lmu_asr.data.specaug import SpecAugment
    from lmu_asr.model.asr import LMUASR
    from lmu_asr.train.dist import DistInfo
    from lmu_asr.train.step import StepRunner

    cfg = load_config("cpu-tiny", None, {k.replace("__", "."): v for k, v in sets.items()})
    torch.manual_seed(0)
    model = LMUASR(cfg.model, augment=SpecAugment(cfg.data.specaug), max_frames=cfg.data.max_frames)
    return StepRunner(model, cfg, CPU, DistInfo(), total_steps=100)


def test_train_step_with_triton_ctc_trains_like_atens_and_compiles_whole_under_cudagraphs() -> None:
    """Same losses over 3 compiled steps; with compile_mode=cudagraphs the whole step (CTC included) is one
    compiled module, because no host tensor enters it (on a CPU without the CUDA graphs themselves)."""
    from lmu_asr.train.step import synthetic_batch

    batches = [synthetic_batch(4, 128, seed=s) for s in range(3)]
    losses = {}
    for ctc, mode in (("aten", "default"), ("triton", "default"), ("triton", "cudagraphs")):
        runner = runner_for(train__compile="on", train__ctc=ctc, train__compile_mode=mode)
        assert runner.ctc == ctc
        assert runner.fn is not runner.ddp  # compiled whole: with ATen's CTC, cudagraphs leaves the loss eager
        losses[(ctc, mode)] = [float(runner([b], seed=i)["loss"]) for i, b in enumerate(batches)]
    assert losses[("triton", "default")] == pytest.approx(losses[("aten", "default")], rel=1e-4)
    assert losses[("triton", "cudagraphs")] == pytest.approx(losses[("aten", "default")], rel=1e-4)


def test_ctc_choice_auto_is_aten_on_cpu_and_triton_says_why_it_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmu_asr.config import load_config
    from lmu_asr.train.step import resolve_ctc

    assert resolve_ctc("auto", CPU) == "aten"
    assert resolve_ctc("triton", CPU) == "triton"  # the interpreter is on in this module
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="train.ctc=triton: Triton kernels need a GPU"):
        resolve_ctc("triton", CPU)
    with pytest.raises(ValueError, match="train.ctc must be auto, aten or triton"):
        load_config("cpu-tiny", None, {"train.ctc": "cudnn"})
    assert os.environ.get("TRITON_INTERPRET") is None


def test_triton_ctc_in_a_step_compiled_with_a_dynamic_time_axis() -> None:
    """compile_shapes=dynamic: one graph over several bucket lengths; the op's shapes follow the symbolic ones."""
    from lmu_asr.train.step import synthetic_batch

    batches = [synthetic_batch(4, frames, seed=i) for i, frames in enumerate((128, 256, 192))]
    losses = {}
    for ctc in ("aten", "triton"):  # both compiled: inductor's random streams differ from eager ones
        runner = runner_for(train__compile="on", train__ctc=ctc, train__compile_shapes="dynamic")
        losses[ctc] = [float(runner([b], seed=i)["loss"]) for i, b in enumerate(batches)]
    assert losses["triton"] == pytest.approx(losses["aten"], rel=1e-4)
