"""The evaluation runner on scripted answers: scores computed by hand, the fidelity figures by hand, and resume
after an exception, after a killed process and after a line cut short (nothing answered twice, nothing lost)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from runner_fakes import VOCAB, ScriptedModel, ScriptedProcessor, write_eval_data

from divico_testbed.data import build_prompt
from divico_testbed.evaluation import (
    answer_agreement,
    evaluate_benchmarks,
    first_token_kl,
    first_token_reference,
    read_answer_rows,
    select_slice,
)

HERE = Path(__file__).resolve().parent
GQA_ANSWERS = ["left", "right", "red", "circle", "above", "below", "star"]
# 3 annotators answered "2 circles", 7 "2".
VQA_REFERENCES = ["2 circles"] * 3 + ["2"] * 7


def _records() -> dict[str, list[dict]]:
    gqa = [{"id": f"gqa-{i}", "benchmark": "gqa", "image": "x.png", "question": f"Where {i}?", "answer": a}
           for i, a in enumerate(GQA_ANSWERS)]
    vqav2 = [{"id": f"vqav2-{i}", "benchmark": "vqav2", "image": "x.png", "question": f"How many {i}?",
              "answer": "2", "answers": VQA_REFERENCES, "category": "count"} for i in range(2)]
    pope = [{"id": f"pope-{i}", "benchmark": "pope", "image": "x.png", "question": f"Is there {i}?", "answer": a,
             "split_type": "random", "category": "random"} for i, a in enumerate(["yes", "yes", "no", "no"])]
    mme = [{"id": f"mme-{i}", "benchmark": "mme", "image": image, "question": f"Is it {i}?", "answer": a,
            "subtask": subtask, "category": subtask}
           for i, (image, a, subtask) in enumerate([("a.png", "yes", "existence"), ("a.png", "no", "existence"),
                                                    ("b.png", "yes", "count"), ("b.png", "no", "count")])]
    return {"gqa": gqa, "vqav2": vqav2, "pope": pope, "mme": mme}


# Hand-made answers: GQA 5 of 7 right; VQAv2 "two" (= "2" after normalisation) and "2 circles"; POPE yes/no/yes/no
# for labels yes/yes/no/no; MME image a both right, image b one right.
ANSWERS = {"gqa": GQA_ANSWERS[:5] + ["up", "circle"], "vqav2": ["two", "2 circles"],
           "pope": ["Yes", "No", "Yes", "No"], "mme": ["Yes", "No", "Yes", "Yes"]}


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    write_eval_data(tmp_path, _records())
    return tmp_path


def _script(records: dict[str, list[dict]], answers: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    prompts = [build_prompt(r) for b in records for r in records[b]]
    texts = [a for b in records for a in answers[b]]
    return prompts, texts


def _uniform_logits(n: int) -> torch.Tensor:
    return torch.zeros(n, VOCAB)


def test_scores_of_hand_made_answers(data: Path) -> None:
    records = _records()
    prompts, texts = _script(records, ANSWERS)
    model = ScriptedModel(_uniform_logits(len(prompts)))
    result = evaluate_benchmarks(model, ScriptedProcessor(prompts, texts), data, list(records), batch_size=3)
    assert result.scores["gqa"]["score"] == pytest.approx(100 * 5 / 7)
    # VQA accuracy: "two" matches the 7 "2"s (>= 3 in every leave-one-out subset): 1. "2 circles" matches 3: the 3
    # subsets without one of them hold 2 matches (2/3), the other 7 hold 3 (1): (3 * 2/3 + 7) / 10 = 0.9.
    assert result.scores["vqav2"]["score"] == pytest.approx(100 * (1.0 + 0.9) / 2)
    # POPE: TP 1, FN 1, FP 1, TN 1 -> precision = recall = 1/2 -> F1 50.
    assert result.scores["pope"]["score"] == pytest.approx(50.0)
    # MME: existence acc 100 + acc+ 100; count acc 50 + acc+ 0.
    assert result.scores["mme"]["score"] == pytest.approx(250.0)
    assert result.predictions["gqa"]["gqa-5"] == "up"  # the decoded text, stripped
    assert len(model.answered) == len(prompts)  # every record once
    assert [len(call) for call in model.calls[:3]] == [3, 3, 1]  # per benchmark, batches of at most 3


def test_first_token_kl_and_agreement_by_hand(data: Path) -> None:
    records = {"gqa": _records()["gqa"][:2]}
    p = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]
    q = [0.25, 0.25, 0.2, 0.1, 0.1, 0.1]
    prompts, _ = _script(records, ANSWERS)
    reference_model = ScriptedModel(torch.log(torch.tensor([p, p])))
    reference = evaluate_benchmarks(reference_model, ScriptedProcessor(prompts, ["left", "right"]), data, ["gqa"],
                                    limit=2, first_token_top_k=2)
    assert reference.first_token["gqa-0"]["ids"] == [0, 1]
    assert reference.first_token["gqa-0"]["logprobs"] == pytest.approx([math.log(0.5), math.log(0.2)])
    other = ScriptedModel(torch.log(torch.tensor([q, p])))
    result = evaluate_benchmarks(other, ScriptedProcessor(prompts, ["left", "up"]), data, ["gqa"],
                                 limit=2, reference=reference.first_token)
    # Over {token 0, token 1, the rest}: p = (0.5, 0.2, 0.3), q = (0.25, 0.25, 0.5).
    coarse = 0.5 * math.log(0.5 / 0.25) + 0.2 * math.log(0.2 / 0.25) + 0.3 * math.log(0.3 / 0.5)
    assert result.first_token_kl["gqa-0"] == pytest.approx(coarse, abs=1e-6)
    assert result.first_token_kl["gqa-1"] == pytest.approx(0.0, abs=1e-6)
    assert answer_agreement(result.predictions["gqa"], reference.predictions["gqa"]) == pytest.approx(50.0)
    # With every token kept the KL is the full one.
    full = first_token_reference(torch.log(torch.tensor(p)), top_k=VOCAB)
    exact = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert first_token_kl(full, torch.log(torch.tensor(q))) == pytest.approx(exact, abs=1e-6)
    with pytest.raises(ValueError, match="no first-token reference for 2 gqa records"):
        evaluate_benchmarks(other, ScriptedProcessor(prompts, ["a", "b"]), data, ["gqa"], limit=2,
                            reference={})
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 6\], got 7"):
        first_token_reference(torch.zeros(VOCAB), top_k=7)


def test_resume_after_an_exception_answers_only_the_rest(data: Path, tmp_path: Path) -> None:
    records = {"gqa": _records()["gqa"]}
    prompts, texts = _script(records, ANSWERS)
    path = tmp_path / "out" / "predictions.jsonl"
    failing = ScriptedModel(_uniform_logits(7), fail_at_call=3)
    with pytest.raises(RuntimeError, match="scripted failure"):
        evaluate_benchmarks(failing, ScriptedProcessor(prompts, texts), data, ["gqa"], batch_size=2,
                            results_path=path)
    assert sorted(read_answer_rows(path)) == ["gqa-0", "gqa-1", "gqa-2", "gqa-3"]  # two batches kept
    resumed = ScriptedModel(_uniform_logits(7))
    result = evaluate_benchmarks(resumed, ScriptedProcessor(prompts, texts), data, ["gqa"], batch_size=2,
                                 results_path=path)
    assert resumed.answered == [4, 5, 6]
    assert result.predictions["gqa"] == {f"gqa-{i}": a for i, a in enumerate(ANSWERS["gqa"])}
    assert result.scores["gqa"]["score"] == pytest.approx(100 * 5 / 7)
    assert len(path.read_text().splitlines()) == 7
    # A third run answers nothing; asking for a field the rows lack answers them again.
    again = ScriptedModel(_uniform_logits(7))
    evaluate_benchmarks(again, ScriptedProcessor(prompts, texts), data, ["gqa"], results_path=path)
    assert again.answered == []
    with_logits = ScriptedModel(_uniform_logits(7))
    result = evaluate_benchmarks(with_logits, ScriptedProcessor(prompts, texts), data, ["gqa"], results_path=path,
                                 first_token_top_k=1)
    assert with_logits.answered == list(range(7)) and set(result.first_token) == {f"gqa-{i}" for i in range(7)}


def test_resume_after_the_process_is_killed(data: Path, tmp_path: Path) -> None:
    records = {"gqa": _records()["gqa"]}
    prompts, texts = _script(records, ANSWERS)
    path = tmp_path / "predictions.jsonl"
    script = textwrap.dedent(f"""
        import torch
        from runner_fakes import ScriptedModel, ScriptedProcessor
        from divico_testbed.evaluation import evaluate_benchmarks
        model = ScriptedModel(torch.zeros(7, 6), kill_at_call=3)
        evaluate_benchmarks(model, ScriptedProcessor({prompts!r}, {texts!r}), {str(data)!r}, ["gqa"],
                            batch_size=2, results_path={str(path)!r}, show_progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    completed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == -9, completed.stderr
    assert sorted(read_answer_rows(path)) == ["gqa-0", "gqa-1", "gqa-2", "gqa-3"]
    # A kill in the middle of a write leaves a line without its end: it is dropped and its record answered again.
    with path.open("a") as handle:
        handle.write('{"id": "gqa-4", "predic')
    resumed = ScriptedModel(_uniform_logits(7))
    result = evaluate_benchmarks(resumed, ScriptedProcessor(prompts, texts), data, ["gqa"], batch_size=2,
                                 results_path=path)
    assert resumed.answered == [4, 5, 6]
    assert result.predictions["gqa"] == {f"gqa-{i}": a for i, a in enumerate(ANSWERS["gqa"])}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"gqa-{i}" for i in range(7)]


def test_a_broken_line_inside_the_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\n{broken\n{"id": "b", "prediction": "y"}\n')
    with pytest.raises(ValueError, match=r"predictions.jsonl:2 is not valid JSON"):
        read_answer_rows(path)


def test_select_slice_keeps_scoring_groups_whole() -> None:
    rows = [{"id": f"m{i}", "benchmark": "mme", "image": f"{i // 2}.png"} for i in range(6)]
    rows += [{"id": f"b{k}-r{r}", "benchmark": "mmbench", "circular_group": f"b{k}"} for k in range(2) for r in range(4)]
    assert [r["id"] for r in select_slice(rows, 2)] == ["m0", "m1", "m2", "m3"]
    assert [r["id"] for r in select_slice(rows[6:], 1)] == [f"b0-r{r}" for r in range(4)]
    with pytest.raises(ValueError, match="limit must be >= 1"):
        select_slice(rows, 0)
