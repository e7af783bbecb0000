"""Speaker-level test-time VTLN: the warp matrix against the frequencies it should read, the choice of warp, and the
scoring path against the warped model run by evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmu_asr.model.vtln import (
    DEFAULT_WARPS,
    Warped,
    bin_centres,
    choose_warps,
    mean_neg_entropy,
    parse_warps,
    warp_matrix,
)


def test_no_warp_is_the_identity() -> None:
    assert torch.equal(warp_matrix(1.0), torch.eye(80))
    assert torch.equal(warp_matrix(1.0, band_edge_hz=4000.0), torch.eye(80))


@pytest.mark.parametrize("alpha", [0.92, 1.08, 1.15])
def test_a_spectral_peak_moves_to_f_over_alpha(alpha: float) -> None:
    """Output bin i reads frequency alpha * f_i (below the knee), so a peak at f0 appears where f_i = f0 / alpha."""
    f = bin_centres()
    f0 = 1500.0
    spectrum = torch.tensor(-((f - f0) / 150.0) ** 2, dtype=torch.float32)  # a smooth bump on the Hz axis
    out = warp_matrix(alpha) @ spectrum
    expected = int(np.argmin(np.abs(f - f0 / alpha)))
    assert abs(int(out.argmax()) - expected) <= 1
    assert abs(int(spectrum.argmax()) - expected) >= 2  # the warp really moved it


def test_rows_interpolate_and_the_band_edge_stays() -> None:
    f = bin_centres()
    for alpha in (0.9, 1.1):
        m = warp_matrix(alpha, band_edge_hz=4000.0)
        assert torch.allclose(m.sum(1), torch.ones(80))  # a flat spectrum stays flat
        assert (m >= 0).all()
        above = np.flatnonzero(f >= 4000.0)
        assert torch.equal(m[above], torch.eye(80)[above])  # nothing above the recordings' band edge moves
        # bins between the knee and the edge read from below the edge: the edge's content does not move
        reads = (m * torch.arange(80, dtype=torch.float32)).sum(1).numpy()
        inside = np.flatnonzero(f < 4000.0)
        assert reads[inside].max() < above[0]


def test_choose_warps_takes_each_speakers_most_confident_warp() -> None:
    sure = np.log(np.full((5, 3), 1e-4)); sure[:, 0] = np.log(1 - 2e-4)  # noqa: E702
    unsure = np.log(np.full((5, 3), 1 / 3))
    speaker_of = {"a1": "A", "a2": "A", "b1": "B"}
    scores = {0.96: [("a1", unsure), ("a2", unsure), ("b1", unsure), ("x", unsure)],
              1.0: [("a1", unsure), ("a2", sure), ("b1", sure), ("x", unsure)],
              1.04: [("a1", sure), ("a2", sure), ("b1", unsure), ("x", unsure)]}
    chosen = choose_warps(scores, speaker_of)
    assert chosen == {"A": 1.04, "B": 1.0, "": 1.0}  # "": no speaker; a tie goes to no warp
    assert mean_neg_entropy(sure) > mean_neg_entropy(unsure)
    assert mean_neg_entropy(unsure) == pytest.approx(-np.log(3))


def test_parse_warps() -> None:
    assert list(parse_warps("1.08,0.92")) == [0.92, 1.0, 1.08]
    with pytest.raises(ValueError, match="comma-separated"):
        parse_warps("0.9,x")
    with pytest.raises(ValueError, match=r"\[0.5, 1.5\]"):
        parse_warps("2")


def test_vtln_scores_each_speaker_under_its_chosen_warp(tiny_run: Path, synth_dev: Path) -> None:
    """Each utterance's greedy+vtln hypothesis is what ``evaluate`` gives for the model run under its speaker's
    chosen warp; every speaker gets a warp from the grid; with only the identity warp, greedy+vtln is plain greedy."""
    from lmu_asr.data.shards import ShardSet
    from lmu_asr.train.checkpoint import model_from_checkpoint
    from lmu_asr.train.evaluate import evaluate, evaluate_vtln

    model, cfg = model_from_checkpoint(tiny_run / "checkpoints" / "last.pt")
    shards = ShardSet.open(synth_dev)
    device = torch.device("cpu")
    plain = evaluate(model, shards, cfg, device, keep_hyps=True)
    same = evaluate_vtln(model, shards, cfg, device, (1.0,), {"greedy": None})["greedy+vtln"]
    assert not model.training  # the wrapper left the model in eval mode (dropout off for what comes after)
    assert sorted(same["hypotheses"]) == plain["hypotheses"] and same["wer"] == plain["wer"]
    beam = evaluate_vtln(model, shards, cfg, device, (1.0,), {"beam4": None}, beam=4)["beam4+vtln"]
    assert sorted(beam["hypotheses"]) == evaluate(model, shards, cfg, device, beam=4, keep_hyps=True)["hypotheses"]

    res = evaluate_vtln(model, shards, cfg, device, DEFAULT_WARPS, {"greedy": None, "x": lambda lp: "X"})
    speakers = shards.speakers()
    assert set(res) == {"greedy+vtln", "x+vtln"} and len(set(speakers.values())) >= 2
    warps = res["greedy+vtln"]["warps"]
    assert set(warps) == set(speakers.values()) and set(warps.values()) <= set(DEFAULT_WARPS)
    assert all(h == "X" for _, _, h in res["x+vtln"]["hypotheses"])
    assert res["greedy+vtln"]["utterances"] == plain["utterances"]
    under = {a: {k: h for k, _, h in evaluate(Warped(model, warp_matrix(a)), shards, cfg, device,
                                              keep_hyps=True)["hypotheses"]} for a in set(warps.values())}
    for key, _, hyp in res["greedy+vtln"]["hypotheses"]:
        assert hyp == under[warps[speakers[key]]][key]


def test_eval_cli_vtln(tiny_run: Path, synth_dev: Path, tmp_path: Path) -> None:
    """``lmuasr eval --vtln`` reports the chosen warps and scores what evaluate_vtln scores; bad warps are a
    one-line error."""
    import json

    from tests.helpers import run_cli

    report = tmp_path / "r.json"
    code, output = run_cli("eval", "--checkpoint", str(tiny_run / "checkpoints" / "last.pt"), "--shards",
                           str(synth_dev), "--vtln", "--band-edge-hz", "4000", "--report", str(report))
    assert code == 0, output
    res = json.loads(report.read_text())
    assert "warps:" in output and "greedy+vtln" in output and res["band_edge_hz"] == 4000
    assert set(res["warps"].values()) <= set(DEFAULT_WARPS) and res["utterances"] == 10
    code, output = run_cli("eval", "--checkpoint", str(tiny_run / "checkpoints" / "last.pt"), "--shards",
                           str(synth_dev), "--vtln", "--warps", "0.9,abc")
    assert code == 2 and output.strip().splitlines()[-1].startswith("error: --warps: warps must be comma-separated")
    code, output = run_cli("eval", "--checkpoint", str(tiny_run / "checkpoints" / "last.pt"), "--shards",
                           str(synth_dev), "--band-edge-hz", "4000")
    assert code == 2 and output.strip().splitlines()[-1] == "error: --warps and --band-edge-hz go with --vtln"
