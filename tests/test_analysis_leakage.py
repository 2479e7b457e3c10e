"""IL (paper Eq. 16) on constructed vectors, the training callback that logs it, and the leakage analysis on a tiny
LLaVA: from a saved compressor and from a short training run (Python function and ``divico analyze leakage``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from test_training import config_for, tiny_processor, write_color_data
from tiny_models import randomize_compressor, tiny_llava
from transformers import TrainerCallback

import divico
from divico.analysis.common import load_samples
from divico.analysis.leakage import (
    LeakageSource,
    collect_gap_vectors,
    independent_reference,
    information_level,
    leakage_analysis,
    run_sources,
)
from divico.cli import main
from divico.evaluation.runner import EvalConfiguration
from divico.training import train
from divico.training.callbacks import INFORMATION_LEVEL_KEY, InformationLevelCallback


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Two orthogonal zero-mean columns: corr(x, z) = 0, corr(x, x) = 1, corr(x, x + z) = 4 / (2 * sqrt(8)) = 1/sqrt(2).
X = torch.tensor([1.0, -1.0, 1.0, -1.0])
Z = torch.tensor([1.0, 1.0, -1.0, -1.0])


def test_information_level_hand_computed() -> None:
    # d = 3 pairs: (x, z) 0, (x, x+z) 1/sqrt2, (z, x+z) 1/sqrt2 -> IL = 1 - 2/(3*2) * sqrt2 = 1 - sqrt2/3.
    assert information_level(torch.stack([X, Z, X + Z], dim=1)) == pytest.approx(1 - math.sqrt(2) / 3, abs=1e-12)
    # A duplicated dimension: pairs (x, x) 1, (x, z) 0, (x, z) 0 -> 1 - 1/3.
    assert information_level(torch.stack([X, X, Z], dim=1)) == pytest.approx(2 / 3, abs=1e-12)
    # Anti-correlation counts as much as correlation (|corr|), and scale / offset do not matter.
    assert information_level(torch.stack([X, -3 * X + 5], dim=1)) == pytest.approx(0.0, abs=1e-12)
    assert information_level(torch.stack([X, Z], dim=1)) == pytest.approx(1.0, abs=1e-12)


def test_information_level_independent_and_duplicated_random_dims() -> None:
    generator = torch.Generator().manual_seed(0)
    independent = torch.randn(20000, 6, generator=generator)
    assert information_level(independent) > 0.98  # E|corr| ~ sqrt(2 / (pi n)) = 0.006
    duplicated = torch.cat([independent[:, :3], independent[:, :3]], dim=1)  # 3 of 15 pairs correlate fully
    assert information_level(duplicated) == pytest.approx(1 - 3 / 15, abs=0.01)
    assert information_level(duplicated) < information_level(independent)


def test_independent_reference_is_the_expected_sample_correlation() -> None:
    # n = 4 independent normal pairs: r is uniform on [-1, 1] (density (1 - r^2)^0), E|r| = 1/2.
    assert independent_reference(4) == pytest.approx(0.5, abs=1e-12)
    # Large n: E|r| -> sqrt(2 / (pi n)); and a measured IL of independent dims lands near the reference.
    assert 1 - independent_reference(20000) == pytest.approx(math.sqrt(2 / (math.pi * 20000)), rel=1e-3)
    generator = torch.Generator().manual_seed(1)
    measured = [information_level(torch.randn(50, 40, generator=generator)) for _ in range(5)]
    assert sum(measured) / 5 == pytest.approx(independent_reference(50), abs=0.01)
    with pytest.raises(ValueError, match="rows must be >= 3, got 2"):
        independent_reference(2)


@pytest.mark.parametrize(
    ("vectors", "message"),
    [(torch.ones(4), r"2-D \(n, d\) tensor, got \(4,\)"), (torch.ones(1, 3), "n >= 2 vectors of d >= 2"),
     (torch.ones(5, 1), "n >= 2 vectors of d >= 2"), (torch.stack([X, torch.full((4,), 2.0)], 1), "1 of 2 dimensions"),
     (torch.stack([X, torch.tensor([1.0, float("nan"), 0.0, 0.0])], 1), "non-finite")],
)
def test_information_level_refuses_undefined_input(vectors: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        information_level(vectors)


def test_callback_needs_a_gap_encoder() -> None:
    with pytest.raises(TypeError, match="GapEncoder, got Linear"):
        InformationLevelCallback(torch.nn.Linear(2, 2))
    assert not InformationLevelCallback.applies_to(None)


class GapRecorder(TrainerCallback):
    """Records g_theta's training outputs per log window with its own hook (an independent copy of the rows)."""

    def __init__(self) -> None:
        self.window: list[torch.Tensor] = []
        self.levels: dict[int, float] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if module.training:
                self.window.append(output.detach().float().clone())

        model.divico_compressor.register_forward_hook(record)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and self.window:
            self.levels[state.global_step] = information_level(torch.cat(self.window))
            self.window = []


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, GapRecorder, Any]:
    root = tmp_path_factory.mktemp("leakage_run")
    data, images = write_color_data(root, count=8)
    config = config_for(root, data, images, max_steps=4, logging_steps=2, save_steps=2, save_total_limit=None)
    recorder = GapRecorder()
    torch.set_num_threads(1)
    result = train(tiny_llava(), tiny_processor(), config, callbacks=[recorder])
    return root, data, images, recorder, result


def test_training_logs_the_information_level_of_the_window(trained_run: Any) -> None:
    _, _, _, recorder, result = trained_run
    logged = {e["step"]: e[INFORMATION_LEVEL_KEY] for e in result.log_history if INFORMATION_LEVEL_KEY in e}
    assert sorted(logged) == [2, 4] == sorted(recorder.levels)
    for step, value in logged.items():
        assert value == pytest.approx(recorder.levels[step], abs=2e-6)
        assert 0.0 < value < 1.0
    state = json.loads((result.output_dir / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [e[INFORMATION_LEVEL_KEY] for e in state["log_history"] if INFORMATION_LEVEL_KEY in e] == \
        [logged[2], logged[4]]


def test_training_without_the_flag_logs_no_information_level(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path, count=4)
    config = config_for(tmp_path, data, images, max_steps=1, log_information_level=False)
    result = train(tiny_llava(), tiny_processor(), config)
    assert [e for e in result.log_history if "loss" in e]
    assert not [e for e in result.log_history if INFORMATION_LEVEL_KEY in e]


def test_leakage_of_a_run_from_python_and_cli(trained_run: Any, tmp_path: Path) -> None:
    root, data, images, _, result = trained_run
    run_dir = result.output_dir
    model_dir = tmp_path / "model"
    tiny_llava().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    samples = load_samples(data=data, image_folder=images, limit=3)
    sources = run_sources(run_dir)
    assert [(s.name, s.step) for s in sources] == [("step 2", 2), ("step 4", 4), ("final", 4)]
    model = tiny_llava()
    levels = leakage_analysis(model, tiny_processor(), samples, sources, show_progress=False)
    # Checkpoint 4 and the final weights are the same tensors; checkpoint 2 differs.
    assert levels["step 4"]["gap"] == pytest.approx(levels["final"]["gap"], abs=1e-9)
    assert levels["step 2"]["gap"] != pytest.approx(levels["step 4"]["gap"], abs=1e-6)
    assert levels["final"]["rows"] == 3 * 16  # keep 0.25 of 64 patches, 3 prompts
    # The final row equals the IL of the vectors collected by hand from the loaded compressor.
    divico.load_compressor(model, run_dir)
    model.eval()
    by_hand = collect_gap_vectors(model, tiny_processor(), samples)
    assert torch.allclose(by_hand["token"], by_hand["selected"] + by_hand["gap"])
    assert levels["final"]["gap"] == pytest.approx(information_level(by_hand["gap"]), abs=1e-9)
    divico.remove_compression(model)

    out = tmp_path / "out"
    code = main(["analyze", "leakage", "--model", str(model_dir), "--run", str(run_dir), "--data", str(data),
                 "--image-folder", str(images), "--limit", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    written = json.loads((out / "leakage.json").read_text())
    assert (out / "leakage.png").stat().st_size > 0
    for name in ("step 2", "step 4", "final"):
        assert written["results"][name]["gap"] == pytest.approx(levels[name]["gap"], abs=1e-6)
    assert [e["step"] for e in written["logged_during_training"]] == [2, 4]


def test_leakage_of_saved_compressors_and_an_untrained_encoder(tmp_path: Path) -> None:
    processor = tiny_processor()
    model = tiny_llava()
    data, images = write_color_data(tmp_path, count=3)
    samples = load_samples(data=data, image_folder=images)
    config = divico.CompressionConfig(method="divico", keep_ratio=0.25, layer=2)
    trained, untrained = tmp_path / "trained", tmp_path / "untrained"
    with divico.compressed(model, config):
        divico.save_compressor(model, untrained)  # g_theta's output layer starts at zero: a constant gap
        randomize_compressor(model)
        divico.save_compressor(model, trained)
    sources = [LeakageSource(d.name, EvalConfiguration(d.name, compressor=d)) for d in (trained, untrained)]
    levels = leakage_analysis(model, processor, samples, sources, show_progress=False)
    assert 0.0 < levels["trained"]["gap"] < 1.0
    assert levels["untrained"]["gap"] is None and "constant" in levels["untrained"]["gap_undefined"]
    assert levels["untrained"]["token"] == pytest.approx(levels["untrained"]["selected"], abs=1e-12)
    assert levels["trained"]["selected"] == pytest.approx(levels["untrained"]["selected"], abs=1e-9)
    with pytest.raises(ValueError, match="needs a model compressed with DiViCo and a gap encoder"):
        collect_gap_vectors(model, processor, samples)
