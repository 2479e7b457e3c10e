"""Bootstrap confidence intervals for the demo's scores and paired intervals for the differences between methods.

A benchmark score is recomputed on resamples of its *scoring groups* (:func:`divico_testbed.evaluation.scoring_group_key`:
a question; an MMBench circular group with its four rotations; an MME image with its yes/no pair), drawn with
replacement, so records that are scored together are resampled together. A paired difference resamples the
same groups for both methods (the same questions), which removes the spread that the questions themselves add:
the interval of ``score(A) - score(B)`` is far narrower than the two scores' own intervals suggest.

Intervals are percentile intervals: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
resampled values (``numpy.quantile``, linear interpolation between order statistics). Resamples come from
:func:`resample_indices` (``numpy.random.default_rng(seed)``), so equal seeds give equal intervals.

>>> indices = resample_indices(n_groups=len(score_a.group_keys), n_resamples=2000, seed=0)
>>> bootstrap_interval(score_a, indices)                    # score_a, score_b: GroupedScore
>>> paired_difference_interval(score_a, score_b, indices)   # contains 0 -> no evidence of a difference
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from divico.metrics import score_benchmark

from divico_testbed.evaluation import scoring_group_key

__all__ = [
    "MEAN_OF_GROUPS_BENCHMARKS",
    "GroupedScore",
    "Interval",
    "bootstrap_interval",
    "paired_difference_interval",
    "percentile_interval",
    "resample_indices",
]

#: Benchmarks whose score is the mean over scoring groups of the group's own score (VQA accuracy, exact match,
#: circular accuracy): resampling them averages per-group values, without rescoring. Checked on the data
#: (:class:`GroupedScore` rescores every resample when the mean does not reproduce the score).
MEAN_OF_GROUPS_BENCHMARKS = frozenset({"vqav2", "gqa", "mmbench"})
#: Record fields that name a scoring group inside :func:`divico.metrics.score_benchmark`; a group drawn twice gets
#: them suffixed, so that its copies count twice instead of merging into one group.
_GROUP_FIELDS = ("id", "image", "circular_group")


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap percentile interval.

    Attributes
    ----------
    estimate
        The value on the data itself (not the mean of the resamples).
    low, high
        The interval's ends.
    confidence
        Its nominal coverage, in (0, 1).
    resamples
        Resamples it was computed from.
    """

    estimate: float
    low: float
    high: float
    confidence: float
    resamples: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0 (for a difference: a difference the data shows)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def resample_indices(n_groups: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Bootstrap draws of group indices.

    Parameters
    ----------
    n_groups
        Groups to draw from (>= 1).
    n_resamples
        Resamples (>= 1).
    seed
        Seed of ``numpy.random.default_rng``.

    Returns
    -------
    np.ndarray
        (n_resamples, n_groups) int64 indices in ``[0, n_groups)``, drawn uniformly with replacement.
    """
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be an int >= 1, got {n_groups!r}.")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an int >= 1, got {n_resamples!r}.")
    return np.random.default_rng(seed).integers(0, n_groups, size=(n_resamples, n_groups), dtype=np.int64)


def percentile_interval(distribution: Sequence[float] | np.ndarray, estimate: float,
                        confidence: float = 0.95) -> Interval:
    """The percentile interval of resampled values.

    Parameters
    ----------
    distribution
        (R,) resampled values.
    estimate
        The value on the data itself.
    confidence
        Coverage in (0, 1).

    Returns
    -------
    Interval
        Ends at the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (linear interpolation).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
    values = np.asarray(distribution, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"distribution must be a non-empty 1-D array, got shape {values.shape}.")
    low, high = np.quantile(values, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0])
    return Interval(float(estimate), float(low), float(high), float(confidence), int(values.size))


class GroupedScore:
    """One benchmark score of one model's answers, recomputable on any multiset of its scoring groups.

    Parameters
    ----------
    benchmark
        A name :func:`divico.metrics.score_benchmark` knows.
    records
        The evaluated records (groups are formed by :func:`divico_testbed.evaluation.scoring_group_key`, in order
        of first appearance).
    predictions
        ``record id -> answer`` for every record.

    Attributes
    ----------
    group_keys
        The G scoring groups, in order.
    value
        The score on all records (equal to ``score_benchmark(...)["score"]``).
    uses_group_means
        Whether resamples average per-group scores (:data:`MEAN_OF_GROUPS_BENCHMARKS`, checked on the data) or
        rescore every resample.
    """

    def __init__(self, benchmark: str, records: Sequence[Mapping[str, Any]], predictions: Mapping[str, str]) -> None:
        if not records:
            raise ValueError(f"no records to score for {benchmark!r}")
        missing = [r["id"] for r in records if r["id"] not in predictions]
        if missing:
            raise ValueError(f"{len(missing)} {benchmark} records have no prediction, e.g. ids {missing[:5]}")
        self.benchmark = benchmark
        groups: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            groups.setdefault(scoring_group_key(record), []).append(dict(record))
        self.group_keys: list[str] = list(groups)
        self._groups = list(groups.values())
        self._answers = [[str(predictions[r["id"]]) for r in group] for group in self._groups]
        self._copies: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self.value = float(score_benchmark(benchmark, *self._flat(range(len(self._groups))))["score"])
        self._group_values: np.ndarray | None = None
        if benchmark in MEAN_OF_GROUPS_BENCHMARKS:
            values = np.array([score_benchmark(benchmark, answers, group)["score"]
                               for group, answers in zip(self._groups, self._answers, strict=True)], dtype=np.float64)
            if np.isclose(values.mean(), self.value, rtol=0, atol=1e-9):
                self._group_values = values

    @property
    def uses_group_means(self) -> bool:
        return self._group_values is not None

    def _copy(self, group: int, copy: int) -> list[dict[str, Any]]:
        """The records of ``group`` relabelled as its ``copy``-th draw (copy 0: the records themselves)."""
        if copy == 0:
            return self._groups[group]
        key = (group, copy)
        if key not in self._copies:
            self._copies[key] = [{**r, **{name: f"{r[name]}#{copy}" for name in _GROUP_FIELDS if name in r}}
                                 for r in self._groups[group]]
        return self._copies[key]

    def _flat(self, draws: Sequence[int] | np.ndarray) -> tuple[list[str], list[dict[str, Any]]]:
        answers: list[str] = []
        records: list[dict[str, Any]] = []
        seen: dict[int, int] = {}
        for group in (int(g) for g in draws):
            copy = seen.get(group, 0)
            seen[group] = copy + 1
            answers += self._answers[group]
            records += self._copy(group, copy)
        return answers, records

    def resampled(self, indices: np.ndarray) -> np.ndarray:
        """The score on each resample.

        Parameters
        ----------
        indices
            (R, n) group indices (any n >= 1; a bootstrap uses n = G), e.g. from :func:`resample_indices`.

        Returns
        -------
        np.ndarray
            (R,) float64 scores, each as :func:`divico.metrics.score_benchmark` gives it on the drawn groups.
        """
        indices = np.asarray(indices)
        if indices.ndim != 2 or indices.shape[1] < 1:
            raise ValueError(f"indices must be (R, n) with n >= 1, got shape {indices.shape}.")
        if indices.min() < 0 or indices.max() >= len(self._groups):
            raise ValueError(f"indices must lie in [0, {len(self._groups)}), got [{indices.min()}, {indices.max()}].")
        if self._group_values is not None:
            return self._group_values[indices].mean(axis=1)
        return np.array([score_benchmark(self.benchmark, *self._flat(row))["score"] for row in indices],
                        dtype=np.float64)


def bootstrap_interval(score: GroupedScore, indices: np.ndarray, confidence: float = 0.95) -> Interval:
    """Percentile bootstrap interval of one score over resamples of its scoring groups.

    Parameters
    ----------
    score
        The score and its groups.
    indices
        (R, G) resampled group indices (:func:`resample_indices` with ``n_groups = len(score.group_keys)``).
    confidence
        Coverage in (0, 1).
    """
    return percentile_interval(score.resampled(indices), score.value, confidence)


def paired_difference_interval(score_a: GroupedScore, score_b: GroupedScore, indices: np.ndarray,
                               confidence: float = 0.95) -> Interval:
    """Paired bootstrap interval of ``score_a - score_b``: both rescored on the same resampled groups.

    Raises
    ------
    ValueError
        If the two scores are not of the same benchmark over the same scoring groups in the same order.
    """
    if score_a.benchmark != score_b.benchmark or score_a.group_keys != score_b.group_keys:
        raise ValueError(
            f"a paired difference needs the same questions: {score_a.benchmark} with {len(score_a.group_keys)} "
            f"groups vs {score_b.benchmark} with {len(score_b.group_keys)} groups (or another order)")
    difference = score_a.resampled(indices) - score_b.resampled(indices)
    return percentile_interval(difference, score_a.value - score_b.value, confidence)
