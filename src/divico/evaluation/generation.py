"""Batched greedy generation for evaluation, with prefill / decode latency measured without changing the outputs.

:func:`generate_batch` is the one generation loop of the evaluation package (the runner, ``divico generate`` and
the testbed call it): chat template with the visual content first and the text after it, left padding, greedy
decoding, pixel tensors in the model's dtype. It works for every supported family whose processor builds the
visual placeholders from the chat template (LLaVA, Qwen2-VL / Qwen2.5-VL, Video-LLaVA), with several images per
prompt and, where the processor has a video processor, one video (an array of frames) per prompt.

Timing: a pass-through :class:`transformers.LogitsProcessor` stamps the clock each time ``generate`` has logits of
a new position. The first stamp comes right after the prefill forward (time to first token), each later one after
a decode step, so the tokens generated are exactly those of a plain ``model.generate`` call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

__all__ = ["GenerationTimings", "build_chat_text", "generate_batch", "processor_takes_videos"]


@dataclass
class GenerationTimings:
    """Latency totals over the batches given to :func:`generate_batch` (add them with :meth:`merge`).

    Attributes
    ----------
    batches
        ``generate`` calls measured.
    prompts
        Prompts answered in them.
    prefill_seconds
        Sum over batches of the time to first token: preprocessing excluded, the vision encoder, the prefill
        forward (compression included) and the first token's selection included.
    decode_seconds
        Sum over batches of the time from the first token to the last one.
    decode_steps
        Sum over batches of the forward passes after the prefill (one per generated position after the first).
    generated_tokens
        New tokens of all prompts, each prompt counted up to and including its end-of-sequence token (the
        padding ``generate`` adds after a prompt has finished is not counted).
    """

    batches: int = 0
    prompts: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    generated_tokens: int = 0

    def record(self, *, prompts: int, prefill_seconds: float, decode_seconds: float, decode_steps: int,
               generated_tokens: int) -> None:
        """Add one measured ``generate`` call."""
        self.batches += 1
        self.prompts += prompts
        self.prefill_seconds += prefill_seconds
        self.decode_seconds += decode_seconds
        self.decode_steps += decode_steps
        self.generated_tokens += generated_tokens

    def merge(self, other: GenerationTimings) -> GenerationTimings:
        """The totals of ``self`` and ``other`` (e.g. the shards of a data-parallel run), as a new object."""
        return GenerationTimings(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    @property
    def prefill_ms_per_batch(self) -> float | None:
        """Mean time to first token per ``generate`` call, in ms (None before any call)."""
        return 1000.0 * self.prefill_seconds / self.batches if self.batches else None

    @property
    def decode_ms_per_token(self) -> float | None:
        """Mean time of one decode step (one new token for every prompt of the batch), in ms."""
        return 1000.0 * self.decode_seconds / self.decode_steps if self.decode_steps else None

    @property
    def tokens_per_second(self) -> float | None:
        """Generated tokens per second of generation (prefill + decode; preprocessing excluded)."""
        elapsed = self.prefill_seconds + self.decode_seconds
        return self.generated_tokens / elapsed if elapsed > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """The totals and the derived latencies (JSON-serialisable)."""
        return {**asdict(self), "prefill_ms_per_batch": self.prefill_ms_per_batch,
                "decode_ms_per_token": self.decode_ms_per_token, "tokens_per_second": self.tokens_per_second}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationTimings:
        """Inverse of :meth:`to_dict` (the derived values are recomputed)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


class _ClockStamps(LogitsProcessor):
    """Records ``time.perf_counter()`` each time generation scores a new position; returns the scores unchanged."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.is_cuda:  # kernels run asynchronously: wait for this step's logits to exist
            torch.cuda.synchronize(scores.device)
        self.stamps.append(time.perf_counter())
        return scores


def processor_takes_videos(processor: Any) -> bool:
    """True when ``processor`` has a video processor (Video-LLaVA, Qwen2-VL), i.e. accepts ``videos=``."""
    return getattr(processor, "video_processor", None) is not None


def build_chat_text(processor: Any, prompt: str, num_images: int, has_video: bool) -> str:
    """The chat-template text of one user turn (images, then the video, then ``prompt``) + the generation prompt.

    Raises
    ------
    ValueError
        If the processor has no chat template.
    """
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{type(processor).__name__} has no chat template; divico's evaluation formats prompts with "
                         "processor.apply_chat_template. Set processor.chat_template to the model's template.")
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    if has_video:
        content.append({"type": "video"})
    content.append({"type": "text", "text": prompt})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _tokens_until_eos(new_tokens: torch.Tensor, eos_ids: set[int]) -> int:
    """Generated tokens of (B, T) ``new_tokens``, each row counted up to and including its first EOS."""
    total = 0
    for row in new_tokens.tolist():
        end = next((i for i, token in enumerate(row) if token in eos_ids), None)
        total += len(row) if end is None else end + 1
    return total


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    videos: Sequence[np.ndarray | None] | None = None,
    *,
    max_new_tokens: int = 16,
    timings: GenerationTimings | None = None,
) -> list[str]:
    """Greedy answers to a batch of prompts, each with its own images (and video).

    Parameters
    ----------
    model
        A transformers LVLM (compressed with divico or not, or a peft model wrapping one).
    processor
        Its processor, with a chat template.
    prompts
        B user texts (shown after the visual input).
    images
        B sequences of RGB images (may be empty); prompt b shows ``images[b]`` in order.
    videos
        None, or B entries each None or a (T, H, W, 3) uint8 array of frames (needs a processor with a video
        processor: Video-LLaVA, Qwen2-VL).
    max_new_tokens
        Generation budget per prompt, >= 1.
    timings
        If given, this call's prefill / decode times and generated tokens are added to it.

    Returns
    -------
    list[str]
        B decoded answers (special tokens removed, whitespace stripped).

    Raises
    ------
    ValueError
        Mismatched lengths, ``max_new_tokens`` < 1, a video for a processor without a video processor, or a
        processor without a chat template.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    if len(images) != len(prompts):
        raise ValueError(f"images must hold one sequence per prompt: {len(prompts)} prompts, {len(images)} entries.")
    if videos is not None and len(videos) != len(prompts):
        raise ValueError(f"videos must hold one entry per prompt: {len(prompts)} prompts, {len(videos)} entries.")
    if not prompts:
        return []
    video_list = list(videos) if videos is not None else [None] * len(prompts)
    has_video = [video is not None for video in video_list]
    if any(has_video) and not processor_takes_videos(processor):
        raise ValueError(f"{type(processor).__name__} has no video processor, so it cannot take videos; use a video "
                         "model (e.g. Video-LLaVA, Qwen2-VL) for video benchmarks.")
    texts = [build_chat_text(processor, prompt, len(imgs), video)
             for prompt, imgs, video in zip(prompts, images, has_video, strict=True)]
    flat_images = [image for imgs in images for image in imgs]
    inputs_kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
    if flat_images:
        inputs_kwargs["images"] = flat_images
    if any(has_video):
        inputs_kwargs["videos"] = [video for video in video_list if video is not None]
    tokenizer = processor.tokenizer
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last column
    try:
        inputs = processor(**inputs_kwargs)
    finally:
        tokenizer.padding_side = previous_side
    parameter = next(model.parameters())
    inputs = inputs.to(parameter.device)
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            inputs[key] = value.to(parameter.dtype)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    clock = _ClockStamps()
    if parameter.is_cuda:
        torch.cuda.synchronize(parameter.device)
    started = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=pad_token_id, logits_processor=LogitsProcessorList([clock]))
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    if timings is not None and clock.stamps:
        timings.record(
            prompts=len(prompts), prefill_seconds=clock.stamps[0] - started,
            decode_seconds=clock.stamps[-1] - clock.stamps[0], decode_steps=len(clock.stamps) - 1,
            generated_tokens=_tokens_until_eos(new_tokens, _eos_ids(model, tokenizer)),
        )
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
