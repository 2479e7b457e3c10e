"""Evaluation on the paper's benchmarks in their official formats, scored with the official rules.

Benchmarks register in :mod:`divico.evaluation.benchmarks` (one file each); :func:`get_benchmark` returns the class.
"""

from divico.evaluation import benchmarks  # noqa: F401  (importing it registers every shipped benchmark)
from divico.evaluation.benchmark import (
    Benchmark,
    BenchmarkDataError,
    Sample,
    available_benchmarks,
    get_benchmark,
    register_benchmark,
)
from divico.evaluation.generation import GenerationTimings, generate_batch
from divico.evaluation.runner import EvalConfiguration, compare_configurations, evaluate_benchmark, format_comparison_table
from divico.evaluation.judge import Judge, JudgeCache, JudgeVerdict, OpenAIChatJudge, TransformersJudge, make_judge

__all__ = [
    "Benchmark",
    "BenchmarkDataError",
    "Sample",
    "available_benchmarks",
    "get_benchmark",
    "register_benchmark",
    "GenerationTimings",
    "generate_batch",
    "EvalConfiguration",
    "compare_configurations",
    "evaluate_benchmark",
    "format_comparison_table",
    "Judge", "JudgeCache", "JudgeVerdict", "OpenAIChatJudge", "TransformersJudge", "make_judge",
]
