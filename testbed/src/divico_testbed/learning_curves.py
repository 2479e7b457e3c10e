"""Learning curves of a recipe run's stage-3 compressors: one plot and one markdown table for the docs.

Reads each ``compressors/<run>/learning_curve.json`` and ``training_summary.json`` that
:func:`divico.training.train` writes (validation answer loss every ``eval_steps``, training loss and KL at every
logging step) and draws the validation answer loss over the steps, the step whose weights were kept marked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from divico.training.trainer import LEARNING_CURVE_NAME, TRAINING_SUMMARY_NAME
from matplotlib.figure import Figure

#: Panels of the plot: one per method family of the stage-3 runs (the run name's part before "-keep").
PANEL_ORDER = ("divico", "deco", "variant_a", "variant_b", "divico_klmean")


def collect_learning_curves(compressors_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Run name -> ``{"points": [...], "summary": {...}}`` of every finished run under ``compressors_dir``.

    A run counts as finished when both files exist; a run still training (or never started) is left out.

    Raises
    ------
    FileNotFoundError
        If ``compressors_dir`` is not a folder.
    """
    root = Path(compressors_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of stage-3 runs (expected RUN/compressors).")
    curves: dict[str, dict[str, Any]] = {}
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        curve, summary = run / LEARNING_CURVE_NAME, run / TRAINING_SUMMARY_NAME
        if curve.is_file() and summary.is_file():
            summary_data = json.loads(summary.read_text())
            curves[run.name] = {"points": json.loads(curve.read_text())["points"], "summary": summary_data,
                                "kept": _kept_step_metrics(run, summary_data.get("saved_step"))}
    return curves


#: Validation figures of a variational encoder reported at the kept step (Eq. 8's KL, ||v_c'|| / ||v_s||, sigma).
KEPT_METRICS = ("eval_kl", "eval_gap_norm_ratio", "eval_sigma_mean")


def _kept_step_metrics(run: Path, step: int | None) -> dict[str, float]:
    """:data:`KEPT_METRICS` at ``step``: from the learning curve, else (runs whose curve predates those fields)
    from the Trainer log of the kept checkpoint; empty for a deterministic run."""
    found: dict[str, float] = {}
    points = json.loads((run / LEARNING_CURVE_NAME).read_text())["points"]
    for point in points:
        if point.get("step") == step:
            found.update({k: float(point[k]) for k in KEPT_METRICS if point.get(k) is not None})
    state = run / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json"
    if len(found) < len(KEPT_METRICS) and state.is_file():
        for entry in json.loads(state.read_text()).get("log_history", []):
            if entry.get("step") == step and "eval_loss" in entry:
                found.update({k: float(entry[k]) for k in KEPT_METRICS if k in entry and k not in found})
    return found


def _eval_points(points: list[Mapping[str, Any]]) -> tuple[list[int], list[float]]:
    evaluated = [p for p in points if p.get("eval_loss") is not None]
    return [int(p["step"]) for p in evaluated], [float(p["eval_loss"]) for p in evaluated]


def format_training_table(curves: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: per run the steps run, the kept (best) step, the first and best validation answer loss, whether
    early stopping ended it, and a variational encoder's validation KL, gap-to-token norm ratio and mean sigma at
    the kept step ("-" for deterministic runs)."""
    lines = ["| Run | Steps run | Kept step | Validation answer loss: first -> best | Stopped early "
             "| validation KL, as trained (nats) | gap / token norm | mean sigma |",
             "|---|---|---|---|---|---|---|---|"]
    for name, curve in curves.items():
        summary = curve["summary"]
        _, losses = _eval_points(curve["points"])
        first = f"{losses[0]:.3f}" if losses else "-"
        best = summary.get("best_eval_loss")
        best_text = "-" if best is None else f"{best:.3f}"
        lines.append(f"| {name} | {summary['steps_run']} | {summary.get('saved_step', summary['steps_run'])} | "
                     f"{first} -> {best_text} | {'yes' if summary.get('stopped_early') else 'no'} | "
                     + " | ".join(_metric(curve.get("kept", {}), key) for key in KEPT_METRICS) + " |")
    return "\n".join(lines)


def _metric(kept: Mapping[str, float], key: str) -> str:
    if key not in kept:
        return "-"
    return f"{kept[key]:.4f}" if key == "eval_gap_norm_ratio" else f"{kept[key]:.2f}"


def plot_learning_curves(curves: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Validation answer loss over steps, one panel per method family, one line per rate; the kept step marked."""
    families = [f for f in PANEL_ORDER if any(name.split("-keep")[0] == f for name in curves)]
    families += sorted({name.split("-keep")[0] for name in curves} - set(families))
    if not families:
        raise ValueError("No finished runs to plot (no learning_curve.json with a training_summary.json).")
    fig = Figure(figsize=(3.6 * len(families), 3.4))
    axes = fig.subplots(1, len(families), squeeze=False)[0]
    for ax, family in zip(axes, families):
        for name in sorted(n for n in curves if n.split("-keep")[0] == family):
            steps, losses = _eval_points(curves[name]["points"])
            line = ax.plot(steps, losses, marker=".", label=name.split("-", 1)[1])[0]
            kept = curves[name]["summary"].get("saved_step")
            if kept in steps:
                ax.plot([kept], [losses[steps.index(kept)]], marker="*", markersize=12, color=line.get_color())
        ax.set(title=family, xlabel="step", ylabel="validation answer loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Stage-3 compressors: validation answer loss (* = kept step)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def write_learning_curves(run_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """``out_dir/learning_curves.png`` and ``out_dir/training.md`` from ``run_dir/compressors``."""
    curves = collect_learning_curves(Path(run_dir) / "compressors")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "training.md"
    table.write_text(format_training_table(curves) + "\n")
    return plot_learning_curves(curves, out / "learning_curves.png"), table
