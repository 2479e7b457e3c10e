"""The engine's contract, as check functions over (method, model class, attention implementation).

``tests/test_contract.py`` runs every check for every registered method x every registered model class x
{"sdpa", "eager"}; ``tests/test_adding_a_method.py`` runs the same checks on a method it defines. Each check takes
names, not objects, so a method or model family registered later is checked by the same code:

* the model comes from :data:`FAMILIES` (one tiny random-weight builder per supported model class; a class
  without one makes :func:`family` fail, never skip);
* the method is configured generically (:func:`compress_config`: ``keep_ratio=KEEP_RATIO`` at ``layer=LAYER``;
  :func:`keep_all_config`: ``keep_ratio=1.0``) and described only by its class attributes and accounting. Keyword
  ``options`` of a check go to the config (e.g. ``encoder="deterministic"``, ``per_frame_keep=True``), so the
  family and engine test files run the same checks on variants.

Every check works on a deep copy of a pristine model, so no check can leak hooks, LoRA or changed weights into
another, and the pristine models (built once per process) serve as the unmodified reference.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig
from torch import nn

import divico
from divico.lora import inject_lora, lora_target_regex
from divico.methods.base import CompressionMethod
from divico.registry import adapter_classes, get_method_class
from divico.selection import TokenSelection
from tiny_models import (
    FIRST_SPECIAL_ID,
    TOKENS_PER_IMAGE,
    VIDEO_LLAVA_FRAMES,
    VIDEO_LLAVA_PATCHES,
    VOCAB_SIZE,
    llava_batch,
    llava_prompt,
    qwen_batch,
    qwen_item,
    qwen_prompt,
    randomize_compressor,
    tiny_llava,
    tiny_qwen,
    tiny_video_llava,
    video_llava_batch,
    video_llava_prompt,
)
from tiny_idefics3 import idefics3_accounting, idefics3_batch, idefics3_prompts, tiny_idefics3
from tiny_internvl import internvl_accounting, internvl_batch, internvl_prompts, tiny_internvl
from tiny_qwen3_vl import qwen3_contract_prompts, tiny_qwen3_vl
from tiny_gemma3 import GEMMA3_TOKENS_PER_IMAGE, gemma3_batch, gemma3_prompt, gemma3_prompts, tiny_gemma3
from tiny_llava_next import (
    next_batch, next_prompts, onevision_batch, onevision_prompts, tiny_llava_next, tiny_llava_onevision,
)

LAYER = 2  # K: layers 0..1 see every token, layers 2..3 (of 4) the kept ones
KEEP_RATIO = 0.25  # chosen so DeCo's pooled grids exist for every tiny family's images and frames
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
NEW_TOKENS = 3  # greedy steps of generate(): one prefill, two cached decode steps
# fp32 tolerances: equal up to summation order (different kernel shapes / batch padding); the exact cases use
# torch.equal instead.
ATOL_REORDER = 1e-5
ATOL_BATCH = 1e-4


# --- the model families --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A tiny random-weight model of one supported class and prompts for it.

    Attributes
    ----------
    build
        attn implementation -> a fresh model in eval mode (same weights for every call).
    prompts
        Three prompt specs: two with different visual inputs (and lengths), one text-only.
    batch
        Specs -> left-padded model inputs (a spec gets the same pixels alone and in a batch).
    accounting
        Fixed-resolution samples for the analytic accounting: (spec, visual items, tokens per item). Empty for
        dynamic-resolution families, whose cache lengths are checked against the report's counts only.
    """

    build: Callable[[str], nn.Module]
    prompts: Callable[[], list[dict[str, Any]]]
    batch: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    accounting: Callable[[], list[tuple[dict[str, Any], int, int]]] = field(default=lambda: [])


def _llava_prompts() -> list[dict[str, Any]]:
    return [llava_prompt(1, 5, 7, seed=1), llava_prompt(2, 3, 4, seed=2), llava_prompt(0, 9, 6, seed=3)]


def _qwen_prompts() -> list[dict[str, Any]]:
    # 16 image tokens / 12 image + 16 video tokens (2 frames of 2 x 4) / text only. Long enough that the compressed
    # sequences (31 and 27 tokens) exceed the 24-token sliding window of layers >= 1.
    return [qwen_prompt([qwen_item("image", 1, 8, 8, seed=1)], 4, 20, seed=1),
            qwen_prompt([qwen_item("image", 1, 4, 12, seed=2), qwen_item("video", 2, 4, 8, seed=3)], 2, 12, seed=2),
            qwen_prompt([], 6, 4, seed=3)]


def _video_llava_prompts() -> list[dict[str, Any]]:
    # A video (4 frames x 17 tokens) / an image (16) and a video / text only.
    return [video_llava_prompt(0, 1, seed=1), video_llava_prompt(1, 1, seed=3), video_llava_prompt(0, 0, seed=4)]


FAMILIES: dict[str, Family] = {
    "LlavaForConditionalGeneration": Family(
        build=lambda attn: tiny_llava(seed=0, attn_implementation=attn),
        prompts=_llava_prompts,
        batch=llava_batch,
        accounting=lambda: [(llava_prompt(2, 3, 4, seed=2), 2, TOKENS_PER_IMAGE)],
    ),
    "Qwen2VLForConditionalGeneration": Family(
        build=lambda attn: tiny_qwen("qwen2_vl", attn=attn), prompts=_qwen_prompts, batch=qwen_batch,
    ),
    "Qwen2_5_VLForConditionalGeneration": Family(
        build=lambda attn: tiny_qwen("qwen2_5_vl", attn=attn), prompts=_qwen_prompts, batch=qwen_batch,
    ),
    "VideoLlavaForConditionalGeneration": Family(
        build=lambda attn: tiny_video_llava(attn=attn),
        prompts=_video_llava_prompts,
        batch=video_llava_batch,
        # Fixed resolution: an image is 16 tokens, a video 4 frames of 17 (each frame keeps its CLS token).
        accounting=lambda: [(video_llava_prompt(1, 0, seed=2), 1, VIDEO_LLAVA_PATCHES),
                            (video_llava_prompt(0, 1, seed=1), VIDEO_LLAVA_FRAMES, VIDEO_LLAVA_PATCHES + 1)],
    ),
    # Tiles + thumbnail, pixel-shuffled: every tile is a fixed 4 x 4 grid of LLM tokens (tests/tiny_internvl.py).
    "InternVLForConditionalGeneration": Family(
        build=lambda attn: tiny_internvl(attn=attn), prompts=internvl_prompts, batch=internvl_batch,
        accounting=internvl_accounting,
    ),
    # Image splitting with row/column markers between the tiles, zero-padded image batches (tests/tiny_idefics3.py).
    "Idefics3ForConditionalGeneration": Family(
        build=lambda attn: tiny_idefics3("idefics3", attn=attn), prompts=lambda: idefics3_prompts("idefics3"),
        batch=idefics3_batch, accounting=lambda: idefics3_accounting("idefics3"),
    ),
    "SmolVLMForConditionalGeneration": Family(
        build=lambda attn: tiny_idefics3("smolvlm", attn=attn), prompts=lambda: idefics3_prompts("smolvlm"),
        batch=idefics3_batch, accounting=lambda: idefics3_accounting("smolvlm"),
    ),
    # Per-head q/k norms, interleaved mRoPE, DeepStack after layers 0-2 (so after K), one run per video frame
    # (tests/tiny_qwen3_vl.py).
    "Qwen3VLForConditionalGeneration": Family(
        build=lambda attn: tiny_qwen3_vl(attn=attn), prompts=qwen3_contract_prompts, batch=qwen_batch,
    ),
    # Sliding/full layers with their own RoPE bases, 8-token window, q/k norms, projector avg-pool
    # (tests/tiny_gemma3.py); token_type_ids make each image's tokens bidirectional, which check_oracle's mask
    # reproduces (_image_blocks).
    "Gemma3ForConditionalGeneration": Family(
        build=lambda attn: tiny_gemma3(attn=attn), prompts=gemma3_prompts,
        batch=gemma3_batch,
        accounting=lambda: [(gemma3_prompt(2, 3, 4, seed=2), 2, GEMMA3_TOKENS_PER_IMAGE)],
    ),
    # Any resolution: base grid + unpadded tile mosaic with a row-end token per row, pixels padded along the tile
    # axis, inputs from the real LlavaNextProcessor (tests/tiny_llava_next.py).
    "LlavaNextForConditionalGeneration": Family(
        build=lambda attn: tiny_llava_next(attn=attn), prompts=next_prompts, batch=next_batch,
    ),
    # The same images, a multi-image sample (no tiles: base + row end) and a video (2 x 2 frames + one row end).
    "LlavaOnevisionForConditionalGeneration": Family(
        build=lambda attn: tiny_llava_onevision(attn=attn), prompts=onevision_prompts, batch=onevision_batch,
    ),
}


def family(model_class: str) -> Family:
    """The tiny builder of a registered model class; fails (never skips) when there is none."""
    if model_class not in FAMILIES:
        pytest.fail(
            f"{model_class} is registered (divico.available_models()) but tests/contract_cases.py has no tiny "
            "random-weight builder for it: add one to FAMILIES (builder in tests/tiny_models.py) so the contract "
            "matrix covers it."
        )
    return FAMILIES[model_class]


@functools.lru_cache(maxsize=None)
def pristine(model_class: str, attn: str) -> nn.Module:
    """The unmodified model of a family, built once per process; checks never compress or change it."""
    model = family(model_class).build(attn)
    assert type(model).__name__ == model_class, f"the builder for {model_class} built {type(model).__name__}"
    return model


def fresh(model_class: str, attn: str) -> nn.Module:
    """A deep copy of the pristine model that a check may compress, train or change freely."""
    return copy.deepcopy(pristine(model_class, attn))


def batch_of(model_class: str, which: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Left-padded inputs for the family's prompts at indices ``which``."""
    fam = family(model_class)
    prompts = fam.prompts()
    return fam.batch([prompts[i] for i in which])


VISUAL_PAIR = (0, 1)  # two prompts with different visual inputs
MIXED = (0, 1, 2)  # the pair plus a text-only prompt


@functools.lru_cache(maxsize=None)
def _reference(model_class: str, attn: str, which: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and greedy tokens of the unmodified model (computed once per process)."""
    model = pristine(model_class, attn)
    inputs = batch_of(model_class, which)
    with torch.no_grad():
        return model(**inputs).logits, model.generate(**inputs, **generation_kwargs(model))


def generation_kwargs(model: nn.Module) -> dict[str, Any]:
    """Greedy decoding that never emits a visual placeholder (it would be read as an image when the prompt plus
    the generated tokens is run again) nor an end-of-sequence token (every step yields logits)."""
    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    suppress = sorted({*range(FIRST_SPECIAL_ID, VOCAB_SIZE), *(i for i in eos_ids if i < VOCAB_SIZE)})
    return dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, suppress_tokens=suppress)


# --- configs -------------------------------------------------------------------------------------------------
def compress_config(method: str, **overrides: Any) -> divico.CompressionConfig:
    """The matrix's compressing config for any registered method."""
    return divico.CompressionConfig(**{"method": method, "keep_ratio": KEEP_RATIO, "layer": LAYER, **overrides})


def keep_all_config(method: str, **overrides: Any) -> divico.CompressionConfig:
    return compress_config(method, **{**overrides, "keep_ratio": 1.0})


def adapter_class(model_class: str) -> type:
    """The registered adapter class serving ``model_class``."""
    (cls,) = [cls for cls in adapter_classes() if model_class in cls.model_classes]
    return cls


def supports(method: str, model_class: str) -> bool:
    """The family's adapter provides what the method requires (its ``required_capabilities``); for the other pairs
    the matrix checks that ``apply_compression`` refuses them with an error naming the missing capability."""
    return get_method_class(method).required_capabilities <= adapter_class(model_class).capabilities


def is_layer_level(method: str) -> bool:
    return get_method_class(method).level == "layer"


def scores_apply(method: str) -> bool:
    """The engine computes attention scores for this method (layer-level with ``needs_scores``)."""
    cls = get_method_class(method)
    return cls.level == "layer" and bool(cls.needs_scores)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run on one intra-op thread, then restore the setting.

    The tiny models gain nothing from a second thread, and on a busy 2-core machine two OpenMP threads spin against
    other processes (measured 10x slower per check).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- helpers -------------------------------------------------------------------------------------------------
def _cache(output: Any) -> Any:
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def _cache_lengths(cache: Any, num_layers: int) -> list[int]:
    return [int(cache.get_seq_length(i)) for i in range(num_layers)]


def _visual(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return divico.registry.get_adapter(model).visual_token_mask(input_ids, None)


def _keep_mask(visual: torch.Tensor, kept_positions: torch.Tensor) -> torch.Tensor:
    """(B, N) keep mask: every non-visual token plus the report's kept visual positions (-1 = padding)."""
    positions = torch.arange(visual.shape[1])
    kept = torch.stack([torch.isin(positions, row[row >= 0]) for row in kept_positions]) if kept_positions.numel() \
        else torch.zeros_like(visual)
    return ~visual | (visual & kept)


def _stages(report: Any) -> list[dict[str, Any]]:
    """Each compression stage of a report: ``layer``, ``kept_positions``, ``num_kept``, ``seq_len_after``.

    One entry (the report's own fields) for single-stage methods; a schedule's stages from ``extra["stages"]``
    (PyramidDrop), the last of which is the report's final kept set.
    """
    if "stages" in report.extra:
        return list(report.extra["stages"])
    return [{"layer": report.layer, "kept_positions": report.kept_positions, "num_kept": report.num_kept,
             "seq_len_after": report.seq_len_after}]


def _layer_lengths(stages: list[dict[str, Any]], length: int, num_layers: int) -> list[int]:
    """Sequence length each layer sees in a prefill: ``length`` before the first stage, then each stage's."""
    lengths = [length] * num_layers
    for stage in stages:
        for idx in range(int(stage["layer"]), num_layers):
            lengths[idx] = int(stage["seq_len_after"])
    return lengths


def _extend(inputs: dict[str, torch.Tensor], new_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prompt followed by ``new_ids`` (B, T) as text: ids, mask and per-token type ids extended."""
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], new_ids], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new_ids)], dim=1)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in inputs:
            out[key] = torch.cat([inputs[key], torch.zeros_like(new_ids, dtype=inputs[key].dtype)], dim=1)
    return out


def _force_selection(runtime: Any, keep: torch.Tensor | list[torch.Tensor]) -> None:
    """Make the next prefill keep exactly ``keep`` (its scores would differ on a longer prompt): one (B, N) mask,
    or one per stage of a schedule, each in original positions."""
    keeps = keep if isinstance(keep, list) else [keep]

    def forced(scores: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor, stage: int = 0,
               **_: Any) -> torch.Tensor:
        if stage == 0:
            return keeps[0]
        positions = runtime.stage_input_positions  # the slots of the sequence this boundary selects from
        return ~visual | (visual & keeps[stage].gather(1, positions.clamp(min=0)))

    runtime.method.select = forced


def hook_snapshot(model: nn.Module) -> dict[str, tuple]:
    """Every hook, instance attribute name and child of every module: what apply/remove may change."""
    snapshot = {}
    for name, module in model.named_modules():
        snapshot[name] = (
            dict(module._forward_pre_hooks), dict(module._forward_hooks),
            dict(module._forward_pre_hooks_with_kwargs), dict(module._forward_hooks_with_kwargs),
            set(module._forward_hooks_always_called), dict(module._backward_hooks),
            sorted(vars(module)), sorted(module._modules),
        )
    return snapshot


def _last_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1]


# --- the checks ----------------------------------------------------------------------------------------------
def check_keep_all(method: str, model_class: str, attn: str, **options: Any) -> None:
    """keep_ratio=1.0 (with a freshly built compressor) is the unmodified model: bit-identical logits and greedy
    tokens, for a padded batch and for a single sample."""
    model = fresh(model_class, attn)
    divico.apply_compression(model, keep_all_config(method, **options))
    for which in (VISUAL_PAIR, (1,)):
        ref_logits, ref_tokens = _reference(model_class, attn, which)
        inputs = batch_of(model_class, which)
        with torch.no_grad():
            logits = model(**inputs).logits
            report = divico.last_report(model)
            tokens = model.generate(**inputs, **generation_kwargs(model))
        assert torch.equal(logits, ref_logits), f"keep-all logits differ by {(logits - ref_logits).abs().max()}"
        assert torch.equal(tokens, ref_tokens)
        assert report.seq_len_after == report.seq_len_before
        assert torch.equal(report.num_kept, report.num_visual)


@functools.lru_cache(maxsize=None)
def _eager_last_token_attention(model_class: str, layer: int = LAYER) -> torch.Tensor:
    """(B, N) eager attention of the last prompt token at layer ``layer - 1`` (K-1), mean over heads, of the
    unmodified model."""
    inputs = batch_of(model_class, MIXED)
    with torch.no_grad():
        attentions = pristine(model_class, "eager")(**inputs, output_attentions=True).attentions
    return attentions[layer - 1][:, :, -1, :].mean(dim=1)


def check_scores(method: str, model_class: str, attn: str, **options: Any) -> None:
    """The report's scores are eager ``output_attentions`` of the last prompt token at layer K-1, mean over heads
    (NaN past each sample's visual tokens); a method using the base ``select`` keeps the top-k by them."""
    inputs = batch_of(model_class, MIXED)
    model = fresh(model_class, attn)
    divico.apply_compression(model, compress_config(method, **options))
    # The first boundary's layer: K, or a schedule's first stage boundary (its scores are the report's).
    expected = _eager_last_token_attention(model_class, divico.get_runtime(model).layer)
    with torch.no_grad():
        model(**inputs)
    report = divico.last_report(model)
    visual = _visual(model, inputs["input_ids"])
    assert report.num_visual.tolist() == visual.sum(1).tolist()
    uses_top_k = type(divico.get_runtime(model).method).select is CompressionMethod.select
    for row in range(inputs["input_ids"].shape[0]):
        count = int(report.num_visual[row])
        positions = report.visual_positions[row, :count]
        torch.testing.assert_close(report.scores[row, :count], expected[row, positions], atol=ATOL_REORDER, rtol=0)
        assert torch.isnan(report.scores[row, count:]).all()
        if uses_top_k:
            k = int(report.num_kept[row])
            # Ties (e.g. zeros outside a sliding window) go to the earlier position, as in top_k_keep_mask.
            order = torch.sort(report.scores[row, :count], descending=True, stable=True).indices
            top = positions[order[:k]].sort().values
            assert torch.equal(report.kept_positions[row, :k], top)


def check_cache_lengths(method: str, model_class: str, attn: str, **options: Any) -> None:
    """After a prefill, layers < K hold N cache entries and layers >= K the compressed length (input-level
    methods: every layer), equal to the report's counts and, at fixed resolution, to the method's own accounting
    (``kept_visual_tokens`` and ``tokens_per_layer``)."""
    model = fresh(model_class, attn)
    divico.apply_compression(model, compress_config(method, **options))
    runtime = divico.get_runtime(model)
    num_layers = runtime.adapter.num_layers()
    first = runtime.method.first_compressed_layer
    schedule = runtime.method.compression_layers(num_layers)
    # One layer K = LAYER for single-stage methods; a schedule (PyramidDrop) starts at its own first boundary.
    assert first == schedule[0] == (0 if not is_layer_level(method) else LAYER if len(schedule) == 1 else first)
    assert runtime.layers == schedule
    inputs = batch_of(model_class, VISUAL_PAIR)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    report = divico.last_report(model)
    assert report.layer == first
    assert bool((report.num_kept < report.num_visual).all()), "the matrix config must actually compress"
    stages = _stages(report)
    assert [int(stage["layer"]) for stage in stages] == schedule
    for stage in stages:
        # Left padding stays: the batch shrinks by the fewest visual tokens any sample loses (at every stage).
        assert int(stage["seq_len_after"]) == length - int((report.num_visual - stage["num_kept"]).min())
    assert torch.equal(stages[-1]["num_kept"], report.num_kept)
    short = int(stages[-1]["seq_len_after"])
    assert (report.seq_len_before, report.seq_len_after) == (length, short)
    assert _cache_lengths(_cache(out), num_layers) == _layer_lengths(stages, length, num_layers)
    # Layer-level methods scatter the final states back: logits line up with input_ids.
    assert out.logits.shape[1] == (length if is_layer_level(method) else short)
    for spec, items, tokens_per_item in family(model_class).accounting():
        one = family(model_class).batch([spec])
        n = one["input_ids"].shape[1]
        with torch.no_grad():
            out = model(**one, use_cache=True)
        report = divico.last_report(model)
        kept = runtime.method.kept_visual_tokens(items, tokens_per_item)
        assert report.num_visual.tolist() == [items * tokens_per_item]
        assert report.num_kept.tolist() == [kept]
        expected = runtime.method.tokens_per_layer(num_layers, n, items * tokens_per_item, kept)
        assert _cache_lengths(_cache(out), num_layers) == expected


def check_cached_decode(method: str, model_class: str, attn: str, **options: Any) -> None:
    """generate() with the cache equals, at every decode step, an uncached forward over the prompt plus the tokens
    so far with the prefill's kept set; the cache grows by one entry per step in every layer."""
    model = fresh(model_class, attn)
    divico.apply_compression(model, compress_config(method, **options))
    randomize_compressor(model)
    runtime = divico.get_runtime(model)
    num_layers = runtime.adapter.num_layers()
    inputs = batch_of(model_class, MIXED)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, **generation_kwargs(model), output_logits=True, return_dict_in_generate=True)
    report = divico.last_report(model)
    stages = _stages(report)
    prefill = _layer_lengths(stages, length, num_layers)
    assert _cache_lengths(_cache(out), num_layers) == [n + NEW_TOKENS - 1 for n in prefill]
    assert len(out.logits) == NEW_TOKENS
    visual = _visual(model, inputs["input_ids"])
    keeps = [_keep_mask(visual, stage["kept_positions"]) for stage in stages]
    for step in range(1, NEW_TOKENS):
        new_ids = out.sequences[:, length:length + step]
        extended = _extend(inputs, new_ids)
        if is_layer_level(method):
            _force_selection(runtime, [torch.cat([keep, torch.ones_like(new_ids, dtype=torch.bool)], dim=1)
                                       for keep in keeps])
        with torch.no_grad():
            uncached = model(**extended, use_cache=False).logits[:, -1]
        torch.testing.assert_close(out.logits[step], uncached, atol=ATOL_REORDER, rtol=0,
                                   msg=lambda m, s=step: f"decode step {s}: {m}")
        if is_layer_level(method):
            # The forced selection is the prefill's: the uncached run kept the same visual tokens.
            assert torch.equal(divico.last_report(model).kept_positions, report.kept_positions)


def check_batch_equals_singles(method: str, model_class: str, attn: str, **options: Any) -> None:
    """A left-padded batch (two different visual prompts and a text-only one) gives each sample the greedy tokens
    and the per-step logits (prefill and cached decode) of that sample alone."""
    model = fresh(model_class, attn)
    divico.apply_compression(model, compress_config(method, **options))
    randomize_compressor(model)
    inputs = batch_of(model_class, MIXED)
    gen = dict(generation_kwargs(model), output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        batched = model.generate(**inputs, **gen)
        batch_report = divico.last_report(model)
        for row in MIXED:
            one = batch_of(model_class, (row,))
            single = model.generate(**one, **gen)
            if int(batch_report.num_visual[row]):  # a text-only prompt is passed through and leaves no report
                assert divico.last_report(model).num_kept.tolist() == [int(batch_report.num_kept[row])]
            assert torch.equal(batched.sequences[row, inputs["input_ids"].shape[1]:],
                               single.sequences[0, one["input_ids"].shape[1]:]), f"sample {row}: other tokens"
            for step in range(NEW_TOKENS):
                torch.testing.assert_close(batched.logits[step][row], single.logits[step][0], atol=ATOL_BATCH, rtol=0,
                                           msg=lambda m, r=row, s=step: f"sample {r}, step {s}: {m}")


def _add_lora(model: nn.Module, seed: int) -> None:
    """LoRA on q/v with dropout (active in train mode) and non-zero B, so it changes the logits."""
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=lora_target_regex(model, ["q_proj", "v_proj"]))
    inject_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)


def check_save_load(method: str, model_class: str, attn: str, tmp_path: Path, **options: Any) -> None:
    """save_compressor then load_compressor on a fresh copy of the base gives bit-identical logits.

    The saved model has a randomised compressor state and LoRA with dropout 0.5: a compressor or LoRA layer left in
    train mode by the load (sampling, dropout) gives other logits.
    """
    inputs = batch_of(model_class, MIXED)
    trained = fresh(model_class, attn)
    _add_lora(trained, seed=3)
    divico.apply_compression(trained, compress_config(method, **options))
    randomize_compressor(trained, seed=7)
    with torch.no_grad():
        expected = trained(**inputs).logits
    divico.save_compressor(trained, tmp_path / "saved")
    loaded = fresh(model_class, attn)
    with torch.no_grad():
        base_logits = loaded(**inputs).logits
    divico.load_compressor(loaded, tmp_path / "saved")
    assert divico.compression_config(loaded) == divico.compression_config(trained)
    assert not loaded.training
    with torch.no_grad():
        got = loaded(**inputs).logits
        again = loaded(**inputs).logits
    assert got.shape == expected.shape and torch.equal(got, expected), "loaded logits differ from the saved model's"
    assert torch.equal(again, got)
    # Not vacuous: the saved parts change the model.
    assert base_logits.shape != got.shape or not torch.equal(base_logits, got)


def check_remove_restores(method: str, model_class: str, attn: str, **options: Any) -> None:
    """remove_compression leaves the model bit-identical (logits, tokens, hooks, attributes, state keys); so does
    leaving a ``with divico.compressed(...)`` block, normally or by an exception."""
    model = fresh(model_class, attn)
    inputs = batch_of(model_class, MIXED)
    before, tokens_before = _reference(model_class, attn, MIXED)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)  # a fresh copy is the pristine model
    hooks_before = hook_snapshot(model)
    state_before = set(model.state_dict())

    def assert_restored(generate: bool = False) -> None:
        assert divico.get_runtime(model) is None
        assert hook_snapshot(model) == hooks_before
        assert set(model.state_dict()) == state_before
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, before)
            if generate:
                assert torch.equal(model.generate(**inputs, **generation_kwargs(model)), tokens_before)

    def assert_compressing() -> None:
        assert hook_snapshot(model) != hooks_before
        with torch.no_grad():
            changed = model(**inputs).logits
        assert not torch.equal(_last_logits(changed), _last_logits(before))

    divico.apply_compression(model, compress_config(method, **options))
    assert_compressing()
    divico.remove_compression(model)
    assert_restored(generate=True)
    with pytest.raises(ValueError, match="no divico compression"):
        divico.last_report(model)
    with divico.compressed(model, compress_config(method, **options)) as inside:
        assert inside is model
        assert_compressing()
    assert_restored()
    with pytest.raises(RuntimeError, match="raised inside the block"):
        with divico.compressed(model, compress_config(method, **options)):
            assert_compressing()
            raise RuntimeError("raised inside the block")
    assert_restored()


def _hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) id of each image token's run of image tokens (1, 2, ... per sample), -1 for other tokens."""
    image = token_type_ids == 1
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    return torch.where(image, starts.long().cumsum(dim=1), -1)


def _oracle_mask(keep: torch.Tensor, attention_mask: torch.Tensor, window: int | None,
                 dtype: torch.dtype, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, N, N) additive mask: causal, no padding keys, no removed keys; a sliding window counts kept tokens.

    The engine's layers >= K run on the compressed sequence, so a sliding window spans the last ``window`` *kept*
    tokens; the oracle keeps every position and measures the window the same way. ``blocks``
    (:func:`_image_blocks`, from ``token_type_ids``) also lets the tokens of one image see each other in both
    directions, as Gemma 3 does.
    """
    length = keep.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None].expand(keep.shape[0], -1, -1)
    if blocks is not None:
        allowed = allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    allowed = allowed & (keep & attention_mask.bool())[:, None, :]
    if window is not None:
        rank = keep.long().cumsum(dim=1)  # slot of each kept token in the compressed sequence (up to a shift)
        allowed &= (rank[:, :, None] - rank[:, None, :]) < window
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def check_oracle(method: str, model_class: str, attn: str, **options: Any) -> None:
    """Layer-level methods: the compressed model equals the *unmodified* model in which layers >= K cannot see the
    removed visual tokens (attention mask; positions unchanged) and layer K's input carries the method's change of
    the kept rows (DiViCo's gap; zero for a pure selection). For a schedule (PyramidDrop) each stage's layers
    cannot see the tokens removed up to that stage.

    Also: text rows enter layer K unchanged, the base ``compress`` changes nothing, and a randomised compressor
    changes kept visual rows (so the gap path is exercised).
    """
    inputs = batch_of(model_class, MIXED)
    model = fresh(model_class, attn)
    divico.apply_compression(model, compress_config(method, **options))
    randomize_compressor(model)
    runtime = divico.get_runtime(model)
    layers = runtime.adapter.decoder_layers()
    first = runtime.layer  # K, or a schedule's first boundary
    captured: dict[str, torch.Tensor] = {}

    def before_engine(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured["original"] = _hidden(args, kwargs).detach().clone()

    def after_engine(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        captured["compressed"] = _hidden(args, kwargs).detach().clone()

    handles = [layers[first].register_forward_pre_hook(before_engine, with_kwargs=True, prepend=True),
               layers[first].register_forward_pre_hook(after_engine, with_kwargs=True)]
    try:
        with torch.no_grad():
            compressed = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    report = divico.last_report(model)
    has_compressor = runtime.compressor is not None
    uses_base_compress = type(runtime.method).compress is CompressionMethod.compress
    window = {idx: runtime.adapter.sliding_window(idx) for idx in range(first, len(layers))}
    divico.remove_compression(model)

    visual = _visual(model, inputs["input_ids"])
    stages = _stages(report)
    stage_keeps = [_keep_mask(visual, stage["kept_positions"]) for stage in stages]
    keep_of_layer = {idx: keep for stage, keep in zip(stages, stage_keeps)
                     for idx in range(int(stage["layer"]), len(layers))}  # later stages overwrite earlier ones
    keep = stage_keeps[-1]
    assert bool((~keep).any()), "the matrix config must remove visual tokens"
    selection = TokenSelection.from_keep_mask(stage_keeps[0], visual)
    original = captured["original"]
    delta = captured["compressed"] - selection.gather(original, seq_dim=1, fill=0.0)  # (B, M, d)
    assert torch.equal(delta[~selection.kept_visual], torch.zeros_like(delta[~selection.kept_visual])), \
        "compress changed a text row or a padding slot"
    if uses_base_compress:
        assert torch.equal(delta, torch.zeros_like(delta))
    if has_compressor:
        assert bool((delta[selection.kept_visual].abs().amax(dim=-1) > 0).any()), "the compressor changed nothing"
    gap = selection.scatter_back(delta, torch.zeros_like(original))  # (B, N, d), zero outside kept visual rows

    blocks = _image_blocks(inputs["token_type_ids"]) if "token_type_ids" in inputs else None

    def oracle_hook(idx: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        hidden = _hidden(args, kwargs)
        kwargs = {**kwargs, "attention_mask": _oracle_mask(keep_of_layer[idx], inputs["attention_mask"], window[idx],
                                                           hidden.dtype, blocks)}
        if idx == first:
            hidden = hidden + gap.to(hidden.dtype)
        return _with_hidden(args, kwargs, hidden)

    handles = [layers[idx].register_forward_pre_hook(functools.partial(oracle_hook, idx), with_kwargs=True)
               for idx in range(first, len(layers))]
    try:
        with torch.no_grad():
            oracle = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    # Every kept real position (the last prompt token included) has the oracle's logits.
    rows = keep & inputs["attention_mask"].bool()
    torch.testing.assert_close(compressed[rows], oracle[rows], atol=ATOL_REORDER, rtol=0)
    torch.testing.assert_close(compressed[:, -1], oracle[:, -1], atol=ATOL_REORDER, rtol=0)


# Checks every (method, model class, attn) cell runs, in order; those gated by a predicate run only where it holds.
CELL_CHECKS: dict[str, tuple[Callable[..., None], Callable[[str], bool]]] = {
    "keep_all": (check_keep_all, lambda method: True),
    "scores": (check_scores, scores_apply),
    "cache_lengths": (check_cache_lengths, lambda method: True),
    "cached_decode": (check_cached_decode, lambda method: True),
    "batch_equals_singles": (check_batch_equals_singles, lambda method: True),
    "save_load": (check_save_load, lambda method: True),
    "remove_restores": (check_remove_restores, lambda method: True),
    "oracle": (check_oracle, is_layer_level),
}
