"""Measured FLOPs, peak memory, KV-cache size and latency of a model call.

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode``, plus a formula for the CPU SDPA kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu``), which torch does not count: it is counted
  like the GPU SDPA kernels (dense ``S_q x S_k`` scores and weighted sum, GQA-aware).
* Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU
  the torch profiler's allocator events (``profile_memory=True``): every tensor allocation and free is
  an event with a signed byte count, so the running sum is the live tensor memory and its maximum is
  the peak. Both report the peak *above* what was allocated before the call (``peak_bytes``) and the
  resident bytes of parameters and buffers (``model_bytes``).
* Latency: wall-clock around the call after ``warmup`` untimed calls, ``repeats`` timed calls, median
  and inter-quartile range; CUDA events with a ``synchronize`` on CUDA.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import LogitsProcessor, LogitsProcessorList

__all__ = [
    "LayerTimer",
    "MemoryStats",
    "TimingStats",
    "kv_cache_bytes",
    "measure_flops",
    "measure_peak_memory",
    "model_bytes",
    "time_call",
    "time_generation",
]


def _cpu_sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                    **kwargs: Any) -> int:

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def measure_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Count the FLOPs of ``fn()`` with FlopCounterMode (CPU SDPA included).

    Returns
    -------
    tuple
        ``(total_flops, fn's return value)``.
    """

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = fn()
    return int(counter.get_total_flops()), result


@dataclass
class TimingStats:
    """Seconds of ``repeats`` timed calls.

    Attributes
    ----------
    samples : list of float
    median, q1, q3 : float
        Median and quartiles (``iqr = q3 - q1``).
    """

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_dict(self) -> dict[str, Any]:
        return {"median": self.median, "q1": self.q1, "q3": self.q3, "iqr": self.iqr, "samples": self.samples}


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _check_repeats(repeats: int, warmup: int) -> None:
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], repeats: int = 5, warmup: int = 2,
              device: torch.device | str = "cpu", setup: Callable[[], None] | None = None) -> TimingStats:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Parameters
    ----------
    fn : callable
    repeats, warmup : int
    device : torch.device or str
        On CUDA, CUDA events bracket the call and the device is synchronised before reading them.
    setup : callable, optional
        Run (untimed) before every call, e.g. to reset state.

    Returns
    -------
    TimingStats
    """
    _check_repeats(repeats, warmup)
    device = torch.device(device)
    stats = TimingStats()
    for index in range(warmup + repeats):
        if setup is not None:
            setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            _sync(device)
            start.record()
            fn()
            end.record()
            _sync(device)
            elapsed = start.elapsed_time(end) / 1000.0
        else:
            begin = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - begin
        if index >= warmup:
            stats.samples.append(elapsed)
    return stats


class LayerTimer:
    """Per-module wall time through forward pre-/post-hooks (CUDA events on CUDA).

    Register after any compression hooks, so a layer's time excludes work done in earlier pre-hooks.

    Parameters
    ----------
    modules : list of torch.nn.Module
        E.g. the LLM's decoder layers.
    device : torch.device or str
    """

    def __init__(self, modules: list[torch.nn.Module], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._starts: list[Any] = [None] * len(modules)
        self._pairs: list[list[tuple[Any, Any]]] = [[] for _ in modules]
        self._handles = []
        for index, module in enumerate(modules):
            self._handles.append(module.register_forward_pre_hook(self._make_pre(index)))
            # Pre-hook appended and post-hook prepended: other hooks on the module (e.g. compression
            # work) fall outside the measured interval.
            self._handles.append(module.register_forward_hook(self._make_post(index), prepend=True))

    def _now(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _make_pre(self, index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self._starts[index] = self._now()
        return hook

    def _make_post(self, index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self._pairs[index].append((self._starts[index], self._now()))
        return hook

    def reset(self) -> None:
        """Forget recorded calls."""
        self._pairs = [[] for _ in self._pairs]

    def seconds(self) -> list[list[float]]:
        """Recorded durations, per module, in call order."""
        _sync(self.device)
        if self.device.type == "cuda":
            return [[start.elapsed_time(end) / 1000.0 for start, end in pairs] for pairs in self._pairs]
        return [[end - start for start, end in pairs] for pairs in self._pairs]

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class MemoryStats:
    """Tensor memory of one call.

    Attributes
    ----------
    peak_bytes : int
        Highest live tensor bytes during the call above those live before it (activations, cache,
        temporaries).
    model_bytes : int
        Parameters + buffers of the model (resident before the call).
    method : str
        ``"cuda_max_memory_allocated"`` or ``"torch_profiler_cpu_allocations"``.
    """

    peak_bytes: int
    model_bytes: int
    method: str

    @property
    def total_bytes(self) -> int:
        """Peak including the resident model, comparable to CUDA's max allocated."""
        return self.peak_bytes + self.model_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (shared tensors once)."""
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        pointer = tensor.data_ptr()
        if pointer in seen:
            continue
        seen.add(pointer)
        total += tensor.numel() * tensor.element_size()
    return total


def measure_peak_memory(fn: Callable[[], Any], model: torch.nn.Module | None = None,
                        device: torch.device | str = "cpu") -> MemoryStats:
    """Peak tensor memory of ``fn()``.

    Parameters
    ----------
    fn : callable
        The call to measure; its return value is dropped after the measurement.
    model : torch.nn.Module, optional
        For ``model_bytes``.
    device : torch.device or str

    Returns
    -------
    MemoryStats
    """
    device = torch.device(device)
    resident = model_bytes(model) if model is not None else 0
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return MemoryStats(int(peak), resident, "cuda_max_memory_allocated")

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
    del result
    return MemoryStats(_profiler_peak(prof), resident, "torch_profiler_cpu_allocations")


def _profiler_peak(prof: Any) -> int:
    """Maximum of the running sum of the profiler's CPU allocation events."""
    events = []
    for event in prof.profiler.kineto_results.events():
        if event.name() != "[memory]":
            continue
        if event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        events.append((event.start_ns(), event.nbytes()))
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


def kv_cache_bytes(cache: Any) -> list[int]:
    """Bytes of keys + values held per decoder layer of a transformers cache.

    Parameters
    ----------
    cache : transformers.Cache or legacy tuple
        ``out.past_key_values`` of a forward with ``use_cache=True``.

    Returns
    -------
    list of int
        One entry per layer.
    """
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    else:
        pairs = [(entry[0], entry[1]) for entry in cache]
    sizes = []
    for keys, values in pairs:
        total = 0
        for tensor in (keys, values):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
        sizes.append(total)
    return sizes


@contextmanager
def _no_grad_eval(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def time_generation(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int = 8, repeats: int = 3,
                    warmup: int = 1, device: torch.device | str = "cpu") -> dict[str, TimingStats]:
    """Time-to-first-token and per-token decode through ``model.generate``.

    A logits processor timestamps every generation step (after a ``synchronize`` on CUDA): the first
    timestamp minus the start is the time to first token, the gaps between later ones are decode
    steps. Greedy, ``min_new_tokens = max_new_tokens`` so random weights cannot stop early.

    Parameters
    ----------
    model : transformers generation model
    inputs : dict
        Forward inputs (``input_ids``, ``attention_mask``, ``pixel_values``...).
    new_tokens : int
        Tokens generated per repeat (>= 2).
    repeats, warmup : int
    device : torch.device or str

    Returns
    -------
    dict
        ``"ttft"``: TimingStats of the time to first token; ``"decode"``: TimingStats of the per-repeat
        median decode-step time.
    """

    _check_repeats(repeats, warmup)
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an integer >= 2, got {new_tokens!r}")
    device = torch.device(device)
    stamps: list[float] = []

    class _Stamp(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

    ttft, decode = TimingStats(), TimingStats()
    with _no_grad_eval(model):
        for index in range(warmup + repeats):
            stamps.clear()
            _sync(device)
            begin = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([_Stamp()]), pad_token_id=0)
            if index < warmup:
                continue
            ttft.samples.append(stamps[0] - begin)
            gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
            decode.samples.append(float(statistics.median(gaps)))
    return {"ttft": ttft, "decode": decode}
