"""Tests of divico.analysis.tsne (Fig. 5): the shift measures on constructed distributions (hand-computed), sigma = 0
moves nothing, the analysis' shift equals one computed here from plain forwards of the compressed, perturbed tiny
LLaVA, and the files are written."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_runner import tiny_llava_processor
from tiny_models import tiny_llava

import divico
from divico.analysis.common import AnalysisSample, model_inputs
from divico.analysis.tsne import distribution_shift, noise_tsne, tsne_embedding
from divico.config import CompressionConfig
from divico.evaluation.runner import EvalConfiguration
from divico.perturbation import NoiseConfig, perturbed


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


PROMPTS = ["what color is the shape", "what is the shape", "how many shape", "is the shape red", "what shape is blue"]


def samples() -> list[AnalysisSample]:
    rng = np.random.default_rng(0)
    return [AnalysisSample(f"s{i}", Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), prompt)
            for i, prompt in enumerate(PROMPTS)]


CONFIGURATIONS = [EvalConfiguration("FastV", compression=CompressionConfig("fastv", keep_ratio=0.25, layer=2)),
                  EvalConfiguration("DiViCo", compression=CompressionConfig("divico", keep_ratio=0.25, layer=2))]


def test_distribution_shift_on_constructed_distributions() -> None:
    clean = torch.tensor([[0.3, 0.7], [0.2, 0.8]], dtype=torch.float64).log()
    noisy = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64).log()
    shift = distribution_shift(clean, noisy)
    kl_pq = 0.3 * math.log(0.3 / 0.9) + 0.7 * math.log(0.7 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.3) + 0.1 * math.log(0.1 / 0.7)
    assert shift["symmetric_kl"] == pytest.approx([(kl_pq + kl_qp) / 2, 0.0], abs=1e-12)
    assert shift["mean_symmetric_kl"] == pytest.approx((kl_pq + kl_qp) / 4, abs=1e-12)
    assert shift["mean_l2"] == pytest.approx(0.6 * math.sqrt(2) / 2, abs=1e-12)
    assert shift["mean_total_variation"] == pytest.approx(0.6 / 2, abs=1e-12)
    assert shift["top1_changed"] == 0.5  # the first question's most likely token flips, the second's stays
    with pytest.raises(ValueError, match="at least 4 distributions"):
        tsne_embedding(clean)


def _by_hand(configuration: EvalConfiguration, noise: NoiseConfig) -> tuple[np.ndarray, np.ndarray]:
    """Clean and noisy next-token probabilities of every sample from plain forwards (float64 numpy)."""
    model, processor = tiny_llava(), tiny_llava_processor()
    divico.apply_compression(model, configuration.compression)
    rows: dict[str, list[np.ndarray]] = {"clean": [], "noisy": []}
    with torch.no_grad():
        for sample in samples():
            inputs = model_inputs(model, processor, sample)
            rows["clean"].append(torch.softmax(model(**inputs).logits[0, -1].double(), -1).numpy())
            with perturbed(model, noise):
                rows["noisy"].append(torch.softmax(model(**inputs).logits[0, -1].double(), -1).numpy())
    return np.stack(rows["clean"]), np.stack(rows["noisy"])


def test_noise_tsne_shift_matches_plain_forwards_and_files_are_written(tmp_path: Path) -> None:
    noise = NoiseConfig(3.0, seed=4)
    summary = noise_tsne(tiny_llava(), tiny_llava_processor(), samples(), CONFIGURATIONS, tmp_path, noise=noise,
                         show_progress=False)
    for configuration in CONFIGURATIONS:
        p, q = _by_hand(configuration, noise)
        symmetric = 0.5 * ((p * np.log(p / q)).sum(-1) + (q * np.log(q / p)).sum(-1))
        shift = summary["shift"][configuration.name]
        assert shift["mean_symmetric_kl"] == pytest.approx(float(symmetric.mean()), rel=1e-6)
        assert shift["mean_l2"] == pytest.approx(float(np.linalg.norm(p - q, axis=-1).mean()), rel=1e-6)
        assert shift["mean_symmetric_kl"] > 0
        assert np.asarray(summary["points"][configuration.name]["clean"]).shape == (len(PROMPTS), 2)
    written = json.loads((tmp_path / "tsne.json").read_text())
    assert written["shift"]["FastV"]["mean_symmetric_kl"] == summary["shift"]["FastV"]["mean_symmetric_kl"]
    with Image.open(tmp_path / "tsne.png") as image:
        assert image.size[0] > 400


def test_sigma_zero_moves_nothing(tmp_path: Path) -> None:
    summary = noise_tsne(tiny_llava(), tiny_llava_processor(), samples()[:2], CONFIGURATIONS, tmp_path,
                         noise=NoiseConfig(0.0), show_progress=False)
    for name in ("FastV", "DiViCo"):
        assert summary["shift"][name]["mean_symmetric_kl"] == 0.0
        assert summary["shift"][name]["mean_l2"] == 0.0
        assert summary["shift"][name]["top1_changed"] == 0.0
