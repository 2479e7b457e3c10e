"""Disentanglement of DiViCo's gap encoding (paper Eq. 16) and the Trainer callback that logs it during training.

``IL = 1 - 2 / (d (d - 1)) * sum_{i<j} |corr_ij|`` over the d dimensions of the gap vectors v_c' that g_theta adds
to the kept tokens: 1 when the dimensions are uncorrelated, 0 when every pair is perfectly (anti-)correlated. The
paper (Fig. 7) watches IL rise over training, which it credits to the KL term pulling q(v_c' | .) towards the
independent prior N(0, I). ``divico analyze leakage`` computes it from saved compressors and checkpoints.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from divico.methods.divico import GapEncoder

logger = logging.getLogger(__name__)

#: Name of the logged value (in the Trainer's logs, ``log_history`` and ``trainer_state.json``).
INFORMATION_LEVEL_KEY = "information_level"
#: Gap rows kept for one log window (the most recent ones): 4096 x d float32 (9.4 MB for d = 576).
DEFAULT_MAX_ROWS = 4096


def information_level(vectors: torch.Tensor) -> float:
    """IL of Eq. 16 over the columns of ``vectors``: ``1 - mean_{i<j} |corr(x_i, x_j)|``.

    Parameters
    ----------
    vectors
        (n, d) with n >= 2 samples (e.g. gap vectors of kept tokens) of d >= 2 dimensions; computed in float64.

    Returns
    -------
    float
        In [0, 1]: 1 for uncorrelated dimensions, lower as pairs of dimensions correlate.

    Raises
    ------
    ValueError
        Not 2-D, n < 2 or d < 2, non-finite values, or a constant dimension (its correlation is undefined; an
        untrained g_theta, whose output layer starts at zero, gives only constant dimensions).
    """
    if not isinstance(vectors, torch.Tensor) or vectors.dim() != 2:
        shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise ValueError(f"vectors must be a 2-D (n, d) tensor, got {shape}.")
    rows, dims = vectors.shape
    if rows < 2 or dims < 2:
        raise ValueError(f"information_level needs n >= 2 vectors of d >= 2 dimensions, got n={rows}, d={dims}.")
    values = vectors.detach().double()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("vectors hold non-finite values (NaN or inf).")
    centered = values - values.mean(dim=0, keepdim=True)
    norms = centered.norm(dim=0)
    # Relative to the column's magnitude, so float32 round-off of a constant column does not count as variance.
    scale = values.abs().amax(dim=0).clamp_min(1.0)
    constant = (norms <= 1e-12 * scale * rows ** 0.5).nonzero()[:, 0]
    if constant.numel():
        shown = constant[:8].tolist()
        raise ValueError(
            f"{constant.numel()} of {dims} dimensions are constant over the {rows} vectors (e.g. {shown}); their "
            "correlation is undefined."
        )
    normalized = centered / norms
    correlation = (normalized.T @ normalized).abs()
    upper = torch.triu(correlation, diagonal=1).sum()
    return float(1.0 - 2.0 * upper / (dims * (dims - 1)))


class InformationLevelCallback(TrainerCallback):
    """Logs :func:`information_level` of the gap vectors g_theta produced in training since the last log.

    A forward hook on the gap encoder collects its output (the sample ``mu + eps * sigma`` in training) for every
    training micro-batch; at each logging step the IL of the collected rows joins the log entry as
    ``information_level`` (also in ``state.log_history``, hence ``trainer_state.json``) and the window restarts.
    Forwards in eval mode (the Trainer's evaluation) are not collected. With several processes each logs its own
    rows' IL (only the main process writes logs).

    Parameters
    ----------
    encoder
        The runtime's gap encoder (``runtime.compressor``).
    max_rows
        Rows kept per window (the most recent), >= 2.
    """

    def __init__(self, encoder: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if not isinstance(encoder, GapEncoder):
            raise TypeError(f"InformationLevelCallback needs DiViCo's GapEncoder, got {type(encoder).__name__}.")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 2:
            raise ValueError(f"max_rows must be an integer >= 2, got {max_rows!r}.")
        self.encoder = encoder
        self.max_rows = max_rows
        self._rows: list[torch.Tensor] = []
        self._count = 0
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._warned = False

    @staticmethod
    def applies_to(compressor: nn.Module | None) -> bool:
        """Whether a runtime's compressor has a gap encoding to measure."""
        return isinstance(compressor, GapEncoder)

    def _collect(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not module.training or output.shape[0] == 0:
            return
        self._rows.append(output.detach().float().cpu())
        self._count += output.shape[0]
        while self._count - self._rows[0].shape[0] >= self.max_rows:
            self._count -= self._rows.pop(0).shape[0]

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if self._handle is None:
            self._handle = self.encoder.register_forward_hook(self._collect)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._rows, self._count = [], 0

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or not self._rows:
            return
        rows = torch.cat(self._rows)[-self.max_rows:]
        self._rows, self._count = [], 0
        try:
            value = round(information_level(rows), 6)
        except ValueError as error:
            if not self._warned:
                logger.warning("information_level not logged at step %d: %s", state.global_step, error)
                self._warned = True
            return
        logs[INFORMATION_LEVEL_KEY] = value
        # The Trainer appended a copy of ``logs`` to the history just before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][INFORMATION_LEVEL_KEY] = value
