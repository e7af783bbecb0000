"""lmuasr verify: every kind of shard damage found (key and reason), exit 1; checkpoints checked safely."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmu_asr.prep.shards import npy_bytes
from tests.helpers import run_cli
from tests.test_robustness import Ctx, rewrite_tar, truncate


def damaged_copy(synth_shards: Path, tmp_path: Path) -> tuple[Path, str]:
    out = tmp_path / "shards"
    shutil.copytree(synth_shards, out, ignore=shutil.ignore_patterns(".index-cache-*", "verify.json"))
    return out, Ctx(tmp_path, Path(), out, Path(), Path()).first_key(out)


def test_intact_shards_verify_and_match_meta_statistics(synth_shards: Path, tmp_path: Path) -> None:
    code, output = run_cli("verify", str(synth_shards), "--report", str(tmp_path / "r.json"), "--no-progress")
    assert code == 0, output
    report = json.loads((tmp_path / "r.json").read_text())
    n = json.loads((synth_shards / "meta.json").read_text())["counts"]["utterances"]
    assert report["ok"] == report["utterances"] == n and report["damaged"] == 0
    assert report["stats"]["frames"] == report["stats"]["meta_frames"] and report["stats"]["max_mean_diff"] < 1e-6
    assert report["gb_read"] > 0 and report["gb_per_s"] > 0


@pytest.mark.parametrize("damage,reason", [
    ("removed", "missing_member"), ("40 bins", "shape_mismatch"), ("nan", "non_finite"),
    ("bad json", "bad_json"), ("text", "text_mismatch"), ("truncated", "truncated"), ("extra", "not_in_index"),
])
def test_each_damage_is_found_with_key_and_reason(synth_shards: Path, tmp_path: Path, damage: str,
                                                  reason: str) -> None:
    out, key = damaged_copy(synth_shards, tmp_path)
    tar = out / "shard-000000.tar"
    edits = {
        "removed": lambda name, data: None if name == f"{key}.fbank.npy" else data,
        "40 bins": lambda name, data: npy_bytes(np.zeros((7, 40), np.float16)) if name == f"{key}.fbank.npy"
        else data,
        "nan": lambda name, data: data[:128] + b"\x00\x7e" * ((len(data) - 128) // 2)
        if name == f"{key}.fbank.npy" else data,
        "bad json": lambda name, data: b"[" * len(data) if name == f"{key}.json" else data,
        "text": lambda name, data: json.dumps({**json.loads(data), "text": "X"}).encode() if name == f"{key}.json"
        else data,
    }
    if damage == "truncated":
        truncate(tar, tar.stat().st_size // 2)
    elif damage == "extra":
        rewrite_tar(tar, lambda name, data: data)
        with open(tar, "r+b") as f:  # append a member the index does not know, before the end blocks
            import tarfile

            with tarfile.open(fileobj=f, mode="a", format=tarfile.USTAR_FORMAT) as t:
                info = tarfile.TarInfo("stranger.json")
                info.size = 2
                t.addfile(info, __import__("io").BytesIO(b"{}"))
    else:
        rewrite_tar(tar, edits[damage])
    code, output = run_cli("verify", str(out), "--no-progress")
    assert code == 1, output
    report = json.loads((out / "verify.json").read_text())
    assert reason in report["by_reason"], report["by_reason"]
    if damage not in ("truncated", "extra"):
        assert any(e["key"] == key and e["reason"] == reason for e in report["examples"])


def test_verify_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    ck = tiny_run / "checkpoints" / "last.pt"
    code, output = run_cli("verify", "--checkpoint", str(ck))
    assert code == 0 and "every tensor matches its config" in output and "[1, 50, 29]" in output
    state = torch.load(ck, weights_only=True)
    state["config"]["model"]["lmu_order"] = 40  # tensors that no longer fit their config
    torch.save(state, tmp_path / "bad.pt")
    code, output = run_cli("verify", "--checkpoint", str(tmp_path / "bad.pt"))
    assert code == 1 and "the config needs" in output
    code, output = run_cli("verify")
    assert code == 2 and "give a shard folder" in output
