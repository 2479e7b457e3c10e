"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More"): at layer K keep a few pivot tokens and, for each pivot, the visual tokens least similar to it.

The algorithm, as in the official LLaVA code (github.com/ZichenWen1/DART,
``llava/model/language_model/modeling_llama_self.py``, ``get_retained_image_token``; the same in LightCompress'
``token_reduction/dart.py``):

1. Pivots: the ``pivot_image_tokens`` (default 4) visual tokens and the ``pivot_text_tokens`` (default 4) text tokens
   after the image with the largest L1 norm of their layer K-1 keys (after RoPE, all KV heads concatenated).
2. For each pivot, the ``per_pivot = floor(k / (pivot_image_tokens + pivot_text_tokens))`` remaining visual tokens
   least similar (cosine) to it, on layer K's input hidden states after the text model's final norm; each chosen
   token leaves the candidates.
3. Kept: the image pivots and every chosen token (text pivots stay anyway: text is never removed).

Here ``k`` is :meth:`CompressionConfig.keep_count` of the pool (the official ``max_num_trunction``, e.g. 128 for
LLaVA-1.5's 576 tokens), so a pool keeps ``min(n, p_img + (p_img + p_txt) * per_pivot)`` tokens: 4 + 8 * 16 = 132
for k = 128, as the official code does. Where that exceeds the pool (``keep_ratio=1``), the candidates run out
and every token is kept. Attention-free: no attention scores are computed (the report's scores are NaN).

Choices where the official code has no answer (it handles one image and batch size 1):

* text pivots come from the sample's real text tokens after its last visual token, up to the scoring token (the
  last prompt token; under teacher forcing the answer is not looked at); fewer when fewer exist;
* pivots are processed in ascending prompt position (the official code iterates over a Python ``set``), ties in
  norm or similarity go to the earlier position;
* with ``per_frame_keep`` each image / frame is a pool with its own image pivots and ``k``; the text pivots are
  shared.
"""

from __future__ import annotations

from typing import Any

import torch

from divico.config import CompressionConfig
from divico.methods.base import CompressionMethod, SelectionInputs, TextShape
from divico.registry import register_method

#: Official defaults (LLaVA-1.5 scripts): 4 image pivots, 4 text pivots, pruning at layer K = 2.
DEFAULT_PIVOT_IMAGE_TOKENS = 4
DEFAULT_PIVOT_TEXT_TOKENS = 4
OPTIONS = ("pivot_image_tokens", "pivot_text_tokens")


def _option(extra: dict[str, Any], name: str, default: int) -> int:
    value = extra.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"dart: extra[{name!r}] must be an integer >= 0, got {value!r}.")
    return value


def stable_top(values: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest of ``values`` (1-D), ties to the earlier index."""
    return torch.sort(values, descending=True, stable=True).indices[:count]


def pivot_positions(key_l1: torch.Tensor, positions: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` positions (fewer if fewer exist) of largest key L1 norm among ``positions``, ascending.

    Parameters
    ----------
    key_l1
        (N,) L1 norm of each token's layer K-1 keys.
    positions
        (n,) ascending candidate positions.
    count
        Pivots wanted.
    """
    return positions[stable_top(key_l1[positions], min(count, positions.numel()))].sort().values


def least_similar_keep(
    similarity: torch.Tensor, pivots: torch.Tensor, pool: torch.Tensor, image_pivots: torch.Tensor, per_pivot: int
) -> torch.Tensor:
    """DART's greedy step in one pool: each pivot in turn takes the ``per_pivot`` free tokens least similar to it.

    Parameters
    ----------
    similarity
        (P, N) cosine similarity of each of the sample's P pivots (rows, ascending positions ``pivots``) to every
        token.
    pivots
        (p,) indices of the rows of ``similarity`` that are this pool's pivots (its image pivots and the text
        pivots), in ascending position order.
    pool
        (n,) ascending positions of the pool's visual tokens.
    image_pivots
        (q,) the pool's image pivots (kept, and never candidates).
    per_pivot
        Tokens each pivot adds (fewer once the candidates run out).

    Returns
    -------
    torch.Tensor
        (m,) long kept positions of the pool (image pivots included), ascending.
    """
    candidates = pool[~torch.isin(pool, image_pivots)]
    free = torch.ones(candidates.numel(), dtype=torch.bool, device=pool.device)
    chosen = [image_pivots]
    for row in similarity[pivots]:
        take = min(per_pivot, int(free.sum()))
        if take == 0:
            break
        dissimilarity = (-row[candidates]).masked_fill(~free, float("-inf"))
        picked = stable_top(dissimilarity, take)
        free[picked] = False
        chosen.append(candidates[picked])
    return torch.cat(chosen).sort().values


@register_method("dart")
class DART(CompressionMethod):
    """Duplication-aware selection at layer K: pivots by key L1 norm, then the tokens least similar to them.

    Options: ``CompressionConfig(extra={"pivot_image_tokens": int, "pivot_text_tokens": int})``, each >= 0 and not
    both 0 (defaults 4 and 4, the official LLaVA setting). Training-free; trainable only through LoRA on the LLM,
    like FastV.
    """

    display_name = "DART"
    extra_options = OPTIONS
    needs_scores = False
    needs_states = True

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        self.pivot_image_tokens = _option(config.extra, "pivot_image_tokens", DEFAULT_PIVOT_IMAGE_TOKENS)
        self.pivot_text_tokens = _option(config.extra, "pivot_text_tokens", DEFAULT_PIVOT_TEXT_TOKENS)
        if self.pivot_image_tokens + self.pivot_text_tokens == 0:
            raise ValueError("dart: extra['pivot_image_tokens'] + extra['pivot_text_tokens'] must be >= 1, got 0.")

    @property
    def pivots(self) -> int:
        return self.pivot_image_tokens + self.pivot_text_tokens

    def pool_keep_count(self, num_visual: int) -> int:
        """Tokens a pool of ``num_visual`` keeps when the prompt has enough text for every text pivot."""
        if num_visual == 0:
            return 0
        per_pivot = self.config.keep_count(num_visual) // self.pivots
        return min(num_visual, min(self.pivot_image_tokens, num_visual) + self.pivots * per_pivot)

    def kept_visual_tokens(self, images: int, tokens_per_image: int) -> int:
        """``min(n, p_img + (p_img + p_txt) * floor(k / (p_img + p_txt)))`` per pool (each image with
        ``per_frame_keep``), assuming at least ``pivot_text_tokens`` text tokens after the last visual token."""
        if self.config.per_frame_keep:
            return images * self.pool_keep_count(tokens_per_image)
        return self.pool_keep_count(images * tokens_per_image)

    def overhead_flops(self, shape: TextShape, seq_len: int, kept_visual: int) -> dict[str, int]:
        """The cosine similarities: one (P, d) x (d, N) product per sample, its P pivots against every token.

        P = ``pivot_image_tokens + pivot_text_tokens`` (one pool, enough text for every text pivot; with
        ``per_frame_keep`` each further image / frame adds ``pivot_image_tokens`` rows, not counted here). Key norms,
        the RoPE of the captured keys, the final norm and the normalisation are elementwise (not counted).
        """
        return {"similarity": 2 * self.pivots * shape.hidden_size * seq_len}

    def select(
        self, scores: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor, states: SelectionInputs | None = None
    ) -> torch.Tensor:
        """Keep mask: every non-visual token plus DART's kept visual tokens of each sample (or image / frame).

        Parameters
        ----------
        scores
            (B, N) zeros (unused: DART computes no attention scores).
        visual
            (B, N) bool visual-token mask.
        groups
            (B, N) long frame/image id of each visual token (-1 elsewhere), used with ``per_frame_keep``.
        states
            Layer K's normed input and layer K-1's post-RoPE keys (given by the engine: ``needs_states``).

        Returns
        -------
        torch.Tensor
            (B, N) bool keep mask.
        """
        if states is None:
            raise TypeError("dart: select() needs states= (SelectionInputs); the engine passes them (needs_states).")
        batch, length = visual.shape
        key_l1 = states.keys.permute(0, 2, 1, 3).reshape(batch, length, -1).abs().sum(dim=-1)  # (B, N)
        normed = states.normed_hidden_states.float()
        unit = normed / normed.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        pool_ids = groups if self.config.per_frame_keep else torch.where(visual, 0, -1)
        keep = ~visual
        positions = torch.arange(length, device=visual.device)
        real = states.attention_mask_2d.bool()
        for sample in range(batch):
            is_visual = visual[sample]
            if not bool(is_visual.any()):
                continue
            last_visual = int(positions[is_visual].max())
            text = positions[real[sample] & ~is_visual & (positions > last_visual)
                             & (positions <= states.query_positions[sample])]
            text_pivots = pivot_positions(key_l1[sample], text, self.pivot_text_tokens)
            pools = [positions[is_visual & (pool_ids[sample] == pool_id)]
                     for pool_id in pool_ids[sample][is_visual].unique().tolist()]
            image_pivots = [pivot_positions(key_l1[sample], pool, self.pivot_image_tokens) for pool in pools]
            rows = torch.cat([*image_pivots, text_pivots]).sort().values
            similarity = unit[sample, rows] @ unit[sample].T  # (P, N): every pivot against every token
            for pool, pool_pivots in zip(pools, image_pivots):
                mine = torch.isin(rows, torch.cat([pool_pivots, text_pivots])).nonzero().flatten()
                per_pivot = self.config.keep_count(pool.numel()) // self.pivots
                keep[sample, least_similar_keep(similarity, mine, pool, pool_pivots, per_pivot)] = True
        return keep
