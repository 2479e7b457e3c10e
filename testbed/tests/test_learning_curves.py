"""Learning-curve report of a recipe run: read from the files divico.training writes, table and plot."""

from __future__ import annotations

import json

import pytest

from divico_testbed.learning_curves import collect_learning_curves, format_training_table, write_learning_curves


def _run(root, name, eval_losses, saved_step, stopped_early=True):
    folder = root / "compressors" / name
    folder.mkdir(parents=True)
    points = []
    for index, loss in enumerate(eval_losses):
        step = 10 * (index + 1)
        points.append({"step": step - 5, "train_loss": 1.0, "kl": 2.0, "eval_loss": None, "eval_kl": None})
        points.append({"step": step, "train_loss": 0.9, "kl": 1.5, "eval_loss": loss, "eval_kl": 1.0})
    (folder / "learning_curve.json").write_text(json.dumps({"best_step": saved_step, "points": points}))
    summary = {"steps_run": 10 * len(eval_losses), "best_step": saved_step, "saved_step": saved_step,
               "best_eval_loss": min(eval_losses), "stopped_early": stopped_early}
    (folder / "training_summary.json").write_text(json.dumps(summary))


def test_table_reports_first_and_best_validation_loss_and_the_kept_step(tmp_path):
    _run(tmp_path, "divico-keep11.1", [0.5, 0.4, 0.45, 0.46, 0.47], saved_step=20)
    _run(tmp_path, "deco-keep11.1", [0.3, 0.25], saved_step=20, stopped_early=False)
    (tmp_path / "compressors" / "variant_a-keep11.1").mkdir()  # still training: no summary yet
    curves = collect_learning_curves(tmp_path / "compressors")
    assert sorted(curves) == ["deco-keep11.1", "divico-keep11.1"]
    table = format_training_table(curves)
    assert "| divico-keep11.1 | 50 | 20 | 0.500 -> 0.400 | yes |" in table
    assert "| deco-keep11.1 | 20 | 20 | 0.300 -> 0.250 | no |" in table
    plot, written = write_learning_curves(tmp_path, tmp_path / "docs")
    assert plot.stat().st_size > 1000 and written.read_text() == table + "\n"


def test_missing_or_empty_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder of stage-3 runs"):
        collect_learning_curves(tmp_path / "nope")
    (tmp_path / "compressors").mkdir()
    with pytest.raises(ValueError, match="No finished runs to plot"):
        write_learning_curves(tmp_path, tmp_path / "docs")
