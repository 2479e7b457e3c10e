"""lmms-eval model plugin: ``--model divico`` evaluates any supported model, compressed or not, on lmms-eval's tasks.

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (``pyproject.toml`` points it at
:data:`MODEL_MANIFEST`), so installing divico next to lmms-eval is enough: no fork, no environment variable.

    python -m lmms_eval --model divico \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=divico,keep_ratio=0.111,layer=2,compressor=DIR \\
        --tasks textvqa_val,pope --batch_size 8 --output_path results/

``model_args`` (see :class:`DivicoLMM`): ``pretrained`` (anything :func:`divico.models.load_model_and_processor`
takes: a hub id, a local folder or a registered name such as ``default``), the compression (``method``,
``keep_ratio`` | ``keep_tokens``, ``layer`` and any other :class:`divico.CompressionConfig` field, and/or
``compressor=DIR`` saved by :func:`divico.save_compressor`; none of them evaluates the uncompressed model),
``dtype``, ``max_new_tokens`` (used when a task does not set it), ``num_frames`` (video tasks). ``--batch_size`` and
``--device`` are lmms-eval's own options.

Generation goes through :func:`divico.evaluation.generation.generate_batch` (chat template with the visual input
first, left padding, greedy), so lmms-eval and ``divico eval`` answer the same prompt identically.

This module is loaded only by lmms-eval (it imports lmms-eval at its top); ``import divico`` never imports it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

from divico.api import apply_compression
from divico.checkpoint import load_compressor, saved_compression_config
from divico.config import CompressionConfig
from divico.evaluation.generation import build_chat_text, generate_batch, processor_takes_videos
from divico.models import load_model_and_processor
from divico.registry import available_methods
from divico.video import VIDEO_SUFFIXES, read_video_frames

__all__ = [
    "COMPRESSION_ARGS",
    "DTYPES",
    "MODEL_ID",
    "MODEL_MANIFEST",
    "WRAP_LOGLIKELIHOOD_PAIRS",
    "DivicoLMM",
    "compression_config_from_args",
    "continuation_scores",
    "greedy_settings",
    "truncate_at_stop",
]

#: The name given to ``--model``.
MODEL_ID = "divico"
#: What the ``lmms_eval.models`` entry point hands lmms-eval's registry (which loads this module to read it).
MODEL_MANIFEST = ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.DivicoLMM")

#: lmms-eval 0.7.3's evaluator (and its main branch at 75571cf) passes every model response through
#: ``unwrap_generation_output``, which turns a loglikelihood ``(float, bool)`` pair into its string, so every
#: ``multiple_choice`` task fails ("too many values to unpack"). A ``GenerationResult``'s ``text`` passes unchanged:
#: wrap the pairs in one while the installed lmms-eval has that bug.
WRAP_LOGLIKELIHOOD_PAIRS = unwrap_generation_output((0.0, True))[0] != (0.0, True)

#: ``dtype=`` values of ``model_args``.
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
#: The CompressionConfig fields that ``model_args`` may set besides ``method`` (``extra`` is for methods' own code).
COMPRESSION_ARGS = tuple(field.name for field in dataclasses.fields(CompressionConfig) if field.name not in ("method",
                                                                                                              "extra"))


def compression_config_from_args(method: str | None, compressor: str | Path | None,
                                 options: dict[str, Any]) -> CompressionConfig | None:
    """The compression that ``model_args`` ask for, or None for the uncompressed model.

    Parameters
    ----------
    method
        A registered method name, or None (then taken from ``compressor``'s saved config).
    compressor
        A folder written by :func:`divico.save_compressor`, or None. Its saved config is the starting point;
        ``method`` and ``options`` override it (e.g. evaluate a trained compressor at another ``keep_ratio``).
    options
        Other :class:`divico.CompressionConfig` fields (``keep_ratio``, ``keep_tokens``, ``layer``, ...).

    Raises
    ------
    ValueError
        Compression options without ``method`` or ``compressor``, or values the config refuses.
    """
    if compressor is not None:
        settings = saved_compression_config(compressor, **({"method": method} if method else {}), **options).to_dict()
    else:
        settings = {**({"method": method} if method else {}), **options}
    if not settings:
        return None
    if settings.get("method") is None:
        raise ValueError(
            f"model_args {sorted(options)} set a compression but no method: add method=NAME "
            f"(one of {', '.join(available_methods())}) or compressor=DIR."
        )
    return CompressionConfig.from_dict(settings)


def greedy_settings(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> tuple[int, tuple[str, ...]]:
    """``(max_new_tokens, until)`` of an lmms-eval request's generation kwargs, which must ask for greedy decoding.

    Parameters
    ----------
    gen_kwargs
        The task's ``generation_kwargs`` (``until``: a string or a list of strings; ``max_new_tokens``;
        ``do_sample`` / ``temperature`` / ``num_beams`` / ``repetition_penalty``, which must leave decoding greedy).
        Other keys (``top_p``, model-specific ones such as ``image_aspect_ratio``) do not change greedy decoding.
    default_max_new_tokens
        Used when the task sets no ``max_new_tokens``.

    Raises
    ------
    ValueError
        Sampling, beam search or a repetition penalty is asked for (divico evaluates greedily, as LLaVA-1.5's
        scripts do), ``max_new_tokens`` is not an integer >= 1, or ``until`` is neither a string nor a list of them.
    """
    non_greedy = []
    if gen_kwargs.get("do_sample"):
        non_greedy.append(f"do_sample={gen_kwargs['do_sample']!r}")
    if float(gen_kwargs.get("temperature") or 0.0) > 0.0:  # lmms-eval's own HF models sample whenever it is > 0
        non_greedy.append(f"temperature={gen_kwargs['temperature']!r}")
    if int(gen_kwargs.get("num_beams") or 1) != 1:
        non_greedy.append(f"num_beams={gen_kwargs['num_beams']!r}")
    if float(gen_kwargs.get("repetition_penalty") or 1.0) != 1.0:
        non_greedy.append(f"repetition_penalty={gen_kwargs['repetition_penalty']!r}")
    if non_greedy:
        raise ValueError(
            f"The task asks for {', '.join(non_greedy)}; divico's lmms-eval model decodes greedily only. Run it "
            "greedily with --gen_kwargs do_sample=false,temperature=0,num_beams=1."
        )
    max_new_tokens = gen_kwargs.get("max_new_tokens", default_max_new_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}.")
    until = gen_kwargs.get("until")
    if until is None:
        stops: tuple[str, ...] = ()
    elif isinstance(until, str):
        stops = (until,)
    elif isinstance(until, (list, tuple)) and all(isinstance(stop, str) for stop in until):
        stops = tuple(until)
    else:
        raise ValueError(f"until must be a string or a list of strings, got {until!r}.")
    return max_new_tokens, tuple(stop for stop in stops if stop)


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """``text`` up to (without) the earliest occurrence of any stop string, as lmms-eval's own models cut it."""
    cut = min((index for index in (text.find(stop) for stop in until) if index >= 0), default=len(text))
    return text[:cut]


def continuation_scores(logits: torch.Tensor, input_ids: torch.Tensor,
                        continuation_lengths: Sequence[int]) -> list[tuple[float, bool]]:
    """Mean negative log-likelihood of each row's continuation and whether greedy decoding would produce it.

    Parameters
    ----------
    logits
        (B, L, V) logits of a left-padded batch whose row b ends with its continuation's c_b tokens.
    input_ids
        (B, L) token ids.
    continuation_lengths
        B values c_b in [1, L - 1].

    Returns
    -------
    list[tuple[float, bool]]
        Per row: mean over the c_b continuation tokens of ``-log p(token | everything before it)`` (lmms-eval's
        convention: its HF models return this mean loss and its ``multiple_choice`` scoring takes the argmin), and
        True when every continuation token is the argmax of its logits.
    """
    length = input_ids.shape[1]
    scores = []
    for row, count in enumerate(continuation_lengths):
        if not 1 <= count <= length - 1:
            raise ValueError(f"continuation length must be in [1, {length - 1}] for a {length}-token row, got {count}.")
        row_logits = logits[row, length - count - 1: length - 1].float()  # (c, V): position t predicts token t + 1
        targets = input_ids[row, length - count:]  # (c,)
        log_probs = torch.log_softmax(row_logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        greedy = bool((row_logits.argmax(dim=-1) == targets).all())
        scores.append((float(-log_probs.mean()), greedy))
    return scores


class DivicoLMM(lmms):
    """lmms-eval model: a transformers LVLM loaded by divico, optionally compressed, with batched greedy generation
    and batched continuation scoring.

    Parameters
    ----------
    pretrained
        Hub id, local folder or registered name (e.g. ``default``), as :func:`divico.models.load_model_and_processor`.
    method
        Compression method (:func:`divico.available_methods`); None with no ``compressor`` evaluates the
        uncompressed model.
    compressor
        Folder of a saved compressor (:func:`divico.save_compressor`); its config is used unless overridden.
    dtype
        Parameter dtype: ``float32`` (default), ``bfloat16`` or ``float16`` (or fp32 / bf16 / fp16).
    max_new_tokens
        Generation budget for tasks whose ``generation_kwargs`` set none (1024, as lmms-eval's ``llava_hf``).
    num_frames
        Frames sampled uniformly from each video of video tasks.
    batch_size
        lmms-eval's ``--batch_size``: prompts per forward (an integer >= 1; ``auto`` is not supported).
    device
        lmms-eval's ``--device``; default ``cuda:<local rank>`` when CUDA is available, else ``cpu``.
    max_batch_size
        Only meaningful with ``--batch_size auto``, which is not supported: must stay unset.
    **compression_options
        Other :class:`divico.CompressionConfig` fields: ``keep_ratio``, ``keep_tokens``, ``layer``, ``encoder``, ...

    Raises
    ------
    TypeError
        An unknown ``model_args`` name (the message lists the valid ones).
    ValueError
        An invalid dtype, batch size or compression setting.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        compressor: str | None = None,
        dtype: str = "float32",
        max_new_tokens: int = 1024,
        num_frames: int = 8,
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        **compression_options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(compression_options) - set(COMPRESSION_ARGS))
        if unknown:
            valid = ["pretrained", "method", "compressor", "dtype", "max_new_tokens", "num_frames", *COMPRESSION_ARGS]
            raise TypeError(f"Unknown model_args {unknown} for --model {MODEL_ID}; valid names: {', '.join(valid)}.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
        self._batch_size = _positive_int("batch_size (--batch_size)", batch_size)
        if max_batch_size is not None:
            raise ValueError(f"max_batch_size={max_batch_size!r} only applies to --batch_size auto, which "
                             f"--model {MODEL_ID} does not support; give --batch_size N.")
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.num_frames = _positive_int("num_frames", num_frames)
        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        if device is None:
            device = f"cuda:{state.local_process_index}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.compression = compression_config_from_args(method, compressor, compression_options)
        model, self.processor = load_model_and_processor(str(pretrained), DTYPES[dtype])
        model.to(self._device)
        if self.compression is not None:
            apply_compression(model, self.compression)
        if compressor is not None:  # the config above starts from the saved one: differences are model_args' own
            load_compressor(model, compressor, override_config=True)
        self._model = model.eval()  # load_compressor may leave added LoRA modules in training mode
        self.pretrained = str(pretrained)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    # --- visual inputs of a request ---------------------------------------------------------------------------
    def _visuals(self, doc_to_visual: Callable[[dict], Any] | None, doc_id: int, task: str,
                 split: str) -> tuple[list[Image.Image], np.ndarray | None]:
        """(images, video frames or None) of one request's document, from the task's ``doc_to_visual``."""
        if doc_to_visual is None:
            return [], None
        return self._convert_visuals(doc_to_visual(self.task_dict[task][split][doc_id]), doc_id, task)

    def _convert_visuals(self, raw: Any, doc_id: int, task: str) -> tuple[list[Image.Image], np.ndarray | None]:
        """(images, video frames or None) from what a task's ``doc_to_visual`` (or a later round's ``doc_to_text``)
        gave: PIL images, image files and at most one video file."""
        items = [item for item in (raw if isinstance(raw, (list, tuple)) else [raw]) if item is not None]
        images: list[Image.Image] = []
        videos: list[str] = []
        for item in items:
            if isinstance(item, Image.Image):
                images.append(item.convert("RGB"))
            elif isinstance(item, (str, Path)) and str(item).lower().endswith(VIDEO_SUFFIXES):
                videos.append(str(item))
            elif isinstance(item, (str, Path)) and Path(item).is_file():
                with Image.open(item) as image:
                    images.append(image.convert("RGB"))
            else:
                raise ValueError(
                    f"Task {task!r} doc {doc_id}: doc_to_visual gave {type(item).__name__} {str(item)[:80]!r}; "
                    f"--model {MODEL_ID} takes PIL images, image files and video files ({', '.join(VIDEO_SUFFIXES)})."
                )
        if len(videos) > 1:
            raise ValueError(f"Task {task!r} doc {doc_id} has {len(videos)} videos; one video per prompt is supported.")
        return images, (read_video_frames(videos[0], self.num_frames) if videos else None)

    def _check_context(self, context: str, task: str, doc_id: int) -> None:
        image_token = getattr(self.processor, "image_token", None)
        if image_token and image_token in context:
            raise ValueError(
                f"Task {task!r} doc {doc_id}: the prompt already holds the image placeholder {image_token!r}; "
                f"--model {MODEL_ID} places the visual input before the text through the chat template. Use the "
                "task's default prompt (no model-specific image token)."
            )

    # --- lmms-eval API ----------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, in request order, batched ``--batch_size`` at a time among requests with equal settings.

        Each request's ``args`` are ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``; the answer
        is cut at the first ``until`` string and limited to ``max_new_tokens`` (see :func:`greedy_settings`).
        """
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        prepared = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            self._check_context(context, task, doc_id)
            max_new_tokens, until = greedy_settings(gen_kwargs, self.max_new_tokens)
            prepared.append((context, until, (doc_to_visual, doc_id, task, split)))
            groups.setdefault((max_new_tokens, until), []).append(index)
        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{MODEL_ID} generate_until")
        for (max_new_tokens, until), indices in groups.items():
            indices.sort(key=lambda i: -len(prepared[i][0]))  # similar lengths together: less padding
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                visuals = [self._visuals(*prepared[i][2]) for i in batch]
                videos = [video for _, video in visuals]
                outputs = generate_batch(
                    self._model, self.processor, [prepared[i][0] for i in batch], [images for images, _ in visuals],
                    videos if any(video is not None for video in videos) else None, max_new_tokens=max_new_tokens,
                )
                for i, output in zip(batch, outputs, strict=True):
                    answers[i] = truncate_at_stop(output, until)
                    self.cache_hook.add_partial("generate_until", (prepared[i][0], requests[i].args[1]), answers[i])
                progress.update(len(batch))
        progress.close()
        return [answer if answer is not None else "" for answer in answers]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool] | GenerationResult]:
        """Per request ``(mean negative log-likelihood of the continuation, is greedy)``, in request order (each pair
        inside a ``GenerationResult`` where the installed lmms-eval needs it: :data:`WRAP_LOGLIKELIHOOD_PAIRS`).

        ``args`` are ``(context, continuation, doc_to_visual, doc_id, task, split)`` (``continuation`` a string or a
        callable of the doc, as lmms-eval's ``loglikelihood`` tasks give it) or ``(context, continuation)`` without
        visuals. The continuation follows the chat template's generation prompt. Lower is better, as lmms-eval's
        ``multiple_choice`` scoring expects (see :func:`continuation_scores`).
        """
        prepared = []
        for request in requests:
            args = request.args
            if len(args) == 2:
                context, continuation = args
                visual_source = None
            else:
                context, continuation, doc_to_visual, doc_id, task, split = args
                visual_source = (doc_to_visual, doc_id, task, split)
                if callable(continuation):
                    continuation = continuation(self.task_dict[task][split][doc_id])
                self._check_context(context, task, doc_id)
            if not isinstance(continuation, str) or not continuation:
                raise ValueError(f"A loglikelihood continuation must be a non-empty string, got {continuation!r}.")
            prepared.append((context, continuation, visual_source))
        order = sorted(range(len(requests)), key=lambda i: -len(prepared[i][0]) - len(prepared[i][1]))
        scores: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{MODEL_ID} loglikelihood")
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            visuals = [self._visuals(*prepared[i][2]) if prepared[i][2] else ([], None) for i in batch]
            batch_scores = self._score_continuations(
                [prepared[i][0] for i in batch], [prepared[i][1] for i in batch], visuals,
            )
            for i, score in zip(batch, batch_scores, strict=True):
                scores[i] = score
            progress.update(len(batch))
        progress.close()
        pairs = [score for score in scores if score is not None]
        if WRAP_LOGLIKELIHOOD_PAIRS:
            return [GenerationResult(text=pair) for pair in pairs]  # type: ignore[arg-type]
        return pairs

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Greedy answers over several rounds per request (lmms-eval's ``generate_until_multi_round``), in request
        order: per request, the answer of every round.

        ``args`` are ``(context, generation_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``. Round 0 answers
        ``context`` about the document's visuals; each later round calls ``doc_to_text(doc, previous_output=answers
        so far, round_idx=r, previous_round_info=...)``, which returns ``(visuals, context, terminal, answers,
        round_info)``, until ``terminal`` is true (the protocol of lmms-eval's own multi-round models). Rounds depend
        on earlier answers, so each request runs on its own (batch 1).
        """
        results: list[list[str]] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{MODEL_ID} generate_until_multi_round")
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            max_new_tokens, until = greedy_settings(gen_kwargs, self.max_new_tokens)
            doc = self.task_dict[task][split][doc_id]
            images, video = self._visuals(doc_to_visual, doc_id, task, split)
            answers: list[str] = []
            round_info = None
            for round_idx in itertools.count():
                if round_idx > 0:
                    raw, context, terminal, answers, round_info = doc_to_text(
                        doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=round_info)
                    answers = list(answers)
                    if terminal:
                        break
                    images, video = self._convert_visuals(raw or [], doc_id, task)
                self._check_context(context, task, doc_id)
                output = generate_batch(self._model, self.processor, [context], [images],
                                        None if video is None else [video], max_new_tokens=max_new_tokens)[0]
                answers.append(truncate_at_stop(output, until))
            self.cache_hook.add_partial("generate_until_multi_round", (request.args[0], gen_kwargs), answers)
            results.append(answers)
            progress.update(1)
        progress.close()
        return results

    # --- scoring ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score_continuations(
        self, contexts: Sequence[str], continuations: Sequence[str],
        visuals: Sequence[tuple[list[Image.Image], np.ndarray | None]],
    ) -> list[tuple[float, bool]]:
        """One left-padded forward over ``chat(context) + continuation`` for every row, then
        :func:`continuation_scores`. ``labels`` mark the continuation, so a compression method scores the visual
        tokens from the last context token, as it does when generating."""
        has_video = [video is not None for _, video in visuals]
        if any(has_video) and not processor_takes_videos(self.processor):
            raise ValueError(f"{type(self.processor).__name__} has no video processor, so it cannot take videos.")
        prompts = [build_chat_text(self.processor, context, len(images), video)
                   for context, (images, _), video in zip(contexts, visuals, has_video, strict=True)]
        full_texts = [prompt + continuation for prompt, continuation in zip(prompts, continuations, strict=True)]
        tokenizer = self.processor.tokenizer
        # The visual placeholders expand equally in both texts, so unexpanded token counts give the continuation's.
        continuation_lengths = [len(full) - len(prompt) for full, prompt in zip(
            tokenizer(full_texts)["input_ids"], tokenizer(prompts)["input_ids"], strict=True)]
        for continuation, count in zip(continuations, continuation_lengths, strict=True):
            if count < 1:
                raise ValueError(f"The continuation {continuation!r} adds no token after the prompt.")
        kwargs: dict[str, Any] = {"text": full_texts, "padding": True, "return_tensors": "pt"}
        flat_images = [image for images, _ in visuals for image in images]
        if flat_images:
            kwargs["images"] = flat_images
        if any(has_video):
            kwargs["videos"] = [video for _, video in visuals if video is not None]
        previous_side = tokenizer.padding_side
        tokenizer.padding_side = "left"  # every row ends with its continuation
        try:
            inputs = self.processor(**kwargs)
        finally:
            tokenizer.padding_side = previous_side
        parameter = next(self._model.parameters())
        inputs = inputs.to(parameter.device)
        for key, value in inputs.items():
            if torch.is_tensor(value) and value.is_floating_point():
                inputs[key] = value.to(parameter.dtype)
        input_ids = inputs["input_ids"]
        labels = torch.full_like(input_ids, -100)
        for row, count in enumerate(continuation_lengths):
            labels[row, -count:] = input_ids[row, -count:]
        logits = self._model(**inputs, labels=labels).logits
        return continuation_scores(logits, input_ids, continuation_lengths)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value

