"""The GPU-facing properties of the train step, proved on the CPU: no scalar reads of step results, host CTC
lengths, the metric read-out, bf16/fp16 numerics against fp32, planned compile shapes, memory estimates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lmu_asr.config import load_config
from lmu_asr.data.dataset import to_device
from lmu_asr.data.specaug import SpecAugment
from lmu_asr.model.asr import LMUASR
from lmu_asr.train.dist import DistInfo
from lmu_asr.train.step import MetricReader, StepRunner, host_lengths, seed_step, step_record, synthetic_batch

CPU = torch.device("cpu")


def runner_for(preset: str = "cpu-tiny", **sets: object) -> StepRunner:
    cfg = load_config(preset, None, {k.replace("__", "."): v for k, v in sets.items()})
    torch.manual_seed(0)
    model = LMUASR(cfg.model, augment=SpecAugment(cfg.data.specaug), max_frames=cfg.data.max_frames)
    return StepRunner(model, cfg, CPU, DistInfo(), total_steps=100)


class ScalarReads(TorchDispatchMode):
    """Counts ``.item()``/``float()``/``bool()`` on tensors (aten._local_scalar_dense): on a GPU, each one waits."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_steady_state_step_and_read_out_never_read_a_device_scalar(precision: str) -> None:
    runner = runner_for(train__precision=precision, train__cpu_autocast=True)
    reader = MetricReader(CPU)
    batch = synthetic_batch(4, 128, seed=1)
    for step in range(2):  # warm: the scaler's first steps, lazily created state
        reader.push(runner([batch], seed=step), {"step": step, "epoch": 0, "lr": 0.0, "utterances": 4})
    with ScalarReads() as reads:
        out = runner([batch], seed=7)
        ready = reader.push(out, {"step": 7, "epoch": 0, "lr": 0.0, "utterances": 4})
    assert reads.count == 0
    assert [r[1]["step"] for r in ready] == [7]  # on a CPU the values are ready at once
    assert (runner.scaler is not None) == (precision == "fp16")


def test_ctc_lengths_come_from_the_host_and_stay_there() -> None:
    batch = synthetic_batch(3, 128, seed=2)
    batch["lengths_host"] = batch["lengths"].clone()
    out_lengths, target_lengths = host_lengths(batch, 2)
    assert out_lengths.tolist() == [(n + 1) // 2 for n in batch["lengths"].tolist()]
    assert target_lengths is batch["target_lengths"]
    moved = to_device(batch, CPU)
    assert moved["lengths_host"] is batch["lengths_host"]  # _host keys are never moved to the device
    batch["lengths_host"] = batch["lengths"].to("meta")
    with pytest.raises(ValueError, match="on the host"):
        host_lengths(batch, 2)


def test_metric_reader_keeps_order_and_drains() -> None:
    reader = MetricReader(CPU, depth=2)
    got = []
    for step in range(5):
        out = {"loss": torch.tensor(float(step)), "grad_norm": torch.tensor(1.0), "bad": torch.tensor(step == 3),
               "work": None, "lr": 0.1}
        got += reader.push(out, {"step": step, "epoch": 0, "lr": 0.1, "utterances": 2, "skipped_samples": 0})
    got += reader.drain()
    records = [step_record(v, m) for v, m in got]
    assert [r["step"] for r in records] == list(range(5)) and [r["loss"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["non_finite"] for r in records] == [False, False, False, True, False]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_tracks_fp32(precision: str) -> None:
    """train.cpu_autocast runs the bf16/fp16 paths (autocast, fp32 CTC and FFT, the GradScaler) in CI.

    Stated tolerances, relative to the fp32 run on the same batches: the first loss (the forward alone) within
    2e-3 (bf16: 8-bit mantissa) / 5e-4 (fp16); the trajectory of 6 steps within 2e-2. Measured here: bf16
    within 2e-4 at every step; fp16's first step overflows the GradScaler's initial scale (2^16) and is skipped
    on the device, as designed, so its trajectory runs one update behind: within 6e-3.
    """
    batches = [synthetic_batch(4, 256, seed=s) for s in range(6)]
    runs = {}
    for p in ("fp32", precision):
        runner = runner_for(train__precision=p, train__cpu_autocast=True, model__dropout=0.0,
                            data__specaug__enabled=False)
        runs[p] = ([runner([b], seed=i) for i, b in enumerate(batches)], runner)
    ref = [float(o["loss"]) for o in runs["fp32"][0]]
    got = [float(o["loss"]) for o in runs[precision][0]]
    assert got[0] == pytest.approx(ref[0], rel=2e-3 if precision == "bf16" else 5e-4)
    assert got == pytest.approx(ref, rel=2e-2) and got != ref  # it really ran in reduced precision
    skipped = [bool(o["bad"]) for o in runs[precision][0]]
    if precision == "fp16":
        assert skipped[0] and not any(skipped[1:]) and runs["fp16"][1].scaler.get_scale() == 2.0**15
    else:
        assert not any(skipped)


def test_cpu_autocast_is_off_unless_asked() -> None:
    assert runner_for(train__precision="bf16").amp is None
    assert runner_for(train__precision="bf16", train__cpu_autocast=True).amp == torch.bfloat16


def test_warm_up_compiles_every_planned_shape_and_training_adds_none(tmp_path: Path) -> None:
    """Static shapes: graphs == planned shapes, all compiled before the first step; RNG and weights untouched."""
    from torch._dynamo.utils import counters

    from lmu_asr.bench.synthetic import write_synthetic_shards
    from lmu_asr.train.loop import Trainer

    shards = write_synthetic_shards(tmp_path / "shards", 40, 2, min_frames=50, max_frames=250)
    cfg = load_config("cpu-tiny", None, {"train.compile": "on", "data.partial_batches": "full",
                                         "data.buckets": "128,256", "data.max_frames": 256,
                                         "data.batch_frames": 1024, "train.max_steps": 6})
    trainer = Trainer(cfg, shards, tmp_path / "run", progress=False, device="cpu")
    planned = trainer.planned()
    assert planned == [(8, 128), (4, 256)]
    assert f"{len(planned)} graph(s), one per planned shape" in trainer.describe()
    assert "; inductor (train.compile_mode=auto)" in trainer.describe()  # a CPU: no CUDA graphs
    torch._dynamo.reset()
    counters.clear()
    rng = torch.get_rng_state()
    trainer._setup()  # builds the runner and warms up
    assert torch.equal(torch.get_rng_state(), rng)
    assert counters["stats"]["unique_graphs"] == len(planned)
    trainer.resume = True  # _setup already ran: run() must not build a second runner
    trainer._setup = lambda: None  # type: ignore[method-assign]
    trainer.run()
    assert counters["stats"]["unique_graphs"] == len(planned)  # no step compiled anything new
    assert not counters["graph_break"]


def test_activation_estimate_and_fast_h100_fits_5_5_gb() -> None:
    from lmu_asr.bench.train import activation_estimate
    from lmu_asr.data.sampler import planned_shapes

    cfg = load_config("fast-h100")
    fast = activation_estimate(cfg)
    assert fast["total_gb"] <= 5.5
    assert fast["largest_shape"] in {f"{r}x{f}" for r, f in planned_shapes(cfg.data, cfg.model.downsample)}
    a100 = activation_estimate(load_config("a100-b96"))
    assert 0.2 < a100["activations_gb"] < 2.0  # ~6 MB per 4 s utterance in bf16, as measured by the review
    frames = cfg.data.batch_frames
    double = activation_estimate(load_config("fast-h100", None, {"data.batch_frames": 2 * frames}))
    assert double["activations_gb"] == pytest.approx(2 * fast["activations_gb"], rel=0.05)  # linear in rows
    ckpt = activation_estimate(load_config("fast-h100", None, {"data.batch_frames": 2 * frames,
                                                                "model.activation_checkpointing": True}))
    assert ckpt["activations_gb"] < 0.6 * double["activations_gb"]


def test_cudagraphs_mode_compiles_the_model_alone_and_trains_like_the_default() -> None:
    """compile_mode=cudagraphs: the model compiled with mode="reduce-overhead" (CUDA graphs on a GPU; on a CPU the
    same compiled model without them), the CTC eager outside; same losses as the one-graph default, 3 steps."""
    batches = [synthetic_batch(4, 128, seed=s) for s in range(3)]
    losses = {}
    for mode in ("default", "cudagraphs"):
        runner = runner_for(train__compile="on", train__compile_mode=mode, model__dropout=0.0)
        assert runner.cudagraphs == (mode == "cudagraphs")
        assert (runner.fn is runner.ddp) == (mode == "cudagraphs")  # the step itself is not compiled whole
        assert not any(k.startswith("encode") for k in runner.ddp.state_dict())  # parameters registered once
        losses[mode] = [float(runner([b], seed=i)["loss"]) for i, b in enumerate(batches)]
    assert losses["cudagraphs"] == pytest.approx(losses["default"], rel=1e-4)
    with pytest.raises(ValueError, match="compile_mode must be auto, default or cudagraphs"):
        load_config("cpu-tiny", None, {"train.compile_mode": "graphs"})
    with pytest.raises(ValueError, match="cudagraphs needs optim.grad_accum=1"):
        load_config("cpu-tiny", None, {"train.compile_mode": "cudagraphs", "optim.grad_accum": 2})


def test_compile_mode_auto_picks_cuda_graphs_only_where_they_hold_the_whole_step() -> None:
    """auto -> cudagraphs on CUDA with the Triton CTC, one process, no accumulation (2.6x the default at b96 on an
    H200); the default mode everywhere else; an explicit choice is kept as given."""
    from lmu_asr.train.step import resolve_compile_mode

    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    auto = load_config("a100-b96")
    assert auto.train.compile_mode == "auto"
    assert resolve_compile_mode(auto, cuda, "triton", distributed=False) == "cudagraphs"
    assert resolve_compile_mode(auto, cuda, "aten", distributed=False) == "default"  # host lengths: no capture
    assert resolve_compile_mode(auto, cuda, "triton", distributed=True) == "default"  # DDP: unmeasured
    assert resolve_compile_mode(auto, CPU, "aten", distributed=False) == "default"
    accum = load_config("a100-b96", None, {"optim.grad_accum": 2})
    assert resolve_compile_mode(accum, cuda, "triton", distributed=False) == "default"
    for mode in ("default", "cudagraphs"):
        chosen = load_config("a100-b96", None, {"train.compile_mode": mode})
        assert resolve_compile_mode(chosen, CPU, "aten", distributed=True) == mode
    assert runner_for(train__compile="on").compile_mode == "default"  # what the CPU runner resolved


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_seed_step_draws_what_torch_manual_seed_draws(device: str) -> None:
    """The step reseeds only its own generators (cheaper): dropout and SpecAugment must draw the same numbers."""
    dev = torch.device(device)
    for seed in (0, 12345, 2**62 + 7):
        torch.rand(3, device=dev)  # move the state on, so a no-op seeding would show
        torch.manual_seed(seed)
        want = torch.rand(5), torch.rand(5, device=dev), torch.randint(0, 100, (4,), device=dev)
        torch.rand(7, device=dev)
        seed_step(seed, dev)
        got = torch.rand(5), torch.rand(5, device=dev), torch.randint(0, 100, (4,), device=dev)
        for w, g in zip(want, got, strict=True):
            assert torch.equal(w, g)


def test_a_stretching_model_gets_its_own_output_lengths_into_the_ctc() -> None:
    """With data.specaug.tempo the model draws new lengths on the device: the loss must use them, not the
    loader's host copies (which would score padding, or cut stretched utterances short, silently)."""
    from lmu_asr.model.asr import ctc_loss

    runner = runner_for(data__specaug__tempo=0.2, train__ctc="aten", data__specaug__freq_masks=0,
                        data__specaug__time_masks=0)
    assert runner.stretches
    batch = synthetic_batch(4, 128, seed=3)
    batch["lengths_host"] = batch["lengths"].clone()
    batch["target_lengths_host"] = batch["target_lengths"].clone()
    runner.model.train()
    torch.manual_seed(11)
    logits, out_lengths = runner.model(batch["feats"], batch["lengths"])
    assert not torch.equal(out_lengths, host_lengths(batch, 2)[0])  # the draw moved the lengths
    expected = ctc_loss(logits, out_lengths, batch["targets"], batch["target_lengths"])
    torch.manual_seed(11)
    torch.testing.assert_close(runner._loss(batch, 1.0), expected)
    assert not runner_for(train__ctc="aten").stretches  # off by default
