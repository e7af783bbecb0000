"""End to end on real speech: prep -> train -> eval with FSDD's own split (recordings 0-4 of every speaker and
digit are test), within the CPU budget. Measured here: 0.40 % greedy WER (1 error in 250), 0.00 % with beam 8,
~4.5 minutes of training on 2 cores; the bound below leaves margin for other CPUs' rounding."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import run_cli


def test_fsdd_own_split_wer(fsdd: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdd"
    code, output = run_cli("demo", "--speech-dir", str(fsdd), "--test-pattern", "_0[0-4]$", "--out", str(out),
                           "--no-progress")
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    test = summary["test"]["greedy"]
    assert test["utterances"] == 250  # 5 speakers x 10 digits x recordings 0-4
    assert test["wer"] <= 0.02, f"greedy WER {100 * test['wer']:.2f} % on FSDD's test split"
    assert summary["test"]["beam8"]["wer"] <= 0.02
    assert summary["seconds"]["train"] < 600  # the CPU budget of the quickstart
