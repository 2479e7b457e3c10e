"""Tests of divico.analysis.noise (Table II) and of the noise options of ``divico eval``: on the tiny LLaVA with the
official-format fixtures of POPE and TextVQA, sigma = 0 reproduces the clean predictions and scores exactly, the
drops are recomputed here from the runner's scores.json files, the files are written; the records benchmark keeps
scoring groups whole and scores as divico.metrics does; a resumed run with other noise is refused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures_official import write_benchmark_fixture
from PIL import Image
from test_eval_runner import tiny_llava_processor
from tiny_models import tiny_llava

from divico.analysis.noise import (
    RecordsBenchmark,
    format_noise_table,
    noise_robustness,
    relative_drop,
)
from divico.cli import build_parser, main
from divico.cli_options import add_noise_arguments, noise_from_args
from divico.config import CompressionConfig
from divico.evaluation.benchmark import get_benchmark
from divico.evaluation.runner import EvalConfiguration, configured, evaluate_benchmark
from divico.metrics import score_benchmark
from divico.perturbation import NoiseConfig


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    write_benchmark_fixture("pope", root)
    write_benchmark_fixture("textvqa", root)
    return root


PopeBenchmark, TextVQABenchmark = get_benchmark("pope"), get_benchmark("textvqa")


def predictions(folder: Path) -> dict[str, str]:
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    return {json.loads(line)["question_id"]: json.loads(line)["prediction"] for line in lines}


CONFIGURATIONS = [EvalConfiguration("Baseline"),
                  EvalConfiguration("FastV", compression=CompressionConfig("fastv", keep_ratio=0.25, layer=2))]


def test_sigma_zero_gives_the_clean_scores_exactly(tmp_path: Path, data_root: Path) -> None:
    benchmarks = [PopeBenchmark(data_root), TextVQABenchmark(data_root)]
    summary = noise_robustness(tiny_llava(), tiny_llava_processor(), CONFIGURATIONS, benchmarks, tmp_path,
                               noise=NoiseConfig(0.0, seed=3), batch_size=2, max_new_tokens=3, show_progress=False)
    for name in ("Baseline", "FastV"):
        for benchmark in ("pope", "textvqa"):
            clean = predictions(tmp_path / "runs" / name / benchmark)
            noisy = predictions(tmp_path / "runs" / f"{name}+noise" / benchmark)
            assert clean == noisy and len(clean) in (3, 6)
        assert summary["noisy_scores"][name] == summary["scores"][name]
        assert all(drop in (0.0, None) for drop in summary["relative_drop_percent"][name].values())
    for file in ("noise_table.md", "noise.json", "noise.png"):
        assert (tmp_path / file).stat().st_size > 0
    assert json.loads((tmp_path / "noise.json").read_text())["noise"] == {"sigma": 0.0, "kind": "features", "seed": 3}
    with Image.open(tmp_path / "noise.png") as image:
        assert image.size[0] > 300


def test_drops_are_recomputed_from_the_runner_files(tmp_path: Path, data_root: Path) -> None:
    benchmarks = [PopeBenchmark(data_root)]
    summary = noise_robustness(tiny_llava(), tiny_llava_processor(), CONFIGURATIONS, benchmarks, tmp_path,
                               noise=NoiseConfig(25.0, seed=1), batch_size=3, max_new_tokens=3, show_progress=False)
    changed = 0
    for name in ("Baseline", "FastV"):
        clean_file = json.loads((tmp_path / "runs" / name / "pope" / "scores.json").read_text())
        noisy_file = json.loads((tmp_path / "runs" / f"{name}+noise" / "pope" / "scores.json").read_text())
        assert noisy_file["config"]["noise"] == {"sigma": 25.0, "kind": "features", "seed": 1}
        assert clean_file["config"]["noise"] is None
        clean, noisy = clean_file["scores"]["score"], noisy_file["scores"]["score"]
        expected = None if clean == 0 else 100.0 * (clean - noisy) / clean
        assert summary["relative_drop_percent"][name]["pope"] == expected
        changed += predictions(tmp_path / "runs" / name / "pope") != predictions(tmp_path / "runs" / f"{name}+noise"
                                                                              / "pope")
    assert changed >= 1  # the noise acts on the answers


def test_relative_drop_and_the_table_on_constructed_scores() -> None:
    assert relative_drop(56.09, 55.67) == pytest.approx(0.7488, abs=1e-4)  # Table II: FastV TextVQA, 0.75%
    assert relative_drop(1668.36, 1512.9) == pytest.approx(9.318, abs=1e-3)  # FastV MME, 9.32%
    assert relative_drop(50.0, 55.0) == -10.0
    assert relative_drop(0.0, 3.0) is None and relative_drop(None, 3.0) is None
    summary = {"benchmarks": ["pope", "mme"], "configurations": ["FastV"],
               "scores": {"FastV": {"pope": 72.9, "mme": 1668.36}},
               "noisy_scores": {"FastV": {"pope": 70.7, "mme": 1512.9}},
               "relative_drop_percent": {"FastV": {"pope": relative_drop(72.9, 70.7), "mme": relative_drop(1668.36,
                                                                                                      1512.9)}},
               "mean_relative_drop_percent": {"FastV": (relative_drop(72.9, 70.7) + relative_drop(1668.36, 1512.9)) / 2},
               "noise": {"sigma": 1.0, "kind": "features", "seed": 0}, "questions": {"pope": 6, "mme": 8}}
    table = format_noise_table(summary)
    assert "| FastV | 72.90 | 1668.36 | |" in table
    assert "| FastV+noise | 70.70 (↓ 3.02%) | 1512.90 (↓ 9.32%) | 6.17% |" in table


def write_records(root: Path) -> None:
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "images" / "a.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(root / "images" / "b.png")
    pope = [{"id": f"p{i}", "benchmark": "pope", "image": f"images/{'ab'[i % 2]}.png",
             "question": "Is there a red square in the image?", "answer": "yes" if i % 2 == 0 else "no",
             "split_type": "random", "category": "random"} for i in range(4)]
    mmbench = [{"id": f"m{g}-{r}", "benchmark": "mmbench", "image": "images/a.png", "question": "What color?",
                "options": ["red", "blue"][r:] + ["red", "blue"][:r], "answer": "AB"[r], "circular_group": f"m{g}",
                "rotation": r} for g in range(3) for r in range(2)]
    for name, records in (("pope", pope), ("mmbench", mmbench)):
        (root / name).mkdir()
        (root / name / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_records_benchmark_keeps_groups_whole_and_scores_as_metrics(tmp_path: Path) -> None:
    write_records(tmp_path)
    mmbench = RecordsBenchmark(tmp_path, "mmbench", groups=2)
    samples = mmbench.load()
    assert [s.question_id for s in samples] == ["m0-0", "m0-1", "m1-0", "m1-1"]
    assert samples[1].prompt == "What color?\nA. blue\nB. red\nAnswer with the option's text from the given choices " \
                                "directly."
    assert samples[0].images == (tmp_path / "images" / "a.png",)
    answers = {"m0-0": "red", "m0-1": "red", "m1-0": "red", "m1-1": "blue"}
    expected = score_benchmark("mmbench", [answers[s.question_id] for s in samples], [s.reference for s in samples])
    assert mmbench.score(answers, samples) == expected
    assert expected["score"] == 50.0  # group m0 right in both rotations, m1 wrong in one
    pope = RecordsBenchmark(tmp_path, "pope")
    assert pope.load()[0].prompt == "Is there a red square in the image?\nAnswer the question using a single word or " \
                                    "phrase."
    with pytest.raises(ValueError, match="Unknown records benchmark 'coco'"):
        RecordsBenchmark(tmp_path, "coco")
    with pytest.raises(ValueError, match="groups must be an integer >= 1"):
        RecordsBenchmark(tmp_path, "pope", groups=0)


def test_records_benchmark_runs_through_the_analysis(tmp_path: Path) -> None:
    write_records(tmp_path / "records")
    benchmarks = [RecordsBenchmark(tmp_path / "records", "pope", groups=3)]
    summary = noise_robustness(tiny_llava(), tiny_llava_processor(), CONFIGURATIONS[:1], benchmarks, tmp_path / "out",
                               noise=NoiseConfig(0.0), batch_size=3, max_new_tokens=2, show_progress=False)
    assert summary["questions"] == {"pope": 3}
    assert summary["scores"]["Baseline"] == summary["noisy_scores"]["Baseline"]


def test_eval_records_the_noise_and_refuses_to_resume_with_other_noise(tmp_path: Path, data_root: Path) -> None:
    model, processor = tiny_llava(), tiny_llava_processor()
    benchmark = PopeBenchmark(data_root)
    first = EvalConfiguration("fastv", compression=CompressionConfig("fastv", keep_ratio=0.25, layer=2),
                              noise=NoiseConfig(0.5, "pixels", seed=2))
    with configured(model, first):
        evaluate_benchmark(model, processor, benchmark, tmp_path, limit=2, max_new_tokens=2, show_progress=False,
                           run_info=first.describe())
    saved = json.loads((tmp_path / "pope" / "run_config.json").read_text())
    assert saved["noise"] == {"sigma": 0.5, "kind": "pixels", "seed": 2}
    other = EvalConfiguration(first.name, compression=first.compression, noise=NoiseConfig(0.6, "pixels", seed=2))
    with configured(model, other), pytest.raises(ValueError, match="noise"):
        evaluate_benchmark(model, processor, benchmark, tmp_path, limit=2, max_new_tokens=2, show_progress=False,
                           run_info=other.describe())
    assert not hasattr(model, "_divico_noise_hooks")  # configured() took the hooks off


def test_eval_command_parses_the_noise_options() -> None:
    args = build_parser().parse_args(["eval", "--model", "m", "--benchmark", "pope", "--data-root", "d", "--out", "o",
                                      "--noise-sigma", "0.5", "--noise-kind", "pixels", "--noise-seed", "4"])
    assert noise_from_args(args) == NoiseConfig(0.5, "pixels", 4)
    parser = argparse.ArgumentParser()
    add_noise_arguments(parser)
    assert noise_from_args(parser.parse_args([])) is None
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0, got -1.0"):
        noise_from_args(parser.parse_args(["--noise-sigma", "-1"]))


def test_analyze_noise_command(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    tiny_llava().save_pretrained(model_dir)
    tiny_llava_processor().save_pretrained(model_dir)
    write_records(tmp_path / "records")
    out = tmp_path / "out"
    status = main(["analyze", "noise", "--model", str(model_dir), "--records", str(tmp_path / "records"),
                   "--benchmark", "pope", "--limit", "2", "--keep-ratio", "0.25", "--sigma", "0", "--max-new-tokens",
                   "2", "--out", str(out), "--no-progress"])
    assert status == 0
    summary = json.loads((out / "noise.json").read_text())
    assert summary["configurations"] == ["Baseline", "FastV"] and summary["questions"] == {"pope": 2}
    assert summary["noisy_scores"] == summary["scores"]
