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


def test_a_control_run_tells_grown_noise_from_a_resume_jump() -> None:
    """On a GPU two fresh runs drift apart as training goes on; the resumed half must stay within that drift."""
    straight = {s: 3.0 - 0.1 * s for s in range(1, 9)}
    noisy = {s: v * (1 + 1e-6 * s * s) for s, v in straight.items()}  # run-to-run noise that grows with s
    control = {s: v * (1 - 1e-6 * s * s) for s, v in straight.items()}
    grown = compare_losses(straight, noisy, k=4, control=control)
    assert not grown["identical_after_resume"] and grown["resume_within_noise"]
    assert abs(grown["control_max_relative_difference_after"] - 64e-6) < 1e-9

    jump = {s: v * (1 + (1e-6 * s * s if s <= 4 else 1e-3)) for s, v in straight.items()}  # a resume bug
    assert not compare_losses(straight, jump, k=4, control=control)["resume_within_noise"]

    exact = compare_losses(straight, dict(straight), k=4, control=dict(straight))  # the CPU: all bit-exact
    assert exact["resume_within_noise"] and exact["control_mean_relative_difference_after"] == 0.0
    tiny = compare_losses(straight, {**straight, 6: straight[6] * (1 + 1e-9)}, k=4, control=dict(straight))
    assert not tiny["resume_within_noise"]  # a deterministic control leaves no room for any difference
