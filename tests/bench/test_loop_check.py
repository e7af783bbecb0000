"""The GPU kit's train_loop stage: how two runs' per-step losses are compared around a resume point."""

from __future__ import annotations

from lmu_asr.bench.loop_check import compare_losses


def test_identical_runs_and_a_difference_on_either_side_of_the_resume() -> None:
    straight = {1: 3.0, 2: 2.5, 3: 2.0, 4: 1.5}
    same = compare_losses(straight, dict(straight), k=2)
    assert same["identical_before_resume"] and same["identical_after_resume"]
    assert same["first_difference"] is None and same["max_relative_difference"] == 0.0

    after = compare_losses(straight, {**straight, 4: 1.5 * (1 + 1e-3)}, k=2)  # a resume bug shows after k only
    assert after["identical_before_resume"] and not after["identical_after_resume"]
    assert after["first_difference"] == 4
    assert after["max_relative_difference_before"] == 0.0
    assert abs(after["max_relative_difference_after"] - 1e-3) < 1e-9

    noise = compare_losses(straight, {**straight, 1: 3.0 * (1 + 2e-5), 3: 2.0 * (1 - 1e-5)}, k=2)
    assert not noise["identical_before_resume"] and not noise["identical_after_resume"]
    assert noise["first_difference"] == 1
    assert abs(noise["max_relative_difference"] - 2e-5) < 1e-9


def test_runs_that_logged_different_steps_are_not_called_identical() -> None:
    out = compare_losses({1: 1.0, 2: 0.5}, {1: 1.0}, k=1)
    assert not out["same_steps"] and not out["identical_before_resume"] and not out["identical_after_resume"]
