"""Answer eval records with a model (compressed or not) and score them with :mod:`divico.metrics`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from divico.metrics import score_benchmark
from PIL import Image
from tqdm.auto import tqdm

from divico_testbed.data import build_prompt, load_eval_records, training_target


def _group_key(record: Mapping[str, Any]) -> str:
    # Records scored together must be kept together: MMBench rotations, MME's question pair per image.
    if record.get("benchmark") == "mmbench":
        return str(record.get("circular_group", record["id"]))
    if record.get("benchmark") == "mme":
        return str(record["image"])
    return str(record["id"])


def select_slice(records: Sequence[Mapping[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The records of the first ``limit`` scoring groups (question, MMBench circular group, MME image pair).

    Raises
    ------
    ValueError
        If ``limit`` is not None and < 1.
    """
    if limit is None:
        return [dict(r) for r in records]
    if limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all records), got {limit}.")
    groups: list[str] = []
    out = []
    for record in records:
        key = _group_key(record)
        if key not in groups:
            if len(groups) == limit:
                continue
            groups.append(key)
        out.append(dict(record))
    return out


def chat_prompt(processor: Any, record: Mapping[str, Any]) -> str:
    """The chat-template text of one record: the user turn (image, then :func:`divico_testbed.data.build_prompt`)
    and the assistant's generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(record)}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


@torch.no_grad()
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
    """Greedy answers, one per record, batched with left padding.

    Parameters
    ----------
    model
        A transformers LVLM, compressed with divico or not.
    processor
        Its processor (chat template, image processor, tokenizer).
    records
        Eval records with ``image`` (relative to ``data_dir``) and the fields :func:`divico_testbed.data.build_prompt` reads.
    data_dir
        Folder the records' image paths are relative to.
    batch_size, max_new_tokens
        Generation settings.

    Returns
    -------
    list[str]
        Decoded answers (special tokens removed, whitespace stripped).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    root = Path(data_dir)
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch", disable=not show_progress,
                      leave=False):
        chunk = records[start:start + batch_size]
        images = [Image.open(root / r["image"]).convert("RGB") for r in chunk]
        texts = [chat_prompt(processor, r) for r in chunk]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


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
) -> dict[str, dict[str, Any]]:
    """Score ``model`` on several mini-benchmarks.

    With ``results_path`` (a JSONL file), every answered record is appended as it is produced and a rerun
    skips the records already there, so an interrupted evaluation resumes.

    Returns
    -------
    dict
        ``benchmark -> score dict`` from :func:`divico.metrics.score_benchmark`.
    """
    done: dict[str, str] = {}
    path = Path(results_path) if results_path is not None else None
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["id"]] = row["prediction"]
    scores: dict[str, dict[str, Any]] = {}
    for benchmark in benchmarks:
        records = select_slice(load_eval_records(data_dir, benchmark, split), limit)
        todo = [r for r in records if r["id"] not in done]
        for start in range(0, len(todo), batch_size * 4):
            chunk = todo[start:start + batch_size * 4]
            predictions = answer_records(model, processor, chunk, data_dir, batch_size, max_new_tokens,
                                         desc=benchmark, show_progress=show_progress)
            for record, prediction in zip(chunk, predictions, strict=True):
                done[record["id"]] = prediction
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as handle:
                    for record, prediction in zip(chunk, predictions, strict=True):
                        handle.write(json.dumps({"id": record["id"], "prediction": prediction}) + "\n")
        scores[benchmark] = score_benchmark(benchmark, {r["id"]: done[r["id"]] for r in records}, records)
    return scores


def best_constant_scores(
    data_dir: str | Path, benchmarks: Sequence[str], split: str = "test", limit: int | None = None,
) -> dict[str, dict[str, Any]]:
    """The chance reference: the best score any single constant answer gets on each benchmark slice.

    Every distinct reference answer of the slice is tried as the answer to all of its questions ("yes" on
    POPE gives F1 66.7 when positives are half; on MMBench, answered by option text, the most frequent correct
    option text, which circular evaluation credits wherever it is right in every rotation).

    Returns
    -------
    dict
        ``benchmark -> {"score": best score, "answer": the constant that reaches it}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for benchmark in benchmarks:
        records = select_slice(load_eval_records(data_dir, benchmark, split), limit)
        candidates = sorted({training_target(r) for r in records})
        best: dict[str, Any] | None = None
        for answer in candidates:
            score = score_benchmark(benchmark, [answer] * len(records), records)["score"]
            if best is None or score > best["score"]:
                best = {"score": float(score), "answer": answer}
        if best is None:
            raise ValueError(f"no {split} records for {benchmark!r} in {data_dir}")
        out[benchmark] = best
    return out
