"""Every image benchmark, from tiny files in its official format, end to end through `divico eval`.

The loaders and scorers are checked against hand-computed official values in tests/test_benchmarks.py; here the
whole command runs on them with a tiny LLaVA (compressed with FastV): every question is answered once, the written
scores are the benchmark's scores of the written predictions, and a rerun answers nothing again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_official import FIXTURE_BENCHMARKS, FIXTURE_QUESTION_COUNTS, write_all_fixtures
from test_eval_runner import tiny_llava_processor
from tiny_models import tiny_llava

from divico.cli import main
from divico.evaluation.benchmark import get_benchmark


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_every_official_benchmark_runs_through_divico_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "model"
    tiny_llava().save_pretrained(model_dir)
    tiny_llava_processor().save_pretrained(model_dir)
    root = write_all_fixtures(tmp_path / "eval")
    out = tmp_path / "out"
    args = ["eval", "--model", str(model_dir), "--benchmark", *FIXTURE_BENCHMARKS, "--data-root", str(root),
            "--out", str(out), "--method", "fastv", "--keep-ratio", "0.5", "--max-new-tokens", "3", "--batch-size",
            "2", "--no-progress"]
    assert main(args) == 0
    written = {}
    for name in FIXTURE_BENCHMARKS:
        folder = out / name
        rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        benchmark = get_benchmark(name)(root)
        samples = benchmark.load()
        assert len(samples) == FIXTURE_QUESTION_COUNTS[name]
        # One answer per question, in the benchmark's order, with its own question_id and the raw output.
        assert [row["question_id"] for row in rows] == [s.question_id for s in samples], name
        assert all(isinstance(row["prediction"], str) for row in rows)
        predictions = {row["question_id"]: row["prediction"] for row in rows}
        scores = json.loads((folder / "scores.json").read_text())
        assert scores["scores"] == json.loads(json.dumps(benchmark.score(predictions, samples))), name
        assert scores["visual_tokens"]["kept"] < scores["visual_tokens"]["total"] or name == "scienceqa"
        written[name] = (folder / "predictions.jsonl").read_bytes()
    printed = capsys.readouterr().out
    assert all(name in printed for name in FIXTURE_BENCHMARKS)
    # Rerun: everything is answered already, so nothing is asked again and the files stay byte-identical.
    assert main(args) == 0
    for name in FIXTURE_BENCHMARKS:
        assert (out / name / "predictions.jsonl").read_bytes() == written[name], name
