"""Evaluation of (compressed) LVLMs on the mini-benchmarks: batched greedy answers, metrics, resumable results."""

from divico.evaluation.runner import answer_records, best_constant_scores, evaluate_benchmarks, select_slice

__all__ = ["answer_records", "best_constant_scores", "evaluate_benchmarks", "select_slice"]
