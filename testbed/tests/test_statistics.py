"""Bootstrap intervals on cases computed by hand: percentiles of few resamples, group resampling that keeps
MMBench rotations and MME pairs together (and counts a group drawn twice twice), paired differences."""

from __future__ import annotations

import numpy as np
import pytest

from divico_testbed.statistics import (
    GroupedScore,
    Interval,
    bootstrap_interval,
    paired_difference_interval,
    percentile_interval,
    resample_indices,
)


def _gqa(answers: list[str]) -> list[dict]:
    return [{"id": f"g{i}", "benchmark": "gqa", "image": "x.png", "question": "q", "answer": a}
            for i, a in enumerate(answers)]


def test_percentile_interval_by_hand() -> None:
    # Linear interpolation between order statistics: the 2.5% point of 1..5 is 1 + 0.025 * 4 = 1.1.
    interval = percentile_interval([5, 1, 4, 2, 3], estimate=3.0, confidence=0.95)
    assert (interval.low, interval.high) == pytest.approx((1.1, 4.9))
    assert interval == Interval(3.0, pytest.approx(1.1), pytest.approx(4.9), 0.95, 5)
    assert percentile_interval([1, 2, 3, 4, 5], 3.0, confidence=0.5).to_dict() == {
        "estimate": 3.0, "low": 2.0, "high": 4.0, "confidence": 0.5, "resamples": 5}
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 1.0"):
        percentile_interval([1.0], 0.0, confidence=1.0)


def test_resample_indices_are_seeded_and_validated() -> None:
    first = resample_indices(7, 5, seed=3)
    assert first.shape == (5, 7) and first.min() >= 0 and first.max() < 7
    assert np.array_equal(first, resample_indices(7, 5, seed=3))
    assert not np.array_equal(first, resample_indices(7, 5, seed=4))
    with pytest.raises(ValueError, match="n_groups must be an int >= 1, got 0"):
        resample_indices(0, 5)


def test_mean_benchmark_resamples_by_hand() -> None:
    records = _gqa(["left", "right", "red", "up"])
    score = GroupedScore("gqa", records, {"g0": "left", "g1": "right", "g2": "blue", "g3": "down"})
    assert score.value == pytest.approx(50.0) and score.uses_group_means
    # Resamples (g0, g0, g1, g2): 3/4 right; (g2, g3, g3, g2): none; (g0, g1, g0, g1): all.
    indices = np.array([[0, 0, 1, 2], [2, 3, 3, 2], [0, 1, 0, 1]])
    assert score.resampled(indices) == pytest.approx([75.0, 0.0, 100.0])
    # Three resamples at 50%: quantiles 0.25 and 0.75 of (0, 75, 100) -> 37.5 and 87.5.
    interval = bootstrap_interval(score, indices, confidence=0.5)
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((50.0, 37.5, 87.5))


def test_identical_predictions_give_a_zero_difference() -> None:
    records = _gqa(["left", "right", "red", "up", "a", "b"])
    predictions = {"g0": "left", "g1": "x", "g2": "red", "g3": "y", "g4": "a", "g5": "z"}
    a, b = GroupedScore("gqa", records, predictions), GroupedScore("gqa", records, dict(predictions))
    interval = paired_difference_interval(a, b, resample_indices(6, 200, seed=0))
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0) and not interval.excludes_zero


def test_paired_difference_by_hand() -> None:
    records = _gqa(["left", "right", "red"])
    better = GroupedScore("gqa", records, {"g0": "left", "g1": "right", "g2": "no"})
    worse = GroupedScore("gqa", records, {"g0": "left", "g1": "no", "g2": "no"})
    # Only g1 differs (+100 points for it): a resample's difference is 100 * (draws of g1) / 3.
    indices = np.array([[1, 1, 1], [0, 2, 2], [1, 0, 2], [1, 1, 0]])
    interval = paired_difference_interval(better, worse, indices, confidence=0.5)
    # Differences 100, 0, 33.3, 66.7 -> sorted (0, 33.3, 66.7, 100); quantiles 0.25, 0.75: 25 and 75.
    assert (interval.estimate, interval.low, interval.high) == pytest.approx((100 / 3, 25.0, 75.0))
    assert interval.excludes_zero
    other = GroupedScore("gqa", records[:2], {"g0": "left", "g1": "x"})
    with pytest.raises(ValueError, match="needs the same questions"):
        paired_difference_interval(better, other, indices[:, :2])


def test_mmbench_resamples_whole_circular_groups() -> None:
    records = [{"id": f"{g}-r{k}", "benchmark": "mmbench", "image": "x.png", "question": "q",
                "options": ["red", "blue", "green", "pink"][k:] + ["red", "blue", "green", "pink"][:k],
                "answer": "ABCD"[(4 - k) % 4], "circular_group": g, "rotation": k}
               for g in ("m0", "m1") for k in range(4)]
    # m0 right in all four rotations; m1 wrong in one of them.
    predictions = {r["id"]: "red" for r in records}
    predictions["m1-r2"] = "blue"
    score = GroupedScore("mmbench", records, predictions)
    assert score.group_keys == ["m0", "m1"] and score.value == pytest.approx(50.0) and score.uses_group_means
    assert score.resampled(np.array([[0, 0], [1, 1], [0, 1]])) == pytest.approx([100.0, 0.0, 50.0])


def test_mme_rescores_a_group_drawn_twice_as_two_groups() -> None:
    records = [{"id": f"q{i}", "benchmark": "mme", "image": image, "question": "q", "answer": label,
                "subtask": "count"} for i, (image, label) in enumerate([("a.png", "yes"), ("a.png", "no"),
                                                                         ("b.png", "yes"), ("b.png", "no")])]
    predictions = {"q0": "Yes", "q1": "No", "q2": "Yes", "q3": "Yes"}  # image a both right, image b one right
    score = GroupedScore("mme", records, predictions)
    assert not score.uses_group_means  # MME's total is no mean over pairs
    # acc + acc+: (a, b) 75 + 50; (a, a) 100 + 100 (the two copies count as two images); (b, b) 50 + 0.
    assert score.value == pytest.approx(125.0)
    assert score.resampled(np.array([[0, 1], [0, 0], [1, 1]])) == pytest.approx([125.0, 200.0, 50.0])


def test_pope_rescores_f1_on_each_resample() -> None:
    records = [{"id": f"p{i}", "benchmark": "pope", "image": "x.png", "question": "q", "answer": label,
                "split_type": "random"} for i, label in enumerate(["yes", "yes", "no"])]
    score = GroupedScore("pope", records, {"p0": "Yes", "p1": "No", "p2": "Yes"})
    # All: TP 1, FN 1, FP 1 -> F1 50. (p0, p0, p2): TP 2, FP 1 -> P 2/3, R 1 -> F1 80. (p1, p2, p2): TP 0 -> 0.
    assert score.value == pytest.approx(50.0)
    assert score.resampled(np.array([[0, 0, 2], [1, 2, 2]])) == pytest.approx([80.0, 0.0])
    with pytest.raises(ValueError, match="1 pope records have no prediction"):
        GroupedScore("pope", records, {"p0": "Yes", "p1": "No"})
