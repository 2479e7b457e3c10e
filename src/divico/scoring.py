"""Token scores: how much attention the last prompt token pays to each token at layer K-1.

The score of visual token t is ``s_t = mean_h softmax(q_last . k_t * scaling)`` (paper Eq. 4). Instead of asking
the model for its eager attention matrix (which forces ``attn_implementation="eager"`` and materialises
(B, H, N, N)), forward hooks capture layer K-1's query/key projections and one (B, H, 1, N) product is computed
here. ``full_attention`` reproduces the official FastV way (the whole matrix) for benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from divico.adapters.base import ModelAdapter



class LastTokenAttentionScorer:
    """Captures a layer's query/key projections and turns them into last-token attention scores.

    Parameters
    ----------
    adapter
        Model adapter: knows the attention module's q/k modules, head layout and RoPE.
    attention
        The self-attention module of layer K-1.
    mode
        ``"sdpa"`` (last row only) or ``"full_attention"`` (materialise the full causal matrix, FastV reference).
    sliding_window
        Window of layer K-1 if it is a sliding-window layer, else None.
    """

    def __init__(
        self, adapter: ModelAdapter, attention: nn.Module, mode: str, sliding_window: int | None = None
    ) -> None:
        self.adapter = adapter
        self.attention = attention
        self.mode = mode
        self.sliding_window = sliding_window
        self.enabled = False
        self.query_positions: torch.Tensor | None = None
        #: Keep every query row (not only the scoring token's), for :meth:`attention_rows_function`.
        self.capture_all_queries = False
        self._query: torch.Tensor | None = None
        self._key: torch.Tensor | None = None
        # (cos, sin) layer K-1's attention received: models with one RoPE per layer type (Gemma 3's sliding and
        # global layers) give layer K other tables than layer K-1.
        self._position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def register(self) -> None:
        q_module, k_module = self.adapter.query_key_modules(self.attention)
        self._handles.append(q_module.register_forward_hook(self._capture_query))
        self._handles.append(k_module.register_forward_hook(self._capture_key))
        self._handles.append(self.attention.register_forward_pre_hook(self._capture_rope, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self._query = None
        self._key = None
        self._position_embeddings = None

    def enable(self, query_positions: torch.Tensor | None = None) -> None:
        """Capture q/k in the next forward; score from ``query_positions`` (B,) or, if None, the last token."""
        self.enabled = True
        self.query_positions = query_positions

    def _capture_query(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            # Only the last row is needed unless we reproduce the full-matrix reference or score mid-sequence.
            whole = self.mode == "full_attention" or self.query_positions is not None or self.capture_all_queries
            self._query = output.detach() if whole else output[:, -1:].detach()

    def _capture_rope(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.enabled:
            self._position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)

    def _capture_key(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self._key = output.detach()

    def rotated_keys(self, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Layer K-1's keys after its RoPE, as its attention uses them (captured q/k are kept for :meth:`scores`).

        Parameters
        ----------
        position_embeddings
            (cos, sin) used when layer K-1's attention was called without them (as in :meth:`scores`).

        Returns
        -------
        torch.Tensor
            (B, H_kv, N, head_dim) float32 (not repeated over the query heads of a GQA group).
        """
        if self._key is None:
            raise RuntimeError("No key was captured at layer K-1 for this forward; is the scorer enabled?")
        if self._position_embeddings is not None:
            position_embeddings = self._position_embeddings
        if position_embeddings is None:
            raise RuntimeError("Layer K-1's attention received no position_embeddings and none were given.")
        layout = self.adapter.attention_layout(self.attention)
        batch, length = self._key.shape[:2]
        key = self._key.view(batch, length, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
        # The query slot is unused: one key row stands in for it (RoPE is applied to the two independently).
        _, key = self.adapter.apply_rope_to_query_key(self.attention, key[:, :, -1:], key, position_embeddings)
        return key.float()

    def attention_rows_function(
        self, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None, attention_mask_2d: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A function giving the mean-over-heads attention of chosen query rows at this layer (SparseVLM's raters).

        Binds the q/k captured in this forward (with ``capture_all_queries``), so it stays usable after
        :meth:`clear`. The returned ``rows_attention(rows, row_valid)`` takes ``rows`` (B, R) long query slots and
        ``row_valid`` (B, R) bool, and returns (B, R, N) float32 ``mean_h softmax(q_r . k * scaling)`` under the
        causal mask, the padding of ``attention_mask_2d`` (B, N) and the layer's sliding window; rows with
        ``row_valid`` False are zero.

        Raises
        ------
        RuntimeError
            If the whole query was not captured (``capture_all_queries`` off) or no RoPE tables are known.
        """
        if self._query is None or self._key is None or self._query.shape[1] != self._key.shape[1]:
            raise RuntimeError("attention_rows_function needs every query row of layer K-1 (capture_all_queries).")
        if self._position_embeddings is not None:
            position_embeddings = self._position_embeddings
        if position_embeddings is None:
            raise RuntimeError("Layer K-1's attention received no position_embeddings and none were given.")
        query_rows, key_rows, tables = self._query, self._key, position_embeddings
        layout = self.adapter.attention_layout(self.attention)
        window = self.sliding_window

        def rows_attention(rows: torch.Tensor, row_valid: torch.Tensor) -> torch.Tensor:
            batch, length = key_rows.shape[:2]
            query = query_rows.view(batch, length, layout.num_heads, layout.head_dim).transpose(1, 2)
            key = key_rows.view(batch, length, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
            # RoPE on the whole query (elementwise), then only the chosen rows enter the product.
            query, key = self.adapter.apply_rope_to_query_key(self.attention, query, key, tables)
            slots = rows.clamp(min=0)
            count = slots.shape[1]
            query = query.float().gather(2, slots[:, None, :, None].expand(batch, layout.num_heads, count,
                                                                             layout.head_dim))
            key = key.float().repeat_interleave(layout.num_heads // layout.num_kv_heads, dim=1)
            logits = torch.matmul(query, key.transpose(-1, -2)) * layout.scaling  # (B, H, R, N)
            key_index = torch.arange(length, device=key.device)
            keep = attention_mask_2d.bool()[:, None, :] & (key_index[None, None, :] <= slots[:, :, None])
            if window is not None:
                keep = keep & ((slots[:, :, None] - key_index[None, None, :]) < window)
            probs = torch.softmax(logits.masked_fill(~keep[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
            return probs.mean(dim=1) * row_valid[:, :, None]

        return rows_attention

    def scores(
        self, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None, attention_mask_2d: torch.Tensor
    ) -> torch.Tensor:
        """Mean-over-heads attention of the scoring token to every token.

        The scoring token is the last prompt token: the last position at inference, or the per-sample
        ``query_positions`` given to :meth:`enable` (under teacher forcing the answer follows the prompt, and keys
        after the scoring token are masked as causal attention would).

        Parameters
        ----------
        position_embeddings
            (cos, sin), each (B or 1, N, head_dim), used when layer K-1's attention was called without them as an
            argument; the tables it received are used otherwise.
        attention_mask_2d
            (B, N) 1 for real tokens, 0 for padding (left padding).

        Returns
        -------
        torch.Tensor
            (B, N) float32 scores; padding positions get 0.
        """
        if self._query is None or self._key is None:
            raise RuntimeError("No query/key was captured at layer K-1 for this forward; is the scorer enabled?")
        if self._position_embeddings is not None:
            position_embeddings = self._position_embeddings
        if position_embeddings is None:
            raise RuntimeError("Layer K-1's attention received no position_embeddings and none were given.")
        layout = self.adapter.attention_layout(self.attention)
        batch, length = self._key.shape[:2]
        positions = self.query_positions
        if positions is None:
            positions = torch.full((batch,), length - 1, dtype=torch.long, device=self._key.device)
        query = self._query
        if self.mode != "full_attention" and self.query_positions is None and query.shape[1] > 1:
            query = query[:, -1:]  # every row was kept (capture_all_queries); the last one scores
        if self.mode != "full_attention" and self.query_positions is not None:
            query = query.gather(1, positions.view(batch, 1, 1).expand(batch, 1, query.shape[-1]))
        query = query.view(batch, query.shape[1], layout.num_heads, layout.head_dim).transpose(1, 2)
        key = self._key.view(batch, length, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
        query_rope = None
        if self.mode != "full_attention" and self.query_positions is not None:
            query_rope = tuple(_rows_at(t, positions) for t in position_embeddings)
        query, key = self.adapter.apply_rope_to_query_key(
            self.attention, query, key, position_embeddings, query_position_embeddings=query_rope
        )
        query = query.float()
        key = key.float().repeat_interleave(layout.num_heads // layout.num_kv_heads, dim=1)
        logits = torch.matmul(query, key.transpose(-1, -2)) * layout.scaling  # (B, H, Q, N)
        key_index = torch.arange(length, device=key.device)
        keep = attention_mask_2d.bool()[:, None, None, :]
        if self.mode == "full_attention":
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=key.device).tril()[None, None]
        else:
            keep = keep & (key_index[None, :] <= positions[:, None])[:, None, None, :]
        if self.sliding_window is not None:
            window = (positions[:, None] - key_index[None, :]) < self.sliding_window
            keep = keep & window[:, None, None, :]
        logits = logits.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.mode == "full_attention":
            rows = positions.view(batch, 1, 1, 1).expand(batch, probs.shape[1], 1, length)
            probs = probs.gather(2, rows)
        self.clear()
        return probs[:, :, 0, :].mean(dim=1).nan_to_num(0.0)


def _rows_at(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of a (B or 1, N, d) table at per-sample positions (B,) -> (B, 1, d)."""
    batch = positions.shape[0]
    if table.shape[-3] != batch:
        table = table.expand(*table.shape[:-3], batch, *table.shape[-2:])
    index = positions.view(batch, 1, 1).expand(*table.shape[:-3], batch, 1, table.shape[-1])
    return table.gather(-2, index)
