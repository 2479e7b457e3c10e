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
        points.append({"step": step, "train_loss": 0.9, "kl": 1.5, "eval_loss": loss, "eval_kl": 1.0 + index,
                       "eval_gap_norm_ratio": 0.01 * (index + 1), "eval_sigma_mean": 0.5})
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
    # KL / gap ratio / sigma are those of the kept step (20: the second evaluation), not the last one
    assert "| divico-keep11.1 | 50 | 20 | 0.500 -> 0.400 | yes | 2.00 | 0.0200 | 0.50 |" in table
    assert "| deco-keep11.1 | 20 | 20 | 0.300 -> 0.250 | no | 2.00 | 0.0200 | 0.50 |" in table
    plot, written = write_learning_curves(tmp_path, tmp_path / "docs")
    assert plot.stat().st_size > 1000 and written.read_text() == table + "\n"


def test_missing_or_empty_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder of stage-3 runs"):
        collect_learning_curves(tmp_path / "nope")
    (tmp_path / "compressors").mkdir()
    with pytest.raises(ValueError, match="No finished runs to plot"):
        write_learning_curves(tmp_path, tmp_path / "docs")


def test_kept_step_metrics_fall_back_to_the_kept_checkpoints_trainer_log(tmp_path):
    _run(tmp_path, "divico-keep6.7", [0.5, 0.4, 0.45], saved_step=20)
    run = tmp_path / "compressors" / "divico-keep6.7"
    curve = json.loads((run / "learning_curve.json").read_text())
    for point in curve["points"]:  # a curve written before these fields were recorded
        point.pop("eval_gap_norm_ratio", None), point.pop("eval_sigma_mean", None)
    (run / "learning_curve.json").write_text(json.dumps(curve))
    (run / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    log = [{"step": 20, "loss": 0.9}, {"step": 20, "eval_loss": 0.4, "eval_gap_norm_ratio": 0.0123, "eval_sigma_mean": 0.97}]
    (run / "checkpoints" / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"log_history": log}))
    table = format_training_table(collect_learning_curves(tmp_path / "compressors"))
    assert "| divico-keep6.7 | 30 | 20 | 0.500 -> 0.400 | yes | 2.00 | 0.0123 | 0.97 |" in table
