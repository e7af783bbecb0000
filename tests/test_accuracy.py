"""End to end on real speech: prep -> train -> eval with FSDD's own split (recordings 0-4 of every speaker and
digit are test), within the CPU budget. The demo trains 80 epochs by default, for unheard voices; on FSDD's own
split 30 are as good, so the test runs 30 (1,500 steps, ~200 s of training on 2 cores, against ~490 s; the suite
ran this test for 685 s of its 1,470 s cold). Measured here at 30 epochs, seeds 0, 1, 2 (2026-11-28): greedy 1.2,
3.2, 1.2 % WER, beam 8 1.6, 2.8, 0.8 %, beam 512 + LM 0.8, 0.4, 0.4 %. At 80 epochs (earlier, seeds 0 and 1,
with the frequency convolution): greedy 1.6-3.6 %, LM 0.4-1.2 %; this session, seed 0: greedy 2.8 %, LM 0.0 %.
Between late epochs of one run greedy moves between 1.2 and 2.8 % (3 to 7 errors in 250), so the bounds below
catch a broken pipeline (which scores far worse), not single errors; the README reports the 80-epoch figures."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli


def test_fsdd_own_split_wer(fsdd: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdd"
    code, output = run_cli("demo", "--speech-dir", str(fsdd), "--test-pattern", "_0[0-4]$", "--out", str(out),
                           "--epochs", "30", "--no-progress")
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    test = summary["test"]["greedy"]
    assert test["utterances"] == 250  # 5 speakers x 10 digits x recordings 0-4
    assert test["wer"] <= 0.06, f"greedy WER {100 * test['wer']:.2f} % on FSDD's test split"
    assert summary["test"]["beam8"]["wer"] <= 0.06
    assert summary["test"]["beam512+lm"]["wer"] <= 0.02  # the word LM (tuned on DEV) keeps it lower
    # no time bound here: a timed test fails whenever the machine is shared (it did, at 898 s of a 350 s run);
    # the demo's time is reported in summary.json and measured alone for the README
    exported_model_agrees_on_real_speech(Path(summary["checkpoint"]), fsdd, tmp_path)


def exported_model_agrees_on_real_speech(checkpoint: Path, fsdd: Path, tmp_path: Path) -> None:
    """The exported model, run by examples/onnx_transcribe.py without torch (8 kHz audio: resampled), prints what
    lmuasr transcribe prints, on 50 of FSDD's test recordings."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("kaldi_native_fbank") is None:
        return  # the export extra is not installed: tests/test_export.py says so
    from tests.helpers import read_transcripts
    from tests.test_export import run_example, transcribe

    code, output = run_cli("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"))
    assert code == 0, output
    files = [fsdd / r["path"] for r in read_transcripts(fsdd) if r["utt_id"].endswith(("_00", "_01"))][:50]
    assert len(files) == 50
    expected = transcribe(checkpoint, files)
    assert run_example(tmp_path, tmp_path / "export", files) == expected
    assert sum(v != "" for v in expected.values()) >= 45
