"""Answer eval records with a model (compressed or not), score them with :mod:`divico.metrics`, and measure how
close a compressed model's answers stay to the uncompressed model's (label-free fidelity).

The runner (:func:`evaluate_benchmarks`) appends every answered batch to a JSONL file as soon as it is answered,
so an interrupted evaluation (an exception, a killed process) resumes where it stopped: a rerun answers only the
records that are not in the file, and a line cut short by a kill is dropped and answered again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from divico.metrics import score_benchmark
from PIL import Image
from tqdm.auto import tqdm

from divico_testbed.data import build_prompt, load_eval_records, training_target

__all__ = [
    "FIRST_TOKEN_TOP_K",
    "AnswerBatch",
    "EvaluationResult",
    "answer_agreement",
    "answer_records",
    "best_constant_scores",
    "chat_prompt",
    "evaluate_benchmarks",
    "first_token_kl",
    "first_token_reference",
    "iter_answer_batches",
    "read_answer_rows",
    "scoring_group_key",
    "select_slice",
]

#: Tokens of the uncompressed model's first-answer-token distribution kept as the reference of the fidelity KL
#: (:func:`first_token_kl`); the rest of its mass is one bucket.
FIRST_TOKEN_TOP_K = 128


def scoring_group_key(record: Mapping[str, Any]) -> str:
    """The scoring group of a record: records scored together are kept (and resampled) together.

    An MMBench circular group (its four rotations), an MME image (its yes/no pair), otherwise the question.
    """
    if record.get("benchmark") == "mmbench":
        return str(record.get("circular_group", record["id"]))
    if record.get("benchmark") == "mme":
        return str(record["image"])
    return str(record["id"])


def select_slice(records: Sequence[Mapping[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The records of the first ``limit`` scoring groups (:func:`scoring_group_key`), in file order.

    Raises
    ------
    ValueError
        If ``limit`` is not None and < 1.
    """
    if limit is None:
        return [dict(r) for r in records]
    if limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all records), got {limit}.")
    groups: set[str] = set()
    out = []
    for record in records:
        key = scoring_group_key(record)
        if key not in groups:
            if len(groups) == limit:
                continue
            groups.add(key)
        out.append(dict(record))
    return out


def chat_prompt(processor: Any, record: Mapping[str, Any]) -> str:
    """The chat-template text of one record: the user turn (image, then :func:`divico_testbed.data.build_prompt`)
    and the assistant's generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(record)}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@dataclass
class AnswerBatch:
    """One answered batch.

    Attributes
    ----------
    records
        The B records of the batch, in order.
    answers
        B decoded answers (special tokens removed, whitespace stripped).
    first_token_logprobs
        (B, V) float32 log-softmax of the first generated position's logits, or None when not asked for.
    """

    records: list[dict[str, Any]]
    answers: list[str]
    first_token_logprobs: torch.Tensor | None = None


@torch.no_grad()
def iter_answer_batches(
    model: torch.nn.Module,
    processor: Any,
    records: Sequence[Mapping[str, Any]],
    data_dir: str | Path,
    batch_size: int = 16,
    max_new_tokens: int = 10,
    first_token: bool = False,
    desc: str = "answering",
    show_progress: bool = True,
) -> Iterator[AnswerBatch]:
    """Greedy answers, batch by batch (left padding), optionally with the first answer token's distribution.

    The runner keeps its own generation loop rather than :func:`divico.evaluation.generation.generate_batch`
    because the fidelity KL needs the first position's logits, which ``generate`` returns here in the same call
    (``output_logits``), so no extra forward is run.

    Parameters
    ----------
    model
        A transformers LVLM, compressed with divico or not.
    processor
        Its processor (chat template, image processor, tokenizer).
    records
        Eval records with ``image`` (relative to ``data_dir``) and the fields :func:`divico_testbed.data.build_prompt`
        reads.
    data_dir
        Folder the records' image paths are relative to.
    batch_size, max_new_tokens
        Generation settings (each >= 1).
    first_token
        Also return the (B, V) log-softmax of the first generated position's logits.

    Yields
    ------
    AnswerBatch
        One per batch of at most ``batch_size`` records, in record order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    parameter = next(model.parameters())
    root = Path(data_dir)
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch", disable=not show_progress,
                      leave=False):
        chunk = [dict(r) for r in records[start:start + batch_size]]
        images = [Image.open(root / r["image"]).convert("RGB") for r in chunk]
        texts = [chat_prompt(processor, r) for r in chunk]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(parameter.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                                output_logits=first_token)
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1]:]
        answers = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        logprobs = None
        if first_token:
            logprobs = torch.log_softmax(output.logits[0].float(), dim=-1).cpu()
        yield AnswerBatch(chunk, answers, logprobs)


def answer_records(
    model: torch.nn.Module,
    processor: Any,
    records: Sequence[Mapping[str, Any]],
    data_dir: str | Path,
    batch_size: int = 16,
    max_new_tokens: int = 10,
    desc: str = "answering",
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers, one per record (:func:`iter_answer_batches` without the first-token distribution).

    Returns
    -------
    list[str]
        Decoded answers (special tokens removed, whitespace stripped), aligned with ``records``.
    """
    answers: list[str] = []
    for batch in iter_answer_batches(model, processor, records, data_dir, batch_size, max_new_tokens,
                                     desc=desc, show_progress=show_progress):
        answers += batch.answers
    return answers


def first_token_reference(logprobs: torch.Tensor, top_k: int = FIRST_TOKEN_TOP_K) -> dict[str, list[Any]]:
    """The reference of :func:`first_token_kl`: the ``top_k`` most likely tokens of one distribution.

    Parameters
    ----------
    logprobs
        (V,) log-probabilities of the first answer token (uncompressed model).
    top_k
        Tokens kept, 1 to V.

    Returns
    -------
    dict
        ``{"ids": [top_k token ids, most likely first], "logprobs": [their log-probabilities]}`` (JSON-ready).
    """
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be 1-D (V,), got shape {tuple(logprobs.shape)}.")
    if not 1 <= top_k <= logprobs.numel():
        raise ValueError(f"top_k must be in [1, {logprobs.numel()}], got {top_k}.")
    values, ids = torch.topk(logprobs.float(), top_k)
    return {"ids": ids.tolist(), "logprobs": values.tolist()}


def _log_rest(logprobs: torch.Tensor) -> float:
    """log(1 - sum(exp(logprobs))): the log-mass outside a token set; -inf when the set holds all of it."""
    rest = 1.0 - float(torch.exp(logprobs.double()).sum())
    return math.log(rest) if rest > 0 else -math.inf


def first_token_kl(reference: Mapping[str, Sequence[Any]], logprobs: torch.Tensor) -> float:
    """KL(p || q) of the uncompressed model's first-answer-token distribution p to another one q, in nats.

    Both distributions are taken over the reference's tokens (:func:`first_token_reference`) plus one bucket for
    all other tokens: exactly the KL of the two distributions coarsened to those ``k + 1`` outcomes, a lower bound
    of the full KL that equals it up to the reference's mass outside its top-k.

    Parameters
    ----------
    reference
        ``{"ids", "logprobs"}`` of p.
    logprobs
        (V,) log-probabilities of q.

    Returns
    -------
    float
        The KL, >= 0.
    """
    ids = torch.as_tensor(list(reference["ids"]), dtype=torch.long)
    log_p = torch.as_tensor(list(reference["logprobs"]), dtype=torch.float64)
    log_q = logprobs.double()[ids]
    kl = float((torch.exp(log_p) * (log_p - log_q)).sum())
    log_p_rest, log_q_rest = _log_rest(log_p), _log_rest(log_q)
    if log_p_rest > -math.inf:
        # q's rest can round to 0 in float32 where p's is not: bound it by the smallest positive double.
        kl += math.exp(log_p_rest) * (log_p_rest - max(log_q_rest, math.log(5e-324)))
    return max(kl, 0.0)


def answer_agreement(predictions: Mapping[str, str], reference: Mapping[str, str]) -> float:
    """Share of answers (in percent) equal, as stripped text, to the reference model's answer to the same record.

    Raises
    ------
    ValueError
        If ``predictions`` is empty or holds a record id that ``reference`` lacks.
    """
    if not predictions:
        raise ValueError("predictions is empty; nothing to compare")
    missing = [key for key in predictions if key not in reference]
    if missing:
        raise ValueError(f"{len(missing)} records have no reference answer, e.g. ids {missing[:5]}")
    same = sum(predictions[key].strip() == reference[key].strip() for key in predictions)
    return 100.0 * same / len(predictions)


def read_answer_rows(path: str | Path) -> dict[str, dict[str, Any]]:
    """The rows of a runner's JSONL file, keyed by record id, repairing the end a killed process left.

    A last line without its newline (a write cut short) is removed from the file, so appending continues on a
    clean line; a malformed line elsewhere is an error.

    Raises
    ------
    ValueError
        If a line other than an unterminated last one is not a JSON object with ``id`` and ``prediction``.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data):
        with path.open("r+b") as handle:
            handle.truncate(complete_end)
    rows: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(data[:complete_end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not valid JSON ({error}); delete the file to start over") from error
        if not isinstance(row, dict) or "id" not in row or "prediction" not in row:
            raise ValueError(f"{path}:{number} must be an object with 'id' and 'prediction', got {line[:80]!r}")
        rows[str(row["id"])] = row
    return rows


@dataclass
class EvaluationResult:
    """What :func:`evaluate_benchmarks` returns.

    Attributes
    ----------
    scores
        ``benchmark -> score dict`` of :func:`divico.metrics.score_benchmark`.
    records
        ``benchmark -> the evaluated records``, in file order.
    predictions
        ``benchmark -> {record id: answer}``.
    first_token
        ``record id -> {"ids", "logprobs"}`` (:func:`first_token_reference`), when asked for.
    first_token_kl
        ``record id -> KL to the reference`` (:func:`first_token_kl`), when a reference was given.
    """

    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    predictions: dict[str, dict[str, str]] = field(default_factory=dict)
    first_token: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    first_token_kl: dict[str, float] = field(default_factory=dict)

    def all_predictions(self) -> dict[str, str]:
        """``record id -> answer`` over every benchmark."""
        return {key: value for per_benchmark in self.predictions.values() for key, value in per_benchmark.items()}


def evaluate_benchmarks(
    model: torch.nn.Module,
    processor: Any,
    data_dir: str | Path,
    benchmarks: Sequence[str],
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 10,
    results_path: str | Path | None = None,
    show_progress: bool = True,
    first_token_top_k: int = 0,
    reference: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
) -> EvaluationResult:
    """Answer and score ``model`` on several mini-benchmarks, resumably.

    With ``results_path`` (a JSONL file), every answered batch is appended as soon as it is answered (one row per
    record: ``id``, ``prediction``, and ``first_token`` / ``first_token_kl`` when asked for), and a rerun answers
    only the records whose row is missing or lacks a field this call asks for.

    Parameters
    ----------
    first_token_top_k
        If > 0, keep the top-k of each record's first-answer-token distribution (the uncompressed model's run:
        the reference of the other runs' KL).
    reference
        ``record id -> {"ids", "logprobs"}`` of the uncompressed model: compute each record's
        :func:`first_token_kl` to it (a record without a reference is an error).

    Returns
    -------
    EvaluationResult
        Scores, records, predictions and the first-token data asked for.
    """
    if first_token_top_k < 0:
        raise ValueError(f"first_token_top_k must be >= 0, got {first_token_top_k}.")
    path = Path(results_path) if results_path is not None else None
    done = read_answer_rows(path) if path is not None else {}
    needed = {"prediction"} | ({"first_token"} if first_token_top_k else set()) \
        | ({"first_token_kl"} if reference is not None else set())
    result = EvaluationResult()
    for benchmark in benchmarks:
        records = select_slice(load_eval_records(data_dir, benchmark, split), limit)
        if reference is not None:
            missing = [r["id"] for r in records if r["id"] not in reference]
            if missing:
                raise ValueError(f"no first-token reference for {len(missing)} {benchmark} records, "
                                 f"e.g. {missing[:3]}; run the uncompressed model first")
        todo = [r for r in records if not needed <= done.get(r["id"], {}).keys()]
        for batch in iter_answer_batches(model, processor, todo, data_dir, batch_size, max_new_tokens,
                                         first_token=bool(first_token_top_k) or reference is not None,
                                         desc=benchmark, show_progress=show_progress):
            rows = []
            for index, (record, answer) in enumerate(zip(batch.records, batch.answers, strict=True)):
                row: dict[str, Any] = {"id": record["id"], "prediction": answer}
                if batch.first_token_logprobs is not None and first_token_top_k:
                    row["first_token"] = first_token_reference(batch.first_token_logprobs[index], first_token_top_k)
                if batch.first_token_logprobs is not None and reference is not None:
                    row["first_token_kl"] = first_token_kl(reference[record["id"]], batch.first_token_logprobs[index])
                rows.append(row)
                done[record["id"]] = row
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as handle:
                    handle.write("".join(json.dumps(row) + "\n" for row in rows))
        predictions = {r["id"]: done[r["id"]]["prediction"] for r in records}
        result.records[benchmark] = records
        result.predictions[benchmark] = predictions
        result.scores[benchmark] = score_benchmark(benchmark, predictions, records)
        for r in records:
            if first_token_top_k:
                result.first_token[r["id"]] = done[r["id"]]["first_token"]
            if reference is not None:
                result.first_token_kl[r["id"]] = float(done[r["id"]]["first_token_kl"])
    return result


def best_constant_scores(
    data_dir: str | Path, benchmarks: Sequence[str], split: str = "test", limit: int | None = None,
) -> dict[str, dict[str, Any]]:
    """The chance reference: the best score any single constant answer gets on each benchmark slice.

    Every distinct training target (:func:`divico_testbed.data.training_target`) and, for vqav2, every distinct
    reference answer of the slice is tried as the answer to all of its questions ("yes" on POPE gives F1 66.7 when
    positives are half; on MMBench, answered by option text, the most frequent correct option text, which
    circular evaluation credits wherever it is right in every rotation).

    Returns
    -------
    dict
        ``benchmark -> {"score": best score, "answer": the constant that reaches it}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for benchmark in benchmarks:
        records = select_slice(load_eval_records(data_dir, benchmark, split), limit)
        candidates = sorted({training_target(r) for r in records}
                            | {answer for r in records for answer in r.get("answers", ())})
        best: dict[str, Any] | None = None
        for answer in candidates:
            score = score_benchmark(benchmark, [answer] * len(records), records)["score"]
            if best is None or score > best["score"]:
                best = {"score": float(score), "answer": answer}
        if best is None:
            raise ValueError(f"no {split} records for {benchmark!r} in {data_dir}")
        out[benchmark] = best
    return out
