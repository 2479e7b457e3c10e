"""`divico analyze`: one sub-command per registered analysis with the common options; attention, kept and leakage
write PNG + JSON whose numbers are those of the Python functions; bad input exits with status 2 and a message."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_training import tiny_processor, write_color_data
from tiny_models import randomize_compressor, tiny_llava

import divico
from divico.analysis import available_analyses
from divico.analysis.attention import attention_analysis
from divico.analysis.common import load_samples
from divico.analysis.kept import default_configurations, kept_analysis
from divico.cli import build_parser, main

COMMON_OPTIONS = {"--model", "--dtype", "--device", "--merge", "--out", "--no-progress"}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    tiny_llava().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


def analyze_parsers() -> dict[str, argparse.ArgumentParser]:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (analyses,) = [a for a in commands.choices["analyze"]._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(analyses.choices)


def test_one_subcommand_per_registered_analysis_with_the_common_options() -> None:
    parsers = analyze_parsers()
    assert sorted(parsers) == available_analyses()
    assert {"attention", "kept", "leakage"} <= set(parsers)
    for name, parser in parsers.items():
        options = {s for action in parser._actions for s in action.option_strings}
        assert COMMON_OPTIONS <= options, name


def test_attention_command_writes_the_numbers_of_the_function(model_dir: Path, tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path, count=3)
    out = tmp_path / "out"
    code = main(["analyze", "attention", "--model", str(model_dir), "--data", str(data), "--image-folder",
                 str(images), "--layers", "0", "3", "--maps", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    assert (out / "attention_maps.png").stat().st_size > 0 and (out / "attention_concentration.png").stat().st_size
    written = json.loads((out / "attention.json").read_text())
    samples = load_samples(data=data, image_folder=images)
    expected = attention_analysis(tiny_llava(), tiny_processor(), samples, [0, 3], 2, show_progress=False)
    assert written["map_layers"] == [0, 3] and written["num_layers"] == 4 and written["num_prompts"] == 3
    np.testing.assert_allclose(np.array(written["maps"]["s1"]["3"]), expected.maps["s1"][3], atol=1e-7)
    assert written["curve"]["top_share"]["mean"] == pytest.approx(expected.curve["top_share"]["mean"], abs=1e-9)


def test_kept_command_with_a_trained_compressor(model_dir: Path, tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path, count=2)
    model = tiny_llava()
    with divico.compressed(model, divico.CompressionConfig("divico", keep_ratio=0.25)):
        randomize_compressor(model)
        divico.save_compressor(model, tmp_path / "divico")
    out = tmp_path / "out"
    code = main(["analyze", "kept", "--model", str(model_dir), "--data", str(data), "--image-folder", str(images),
                 "--configs", "fastv:0.25", f"trained=divico:0.25:{tmp_path / 'divico'}", "deco:16", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    assert (out / "kept_tokens.png").stat().st_size > 0
    written = json.loads((out / "kept.json").read_text())
    rows = written["per_sample"]["s0"]["configurations"]
    assert [r["configuration"] for r in rows] == ["fastv@0.25", "trained", "deco@16"]
    assert [len(r["kept_cells"]) for r in rows[:2]] == [16, 16] and rows[2]["pooled_grid"] == [4, 4]
    samples = load_samples(data=data, image_folder=images)
    fastv = kept_analysis(tiny_llava(), tiny_processor(), samples, default_configurations(0.25, 2)[:1],
                          show_progress=False)
    assert rows[0]["kept_cells"] == sorted(int(i) for i in fastv["s0"][0].kept.flatten().nonzero()[0])


def test_leakage_command_on_a_compressor(model_dir: Path, tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path, count=2)
    model = tiny_llava()
    with divico.compressed(model, divico.CompressionConfig("divico", keep_ratio=0.25)):
        randomize_compressor(model)
        divico.save_compressor(model, tmp_path / "divico")
    out = tmp_path / "out"
    assert main(["analyze", "leakage", "--model", str(model_dir), "--compressor", str(tmp_path / "divico"), "--data",
                 str(data), "--image-folder", str(images), "--out", str(out), "--no-progress"]) == 0
    written = json.loads((out / "leakage.json").read_text())
    assert (out / "leakage.png").stat().st_size > 0
    assert written["results"]["divico"]["rows"] == 2 * 16 and 0 < written["results"]["divico"]["gap"] < 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["attention"], "Give --data FILE or --image IMG"),
     (["attention", "--image", "x.png"], "--image needs --prompt"),
     (["attention", "--image", "missing.png", "--prompt", "what"], "No image file at missing.png"),
     (["leakage", "--compressor", "nowhere", "--image", "x.png", "--prompt", "what"], "nowhere")],
)
def test_bad_input_exits_with_status_2(argv: list[str], message: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["analyze", *argv, "--model", "unused", "--out", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err


def test_analyze_without_an_analysis_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze"]) == 2
    assert "ANALYSIS" in capsys.readouterr().err
