"""Benchmark code is checked for consistency (units, ratios, report files), never for speed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmu_asr.bench.report import SEED_REFERENCE, markdown_table
from lmu_asr.bench.train import bench_train, seed_comparison, synthetic_batch
from lmu_asr.config import load_config
from tests.helpers import run_cli


def test_report_files_and_internal_consistency(tmp_path: Path) -> None:
    cfg = load_config("cpu-tiny")
    data = bench_train(cfg, tmp_path, torch.device("cpu"), [(4, 64), (48, 64)], steps=2, windows=1)
    for name in ("train.json", "train.md", "train.png"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "train.json").read_text())
    for row in saved["rows"]:
        assert row["utt_per_s"] == pytest.approx(row["batch"] * row["it_per_s"])
        assert row["step_ms"] == pytest.approx(1000 / row["it_per_s"])
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / row["peak_tflops"])
        assert row["achieved_tflops"] == pytest.approx(row["flops_per_step"] * row["it_per_s"] / 1e12)
        assert 0.0 < row["padding"] < 0.5  # lengths uniform in [frames/2, frames]
    comp = {c["config"]: c for c in saved["seed_comparison"]}
    b48 = comp["RTX 4090 b48"]
    assert b48["ours_utt_s"] == pytest.approx(data["rows"][1]["utt_per_s"])
    assert b48["speedup_utt"] == pytest.approx(b48["ours_utt_s"] / (48 * 2.0))
    assert comp["A100 b96"]["ours_it_s"] is None  # not measured at that batch: no made-up number
    assert "| RTX 4090 b48 |" in (tmp_path / "train.md").read_text()


def test_seed_reference_and_synthetic_batches() -> None:
    assert [(r["batch"], r["utt_per_s"]) for r in SEED_REFERENCE] == [(48, 96.0), (64, 140.8), (96, 336.0)]
    b = synthetic_batch(8, 400, seed=1)
    assert b["feats"].shape == (8, 400, 80) and (b["lengths"] >= 200).all() and (b["lengths"] <= 400).all()
    assert (b["target_lengths"] <= b["lengths"] // 2).all()
    beyond = torch.arange(400)[None, :] >= b["lengths"][:, None]
    assert b["feats"][beyond].abs().max() == 0  # padding is zero
    assert seed_comparison([]) and all(c["ours_it_s"] is None for c in seed_comparison([]))
    assert markdown_table([{"a": 1.23456, "b": None}], [("a", "A"), ("b", "B")]).splitlines()[-1] == "| 1.23 |  |"


def test_bench_model_cli(tmp_path: Path) -> None:
    code, output = run_cli("bench", "model", "--out", str(tmp_path), "--lengths", "16,40", "--batch", "2")
    assert code == 0, output
    rows = json.loads((tmp_path / "model.json").read_text())["rows"]
    for r in rows:
        best = min(r[f"parallel ({m})"] for m in ("fft", "chunk", "memory"))
        assert r["speedup_vs_recurrence"] == pytest.approx(r["recurrence"] / best)
        assert r["speedup_vs_lstm"] == pytest.approx(r["lstm"] / best)


def test_bench_prep_and_loader_cli(mini_corpus: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    code, output = run_cli("bench", "prep", "--corpus-dir", str(mini_corpus), "--subset", "xs", "--out",
                           str(tmp_path), "--max-recordings", "2")
    assert code == 0, output
    prep = json.loads((tmp_path / "prep.json").read_text())
    ours, naive = prep["approaches"][0], prep["approaches"][1]
    assert prep["ratio_vs_naive"] == pytest.approx(naive["seconds"] / ours["seconds"])
    assert prep["zstd"][0]["ratio"] == 1.0 and all(0 < z["ratio"] < 1.2 for z in prep["zstd"])
    code, output = run_cli("bench", "loader", "--corpus-dir", str(mini_corpus), "--subset", "xs", "--out",
                           str(tmp_path))
    assert code == 0, output
    loader = json.loads((tmp_path / "loader.json").read_text())
    names = [r["loader"] for r in loader["rows"]]
    assert names[0] == "lmu-asr shards" and any(n.startswith("seed") for n in names)
    assert loader["ratio_vs_seed"] == pytest.approx(loader["rows"][0]["utt_per_s"] / loader["rows"][1]["utt_per_s"])
    assert torch.get_num_threads() == threads  # per-core benches must not leak their thread count
