"""Efficiency measurement: analytic and measured FLOPs, peak memory, KV-cache size and latency.

Submodules: :mod:`~divico.efficiency.flops` (analytic counts), :mod:`~divico.efficiency.measure`
(FlopCounterMode, memory, timing), :mod:`~divico.efficiency.presets` (random-weight model shapes).
"""

from divico.efficiency.flops import (
    METHODS,
    FlopsBreakdown,
    LayerFlops,
    count_flops,
    decode_step_flops,
    paper_eq10_layer,
    paper_eq11_reduction,
    resolve_keep_tokens,
)
from divico.efficiency.measure import (
    LayerTimer,
    MemoryStats,
    TimingStats,
    kv_cache_bytes,
    measure_flops,
    measure_peak_memory,
    model_bytes,
    time_call,
    time_generation,
)
from divico.efficiency.presets import (
    PRESETS,
    PromptShape,
    build_config,
    build_inputs,
    build_random_model,
    extrapolate_layers,
    load_model,
    preset_names,
)

__all__ = [
    "METHODS",
    "PRESETS",
    "FlopsBreakdown",
    "LayerFlops",
    "LayerTimer",
    "MemoryStats",
    "PromptShape",
    "TimingStats",
    "build_config",
    "build_inputs",
    "build_random_model",
    "count_flops",
    "decode_step_flops",
    "extrapolate_layers",
    "kv_cache_bytes",
    "load_model",
    "measure_flops",
    "measure_peak_memory",
    "model_bytes",
    "paper_eq10_layer",
    "paper_eq11_reduction",
    "preset_names",
    "resolve_keep_tokens",
    "time_call",
    "time_generation",
]
