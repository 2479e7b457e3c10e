"""Tests of the `divico eval` and `divico generate` command lines on a tiny LLaVA saved to tmp_path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_runner import (  # noqa: F401  (registered_color_bench is a fixture)
    ColorBench,
    registered_color_bench,
    tiny_llava_processor,
    write_images,
)
from tiny_models import tiny_llava

import divico
from divico.cli import build_parser, main
from divico.evaluation.benchmark import available_benchmarks
from divico.evaluation.generation import generate_batch


@pytest.fixture(autouse=True)
def one_thread() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    tiny_llava().save_pretrained(folder)
    tiny_llava_processor().save_pretrained(folder)
    return folder


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices[name]


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings if s.startswith("--") and s != "--help"}


def test_eval_parses_every_documented_option() -> None:
    names = available_benchmarks()[:2]
    argv = ["eval", "--model", "m", "--dtype", "bfloat16", "--device", "cpu", "--method", "fastv", "--encoder",
            "deterministic", "--keep-tokens", "64", "--layer", "3", "--compressor", "ckpt", "--benchmark", *names,
            "--data-root", "data", "--split", f"{names[0]}=val", "--out", "out", "--limit", "5", "--batch-size", "4",
            "--max-new-tokens", "8", "--compare", "baseline", "fastv:0.111", "--judge-url", "http://h/v1",
            "--judge-model", "judge", "--judge-key-env", "KEY", "--judge-local", "local", "--judge-workers", "2",
            "--no-progress", "--selector", "dart", "--noise-sigma", "0.5", "--noise-kind", "pixels", "--noise-seed", "3"]
    # Every option the parser documents is exercised here (a new option fails this until it is added).
    assert option_strings(subcommand_parser("eval")) - set(argv) == {"--keep-ratio"}
    args = build_parser().parse_args(argv)
    assert (args.model, args.dtype, args.device, args.method, args.encoder) == ("m", "bfloat16", "cpu", "fastv",
                                                                              "deterministic")
    assert (args.keep_tokens, args.keep_ratio, args.layer, args.compressor) == (64, None, 3, Path("ckpt"))
    assert args.benchmark == names and args.data_root == Path("data") and args.split == [f"{names[0]}=val"]
    assert (args.out, args.limit, args.batch_size, args.max_new_tokens) == (Path("out"), 5, 4, 8)
    assert args.compare == ["baseline", "fastv:0.111"]
    assert (args.judge_url, args.judge_model, args.judge_key_env, args.judge_local, args.judge_workers) == (
        "http://h/v1", "judge", "KEY", "local", 2)
    assert args.no_progress is True
    assert (args.selector, args.noise_sigma, args.noise_kind, args.noise_seed) == ("dart", 0.5, "pixels", 3)
    defaults = build_parser().parse_args(["eval", "--model", "m", "--benchmark", names[0], "--data-root", "d",
                                          "--out", "o", "--keep-ratio", "0.25"])
    assert (defaults.method, defaults.keep_ratio, defaults.batch_size, defaults.dtype) == (None, 0.25, 1, "float32")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--benchmark", "nonexistent", "--data-root", "d",
                                   "--out", "o"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--benchmark", names[0], "--data-root", "d", "--out", "o",
                                   "--keep-ratio", "0.1", "--keep-tokens", "4"])


def test_generate_parses_every_documented_option() -> None:
    argv = ["generate", "--model", "m", "--dtype", "float16", "--device", "cpu", "--method", "divico", "--encoder",
            "none", "--keep-ratio", "0.25", "--layer", "1", "--compressor", "ckpt", "--image", "a.png", "b.png",
            "--video", "v.mp4", "--num-frames", "4", "--prompt", "what", "--max-new-tokens", "5", "--compare", "--selector", "random"]
    assert option_strings(subcommand_parser("generate")) - set(argv) == {"--keep-tokens"}
    args = build_parser().parse_args(argv)
    assert args.image == [Path("a.png"), Path("b.png")] and args.video == Path("v.mp4") and args.num_frames == 4
    assert (args.method, args.encoder, args.keep_ratio, args.layer) == ("divico", "none", 0.25, 1)
    assert args.selector == "random"
    assert (args.prompt, args.max_new_tokens, args.compare, args.compressor) == ("what", 5, True, Path("ckpt"))


def test_train_keeps_its_compression_options() -> None:
    args = build_parser().parse_args(["train", "--model", "m", "--data", "d.json", "--output", "o"])
    assert (args.method, args.encoder, args.keep_ratio, args.keep_tokens, args.layer) == ("divico", "variational",
                                                                                          None, None, 2)
    assert "--compressor" not in option_strings(subcommand_parser("train"))


def test_generate_prints_answer_kept_tokens_and_prefill(tmp_path: Path, model_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_images(tmp_path / "images", 2)
    prompt = "what color is the shape"
    code = main(["generate", "--model", str(model_dir), "--image", str(paths[0]), str(paths[1]), "--prompt", prompt,
                 "--method", "fastv", "--keep-tokens", "16", "--max-new-tokens", "3", "--compare"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    images = [[Image.open(p).convert("RGB") for p in paths]]
    processor = tiny_llava_processor()
    plain = generate_batch(tiny_llava(), processor, [prompt], images, max_new_tokens=3)[0]
    with divico.compressed(tiny_llava(), divico.CompressionConfig("fastv", keep_tokens=16)) as model:
        compressed = generate_batch(model, processor, [prompt], images, max_new_tokens=3)[0]
    assert lines[0] == f"answer (fastv@16): {compressed}"
    assert lines[1] == "visual tokens: 16 kept of 128 (fastv, layer 2)"  # two 64-token images, one pool
    assert lines[2].startswith("prefill: ") and lines[2].endswith(" ms") and float(lines[2].split()[1]) > 0
    assert lines[3] == f"answer (uncompressed): {plain}"
    assert lines[4].startswith("prefill (uncompressed): ")


def test_generate_reports_bad_usage(tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = write_images(tmp_path / "images", 1)[0]
    assert main(["generate", "--model", str(model_dir), "--image", str(image), "--prompt", "what", "--compare"]) == 2
    assert "--compare needs a compression" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--image", str(tmp_path / "no.png"), "--prompt", "x"]) == 2
    assert "No image file at" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--image", str(image), "--prompt", "x", "--keep-ratio",
                 "0.5"]) == 2
    assert "need --method" in capsys.readouterr().err


def test_eval_cli_single_and_compare(tmp_path: Path, model_dir: Path, registered_color_bench: type[ColorBench],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    common = ["eval", "--model", str(model_dir), "--benchmark", "tiny_colors", "--data-root", str(tmp_path / "data"),
              "--limit", "3", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "single"), "--method", "fastv", "--keep-ratio", "0.25"]) == 0
    scores = json.loads((tmp_path / "single" / "tiny_colors" / "scores.json").read_text())
    assert scores["config"]["compression"]["keep_ratio"] == 0.25 and scores["config"]["model_name"] == str(model_dir)
    assert scores["config"]["configuration"] == "fastv@0.25" and scores["scores"]["n"] == 3
    printed = capsys.readouterr().out
    assert (tmp_path / "single" / "table.md").read_text().strip() in printed
    # Questions 0-2 show 64, 128 and 64 visual tokens; a quarter of each is kept.
    assert "| 75.0% | fastv@0.25 | 21.3/85.3 |" in printed

    assert main([*common, "--out", str(tmp_path / "cmp"), "--compare", "baseline", "fastv:0.25", "fastv:8"]) == 0
    for name in ("baseline", "fastv@0.25", "fastv@8"):
        assert len((tmp_path / "cmp" / name / "tiny_colors" / "predictions.jsonl").read_text().splitlines()) == 3
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "| - | baseline | all |" in table and "| keep 8 | fastv@8 | 8.0/85.3 |" in table
    assert table.strip() in capsys.readouterr().out

    assert main([*common, "--out", str(tmp_path / "x"), "--compare", "baseline", "--method", "fastv"]) == 2
    assert "--compare lists the configurations itself" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "x"), "--split", "pope=random"]) == 2
    assert "not among --benchmark" in capsys.readouterr().err
