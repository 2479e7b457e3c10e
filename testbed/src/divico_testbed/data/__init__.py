"""Synthetic scenes and the mini-benchmarks built from them (VQAv2, POPE, MME, MMBench, GQA).

``write_benchmark_splits(out_dir)`` renders the images and writes eval records (JSONL) and
LLaVA-format training conversations; ``load_eval_records`` and ``build_prompt`` feed evaluation.
"""

from divico_testbed.data.benchmarks import (
    BENCHMARKS,
    DATA_FORMAT,
    DEFAULT_SIZES,
    DEFAULT_TEST_GROUPS,
    SMALL_SIZES,
    SPLITS,
    TRAINING_SETS,
    benchmark_data_current,
    build_prompt,
    load_eval_records,
    load_llava_conversations,
    load_scenes,
    multiturn_conversation,
    multiturn_file_name,
    sizes_for_test_groups,
    training_target,
    write_benchmark_splits,
    write_multiturn_training,
)
from divico_testbed.data.scenes import Scene, SceneObject, Sign, generate_scene, render_scene

__all__ = [
    "BENCHMARKS",
    "DATA_FORMAT",
    "DEFAULT_SIZES",
    "DEFAULT_TEST_GROUPS",
    "SMALL_SIZES",
    "SPLITS",
    "TRAINING_SETS",
    "Scene",
    "SceneObject",
    "Sign",
    "benchmark_data_current",
    "build_prompt",
    "generate_scene",
    "load_eval_records",
    "load_llava_conversations",
    "load_scenes",
    "render_scene",
    "multiturn_conversation",
    "multiturn_file_name",
    "sizes_for_test_groups",
    "training_target",
    "write_benchmark_splits",
    "write_multiturn_training",
]
