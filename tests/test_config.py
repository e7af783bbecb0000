"""Config resolution: defaults < preset < YAML < overrides, with one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmu_asr.config import PRESETS, Config, config_from_dict, load_config


def test_every_preset_resolves_and_round_trips() -> None:
    for name in PRESETS:
        cfg = load_config(name)
        assert cfg.preset == name
        again = config_from_dict(cfg.to_dict())
        assert again == cfg


def test_reference_model_defaults() -> None:
    m = Config().model
    assert (m.n_mels, m.d_model, m.n_blocks, m.n_heads, m.lmu_order, m.lmu_hidden, m.downsample, m.vocab_size) == (
        80, 384, 3, 6, 192, 384, 2, 29)
    assert load_config("a100-b96").data.batch_size == 96 and load_config("a100-b96").data.max_frames == 400


def test_precedence(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 0.01\ndata:\n  batch_size: 7\n  specaug:\n    freq_masks: 5\n")
    cfg = load_config("a100-b96", y, {"data.batch_size": "9", "model.attention": "window",
                                      "data.buckets": "[64,128]"})
    assert cfg.optim.lr == 0.01  # YAML over default
    assert cfg.data.batch_size == 9  # override over YAML over preset
    assert cfg.data.max_frames == 400  # preset kept
    assert cfg.data.specaug.freq_masks == 5 and cfg.data.buckets == [64, 128]
    assert cfg.model.attention == "window"


@pytest.mark.parametrize("overrides,message", [
    ({"model.nope": 1}, "unknown config field"),
    ({"nope.lr": 1}, "unknown config section"),
    ({"optim.lr": "fast"}, "expected a number"),
    ({"train.compile": "maybe"}, "auto, on or off"),
    ({"data.specaug.enabled": "maybe"}, "expected true/false"),
    ({"model.n_heads": 5}, "divisible"),
    ({"train.precision": "fp8"}, "precision"),
    ({"data.buckets": "[100,64]"}, "buckets"),
])
def test_bad_values_give_one_line_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_config("default", None, overrides)
    assert "\n" not in str(info.value)


def test_compile_spellings() -> None:
    from lmu_asr.config import compile_enabled

    assert load_config("default", None, {"train.compile": True}).train.compile == "on"
    assert load_config("default", None, {"train.compile": "false"}).train.compile == "off"
    auto = load_config("default")
    assert compile_enabled(auto, "cuda") and not compile_enabled(auto, "cpu")


def test_bad_preset_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        load_config("turbo")
    with pytest.raises(ValueError, match="not found"):
        load_config("default", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config("default", bad)
