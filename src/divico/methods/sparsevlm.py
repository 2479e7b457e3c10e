"""SparseVLM (Zhang et al., ICML 2025, "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference"): text-guided, progressive pruning of the visual tokens by the attention of "rater" text tokens.

Official code: github.com/Gumpest/SparseVLMs, ``llava/model/language_model/modelling_sparse_llama.py``
(``LlamaModel.forward``: rater selection, ``pruning_loc=[2, 6, 15]``) and ``score.py`` (``attn_postprocess_topk``,
``sparse_token_dict``). The algorithm as implemented here:

1. Raters (paper Sec. 3.2): from decoder layer 0's input (the official ``hidden_states`` before the first layer),
   ``m = mean_v softmax_t(v . t)`` over the sample's visual tokens ``v`` and the text tokens ``t`` after its last
   visual token (up to the scoring token: under teacher forcing the answer is not a rater); the raters are the text
   tokens with ``m > mean(m)`` (every candidate when none is, e.g. a single text token).
2. Sparse layers 2, 6 and 15 of 32 rank the visual tokens still present by the raters' attention at that layer
   (mean over heads, then over raters) and keep the top count; the layer's *output* is pruned, so the engine's
   boundaries are the next layers, 3, 7 and 16. For an LLM of L layers each sparse layer s is scaled to
   ``floor(s * L / 32 + 1/2)`` (nearest, halves up), the boundary being one more: 3, 6, 14 of 28; 1, 2, 3 of 4. The
   three boundaries must be distinct and lie in [1, L-1] (L >= 4), or be given as ``CompressionConfig.extra
   ["layers"]``; ``config.layer`` is unused.
3. Counts: the official v1.5 tables (``score.py``, ``sparse_token_dict``, for 576 LLaVA-1.5 tokens), indexed by
   the retained-token budget k (the average visual tokens per layer): 192 -> 300, 200, 110; 128 -> 303, 110, 36;
   96 -> 238, 48, 26; 64 -> 66, 30, 17. For a pool of n tokens, k = :meth:`CompressionConfig.keep_count` (n) and
   the stage shares (count / 576) are interpolated linearly in r = k / n between the tabled points r = 64/576,
   96/576, 128/576, 192/576 and r = 1 (shares 1, 1, 1), and scaled by r / (64/576) below the first; stage s keeps
   ``floor(share_s * n)`` (exact fractions), at least 1 and no more than the stage before. With n = 576 and a tabled
   k this is the table; keep_ratio = 1 keeps everything.

Differences from the official code (it handles batch size 1 and one image):

* recycling is off by default (``extra["recycle"]=True`` turns it on): the official code merges the top 30% (+1)
  of each stage's pruned tokens by relation into ``int(m / 10) + 1`` DPC-kNN cluster tokens
  (``utils.py``, ``cluster_and_merge``) and inserts them after the kept visual tokens; here each merged token
  takes the slot (and RoPE position) of its cluster's centre, and counts as a visual token of the later stages, as
  in the official code. Off by default because the contract matrix's oracle and forced-selection decode checks
  (tests/contract_cases.py) describe a stage by its kept set only, which does not reproduce merged rows at later
  stages; tests/test_sparsevlm.py checks the recycled output against a merge-aware reference instead;
* the official topk keeps at most ``n - 1`` (so something is left to merge); here up to n;
* the attention ranking at sparse layer s is the engine's capture of that layer's q/k (the same product); kept
  tokens keep their original RoPE positions (v1.5 renumbers them 0..M-1; SparseVLM+ keeps them);
* every candidate text row's attention is computed and the raters' rows are averaged (a fixed number of rows, so the
  FLOPs do not depend on the data); ties in the ranking go to the earlier position; samples of a batch are
  independent (each its own raters and counts).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
from torch import nn

from divico.config import CompressionConfig
from divico.methods.base import CompressionMethod, SelectionInputs, TextShape, increasing_layers
from divico.registry import register_method
from divico.selection import TokenSelection, top_k_keep_mask

#: The official sparse layers (``pruning_loc``) of a 32-layer LLM (LLaVA-1.5-7B); each prunes its own output.
SPARSE_LAYERS_OF_32 = (2, 6, 15)
REFERENCE_DEPTH = 32
#: ``score.py``'s v1.5 ``sparse_token_dict``: retained budget k -> visual tokens kept after each sparse layer.
REFERENCE_TOKENS = 576
TOKEN_TABLE: dict[int, tuple[int, int, int]] = {
    64: (66, 30, 17),
    96: (238, 48, 26),
    128: (303, 110, 36),
    192: (300, 200, 110),
}
OPTIONS = ("layers", "recycle")
#: Recycling (official ``modelling_sparse_llama.py``): the top 30% of a stage's pruned tokens by relation, plus one,
#: are clustered into ``int(m / 10) + 1`` tokens.
RECYCLE_SHARE = Fraction(3, 10)
TOKENS_PER_CLUSTER = 10


def recycled_counts(num_pruned: int) -> tuple[int, int]:
    """(tokens recycled, clusters) for a stage that prunes ``num_pruned`` tokens: ``m = int(0.3 p) + 1`` and
    ``int(m / 10) + 1`` (0 and 0 when nothing is pruned)."""
    if num_pruned <= 0:
        return 0, 0
    recycled = int(num_pruned * RECYCLE_SHARE) + 1
    return recycled, recycled // TOKENS_PER_CLUSTER + 1


def dpc_knn_clusters(tokens: torch.Tensor, num_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``cluster_and_merge``'s DPC-kNN clustering of one sample's tokens.

    Distances ``||x_i - x_j|| / sqrt(C)``; density ``exp(-mean of the squared distances to the num_clusters nearest
    (itself included))``; each token's distance to the nearest denser token (the largest distance if none); centres
    = the ``num_clusters`` largest ``distance * density``; every token joins its nearest centre, a centre itself.
    The official code adds ``1e-6`` uniform noise to the densities to break ties; here ties go to the earlier
    token (deterministic).

    Parameters
    ----------
    tokens
        (n, C) tokens to cluster.
    num_clusters
        Clusters, 1 <= num_clusters <= n.

    Returns
    -------
    tuple of torch.Tensor
        (num_clusters,) long indices of the centres (descending score) and (n,) long cluster of each token
        (an index into the centres).
    """
    x = tokens.float()
    # Exact differences (not the matmul expansion, whose self-distance is not 0).
    distance = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / x.shape[-1] ** 0.5
    nearest = torch.sort(distance, dim=-1, stable=True).values[:, :num_clusters]
    density = torch.exp(-(nearest**2).mean(dim=-1))
    denser = density[None, :] > density[:, None]  # [i, j]: token j is denser than token i
    to_denser = torch.where(denser, distance, distance.max()).min(dim=-1).values
    centres = torch.sort(to_denser * density, descending=True, stable=True).indices[:num_clusters]
    assignment = distance[centres].argmin(dim=0)  # argmin returns the first minimum: ties to the earlier centre
    assignment[centres] = torch.arange(num_clusters, device=tokens.device)
    return centres, assignment


def scaled_boundaries(num_layers: int, sparse_layers_of_32: tuple[int, ...] = SPARSE_LAYERS_OF_32) -> list[int]:
    """The layers whose input is pruned: each official sparse layer scaled to ``num_layers`` (nearest, halves up),
    plus one; those outside [1, L-1] and duplicates dropped."""
    scaled = [(2 * s * num_layers + REFERENCE_DEPTH) // (2 * REFERENCE_DEPTH) + 1 for s in sparse_layers_of_32]
    return sorted({layer for layer in scaled if 1 <= layer <= num_layers - 1})


def stage_shares(budget: int, num_visual: int) -> tuple[Fraction, Fraction, Fraction]:
    """Share of the pool each stage keeps for a budget of ``budget`` of ``num_visual`` tokens (the module's rule)."""
    ratio = Fraction(budget, num_visual)
    points = [(Fraction(k, REFERENCE_TOKENS), tuple(Fraction(c, REFERENCE_TOKENS) for c in counts))
              for k, counts in sorted(TOKEN_TABLE.items())]
    points.append((Fraction(1), (Fraction(1),) * 3))
    first_ratio, first_shares = points[0]
    if ratio <= first_ratio:
        return tuple(share * ratio / first_ratio for share in first_shares)  # type: ignore[return-value]
    for (low, low_shares), (high, high_shares) in zip(points, points[1:]):
        if ratio <= high:
            weight = (ratio - low) / (high - low)
            return tuple(a + (b - a) * weight for a, b in zip(low_shares, high_shares))  # type: ignore[return-value]
    raise ValueError(f"sparsevlm: budget {budget} exceeds the pool of {num_visual} visual tokens.")


def stage_counts(budget: int, num_visual: int) -> list[int]:
    """Visual tokens kept after each of the three sparse layers, for a pool of ``num_visual`` and budget k."""
    if num_visual <= 0:
        return [0, 0, 0]
    counts: list[int] = []
    for share in stage_shares(budget, num_visual):
        count = min(num_visual, max(1, int(share * num_visual)))  # int() of a non-negative Fraction is floor
        counts.append(min(count, counts[-1]) if counts else count)
    return counts


def rater_positions(embeddings: torch.Tensor, visual: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """SparseVLM's raters of one sample: the candidate text tokens whose mean relation to the visual tokens
    ``mean_v softmax_t(v . t)`` exceeds the mean over candidates (every candidate when none does).

    Parameters
    ----------
    embeddings
        (N, d) decoder layer 0's input of the sample.
    visual
        (n_v,) positions of its visual tokens.
    candidates
        (n_t,) ascending positions of the candidate text tokens.

    Returns
    -------
    torch.Tensor
        (r,) ascending positions of the raters.
    """
    relation = (embeddings[visual].float() @ embeddings[candidates].float().T).softmax(dim=-1).mean(dim=0)
    raters = candidates[relation > relation.mean()]
    return raters if raters.numel() else candidates


@register_method("sparsevlm")
class SparseVLM(CompressionMethod):
    """Text-guided progressive pruning: raters chosen once from layer 0's input, their attention ranks the visual
    tokens at three sparse layers, kept counts from the official v1.5 tables.

    Options: ``CompressionConfig(extra={"layers": [b1, b2, b3], "recycle": bool})``: the three layers whose input
    is pruned (one after each sparse layer; default the official 3, 7, 16 of 32 scaled to the LLM), and whether
    the top 30% of each stage's pruned tokens are merged into DPC-kNN cluster tokens, each in the slot of its
    cluster's centre (default False: see the module notes). Training-free; trainable only through LoRA on the LLM,
    like FastV.
    """

    display_name = "SparseVLM"
    extra_options = OPTIONS
    needs_scores = False
    needs_states = True
    needs_attention_rows = True

    def __init__(self, config: CompressionConfig) -> None:
        super().__init__(config)
        if config.per_frame_keep:
            raise ValueError(
                "sparsevlm ranks each sample's visual tokens as one pool; per_frame_keep=True is not supported."
            )
        layers = config.extra.get("layers")
        if layers is not None:
            parsed = increasing_layers(layers)
            if parsed is None or len(parsed) != len(SPARSE_LAYERS_OF_32):
                raise ValueError(
                    f"sparsevlm: extra['layers'] must be 3 strictly increasing integers >= 1 (the layers after the "
                    f"sparse layers), got {layers!r}."
                )
            layers = parsed
        recycle = config.extra.get("recycle", False)
        if not isinstance(recycle, bool):
            raise ValueError(f"sparsevlm: extra['recycle'] must be True or False, got {recycle!r}.")
        self.recycle = recycle
        # The merge of the stage being compressed (set by select, used once by compress): per sample a list of
        # (centre slot, member slots) in the sequence select saw.
        self._merges: list[list[tuple[int, torch.Tensor]]] | None = None
        self.explicit_layers: list[int] | None = layers
        self.depth: int | None = None  # the LLM's depth, once the engine or the accounting has told it
        # Raters of the prefill in progress, set at the first boundary and read at the later ones:
        # per sample (candidate positions, rater flags), original positions.
        self._raters: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # --- schedule and counts ---------------------------------------------------------------------------------
    def compression_layers(self, num_layers: int) -> list[int]:
        """The three boundaries for an LLM of ``num_layers`` layers.

        Raises
        ------
        ValueError
            If they are not three distinct layers in [1, ``num_layers`` - 1].
        """
        layers = self.explicit_layers if self.explicit_layers is not None else scaled_boundaries(num_layers)
        if len(layers) != len(SPARSE_LAYERS_OF_32) or layers[0] < 1 or layers[-1] > num_layers - 1:
            raise ValueError(
                f"sparsevlm: needs 3 distinct boundaries in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got "
                f"{layers} (the default needs >= 4 layers; give CompressionConfig(extra={{'layers': [...]}}))."
            )
        self.depth = num_layers
        return list(layers)

    @property
    def first_compressed_layer(self) -> int:
        """The first boundary (explicit, or the default at the depth last given to :meth:`compression_layers`)."""
        if self.explicit_layers is not None:
            return self.explicit_layers[0]
        if self.depth is None:
            raise ValueError(
                "sparsevlm: the default boundaries depend on the LLM's depth; call compression_layers(num_layers) "
                "first or give CompressionConfig(extra={'layers': [...]})."
            )
        return self.compression_layers(self.depth)[0]

    def counts(self, num_visual: int) -> list[int]:
        """Visual tokens a pool of ``num_visual`` ranks into the top set at each stage (k =
        ``config.keep_count(num_visual)``); with ``recycle`` each stage adds its cluster tokens
        (:meth:`present_counts`)."""
        if num_visual <= 0:
            return [0, 0, 0]
        return stage_counts(self.config.keep_count(num_visual), num_visual)

    def present_counts(self, num_visual: int) -> list[int]:
        """Visual tokens present after each stage: the top set, plus with ``recycle`` the stage's clusters
        (computed from the tokens present before it)."""
        present, out = num_visual, []
        for count in self.counts(num_visual):
            top = min(count, present)
            clusters = recycled_counts(present - top)[1] if self.recycle else 0
            present = top + clusters
            out.append(present)
        return out

    def kept_visual_tokens(self, images: int, tokens_per_image: int) -> int:
        """After the last stage, for one pool of ``images * tokens_per_image`` tokens."""
        return self.present_counts(images * tokens_per_image)[-1]

    def stage_lengths(self, num_layers: int, seq_len: int, visual_tokens: int) -> list[int]:
        """Tokens per sample of each stage: the prompt before the first boundary, then after each."""
        self.compression_layers(num_layers)
        text = seq_len - visual_tokens
        return [seq_len] + [text + count for count in self.present_counts(visual_tokens)]

    def tokens_per_layer(self, num_layers: int, seq_len: int, visual_tokens: int, kept_visual: int) -> list[int]:
        """Each layer's stage length (``kept_visual`` is implied by the schedule)."""
        layers = self.compression_layers(num_layers)
        lengths = self.stage_lengths(num_layers, seq_len, visual_tokens)
        self._last_layout = (num_layers, seq_len, visual_tokens)
        return [lengths[sum(1 for b in layers if index >= b)] for index in range(num_layers)]

    def overhead_flops(self, shape: TextShape, seq_len: int, kept_visual: int) -> dict[str, int]:
        """Rater selection, one (n_v, d) x (d, n_t) product; at each boundary the (H, n_t, M) attention logits of
        every candidate text row over the M tokens of the stage before it.

        Assumes the prompt's text follows its visual tokens (n_t = ``seq_len`` - n_v: no text before the first
        image); text before it is no candidate, so this then overcounts. The layout (n_v, depth) is that of the
        preceding :meth:`tokens_per_layer` call. Recycling adds no matrix product (its distances are norms of
        differences, its merge a mean).
        """
        layout = getattr(self, "_last_layout", None)
        if layout is None or layout[1] != seq_len:
            raise ValueError("sparsevlm: overhead_flops needs the prompt layout; call tokens_per_layer(...) first.")
        num_layers, _, visual_tokens = layout
        text = seq_len - visual_tokens
        lengths = self.stage_lengths(num_layers, seq_len, visual_tokens)[:-1]
        per_key = 2 * shape.num_heads * shape.head_dim
        return {"raters": 2 * visual_tokens * text * shape.hidden_size,
                "scoring": sum(per_key * text * length for length in lengths)}

    # --- selection -------------------------------------------------------------------------------------------
    def _choose_raters(self, visual: torch.Tensor, states: SelectionInputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sample: candidate text positions and which of them are raters (original positions)."""
        if states.input_embeddings is None:
            raise TypeError("sparsevlm: states.input_embeddings (decoder layer 0's input) is missing.")
        length = visual.shape[1]
        positions = torch.arange(length, device=visual.device)
        real = states.attention_mask_2d.bool()
        chosen = []
        for sample in range(visual.shape[0]):
            is_visual = visual[sample]
            if not bool(is_visual.any()):
                empty = positions[:0]
                chosen.append((empty, empty.bool()))
                continue
            last_visual = int(positions[is_visual].max())
            candidates = positions[real[sample] & ~is_visual & (positions > last_visual)
                                   & (positions <= states.query_positions[sample])]
            raters = rater_positions(states.input_embeddings[sample], positions[is_visual], candidates)
            chosen.append((candidates, torch.isin(candidates, raters)))
        return chosen

    def relation(self, visual: torch.Tensor, states: SelectionInputs) -> torch.Tensor:
        """(B, M) mean over raters of their mean-over-heads attention to every slot of the current sequence."""
        batch, length = visual.shape
        if states.attention_rows is None or states.slot_positions is None:
            raise TypeError("sparsevlm: states.attention_rows and states.slot_positions are needed (the engine's).")
        if self._raters is None or len(self._raters) != batch:
            raise RuntimeError("sparsevlm: a later boundary ran without the first one of this prefill (no raters).")
        width = max([candidates.numel() for candidates, _ in self._raters] + [1])
        rows = torch.zeros(batch, width, dtype=torch.long, device=visual.device)
        is_rater = torch.zeros(batch, width, dtype=torch.bool, device=visual.device)
        for sample, (candidates, flags) in enumerate(self._raters):
            valid = states.slot_positions[sample] >= 0
            slot_of = torch.full((int(states.slot_positions[sample].max()) + 1,), -1, dtype=torch.long,
                                 device=visual.device)
            slot_of[states.slot_positions[sample][valid]] = torch.arange(length, device=visual.device)[valid]
            rows[sample, : candidates.numel()] = slot_of[candidates] if candidates.numel() else rows[sample, :0]
            is_rater[sample, : candidates.numel()] = flags
        attention = states.attention_rows(rows, is_rater)  # (B, R, M), zero at non-rater rows
        return attention.sum(dim=1) / is_rater.sum(dim=1, keepdim=True).clamp(min=1)

    def select(self, scores: torch.Tensor, visual: torch.Tensor, groups: torch.Tensor, stage: int = 0,
               original_visual: torch.Tensor | None = None, states: SelectionInputs | None = None,
               **_: Any) -> torch.Tensor:
        """Keep mask over the sequence the stage before boundary ``stage`` (0-based) left: the top
        ``counts(n)[stage]`` of its visual tokens by the raters' attention, n = the sample's original visual tokens.

        Parameters
        ----------
        scores
            (B, M) zeros (unused: SparseVLM ranks by the raters' attention, not the last token's).
        visual
            (B, M) bool: the visual tokens still present.
        groups
            (B, M) unused (one pool per sample).
        stage
            Boundary index, 0 for the first (which chooses the raters).
        original_visual
            (B, N) bool visual mask of the prompt; default ``visual``.
        states
            Given by the engine (``needs_states``): layer 0's input, the rows' attention, slot positions.
        """
        if states is None:
            raise TypeError("sparsevlm: select() needs states= (SelectionInputs); the engine passes them.")
        original = visual if original_visual is None else original_visual
        if stage == 0:
            self._raters = self._choose_raters(original, states)
        relation = self.relation(visual, states)
        keep = torch.tensor([self.counts(int(n))[stage] for n in original.sum(dim=1)], device=visual.device)
        keep_mask = top_k_keep_mask(relation, visual, torch.minimum(keep, visual.sum(dim=1)))
        self._merges = None
        if self.recycle:
            keep_mask, self._merges = self._recycle(relation, visual, keep_mask, states.hidden_states)
        return keep_mask

    def _recycle(self, relation: torch.Tensor, visual: torch.Tensor, keep: torch.Tensor,
                 hidden: torch.Tensor) -> tuple[torch.Tensor, list[list[tuple[int, torch.Tensor]]]]:
        """Keep each cluster's centre too and note its members (the official merge of the pruned tokens)."""
        keep = keep.clone()
        merges: list[list[tuple[int, torch.Tensor]]] = []
        positions = torch.arange(visual.shape[1], device=visual.device)
        for sample in range(visual.shape[0]):
            pruned = positions[visual[sample] & ~keep[sample]]
            recycled, clusters = recycled_counts(pruned.numel())
            if recycled == 0:
                merges.append([])
                continue
            chosen = pruned[torch.sort(relation[sample, pruned], descending=True, stable=True).indices[:recycled]]
            centres, assignment = dpc_knn_clusters(hidden[sample, chosen], clusters)
            keep[sample, chosen[centres]] = True
            merges.append([(int(chosen[centre]), chosen[assignment == index]) for index, centre in enumerate(centres)])
        return keep, merges

    def compress(
        self, hidden_states: torch.Tensor, selection: TokenSelection, compressor: nn.Module | None
    ) -> torch.Tensor:
        """The kept rows; with ``recycle`` each cluster centre's row is the mean of its cluster's rows (the official
        ``cluster_and_merge`` average, without its ``1e-6`` in the denominator)."""
        compressed = selection.gather(hidden_states, seq_dim=1, fill=0.0)
        merges, self._merges = self._merges, None  # one use: a replaced select (no plan) merges nothing
        if not merges:
            return compressed
        for sample, sample_merges in enumerate(merges):
            for centre, members in sample_merges:
                slot = (selection.index[sample] == centre) & selection.valid[sample]
                compressed[sample, slot] = hidden_states[sample, members].mean(dim=0).to(compressed.dtype)
        return compressed
