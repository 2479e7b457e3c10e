"""The ``sparsevlm`` method (issue 19, item 5) against a reference written here from the published algorithm.

Paper: Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference" (ICML
2025). Official code: github.com/Gumpest/SparseVLMs, ``llava/model/language_model/modelling_sparse_llama.py``
(``LlamaModel.forward``: ``v_t = hidden_states[:, v_token_start:text_token_start]``, ``t_t = hidden_states[:,
text_token_start:]`` before the first layer, ``m_v_t = (v_t @ t_t^T).softmax(2).mean(1)``, raters ``m_v_t >
m_v_t.mean()``; ``pruning_loc = [2, 6, 15]``, the sparse layer's output pruned) and ``score.py``
(``attn_postprocess_topk``: attention mean over heads, rows of the raters, mean over them, ``topk`` of the visual
columns with ``sparse_token_dict[RETAIN_TOKN]``: 192 -> [300, 200, 110], 128 -> [303, 110, 36], 96 -> [238, 48,
26], 64 -> [66, 30, 17]).

The reference runs the *unmodified* eager model: ``output_hidden_states[0]`` (layer 0's input) chooses the raters;
at each sparse layer the eager ``output_attentions`` of the raters' rows, in a model whose layers from each earlier
boundary on cannot see the tokens pruned there (additive masks, positions unchanged), ranks the visual tokens left.
It shares no code with the engine (which shortens the sequence and computes only the rows it needs).
"""

from __future__ import annotations

import functools
from fractions import Fraction
from typing import Any

import pytest
import torch

import divico
from contract_cases import (
    check_batch_equals_singles, check_cache_lengths, check_keep_all, check_remove_restores, one_torch_thread,
)
from divico.efficiency import PromptShape, build_config, build_inputs, build_random_model, count_flops, measure_flops
from divico.methods.sparsevlm import scaled_boundaries, stage_counts
from divico.registry import get_method_class
from tiny_models import IMAGE_TOKEN_ID, llava_batch, llava_prompt, tiny_llava


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def llava() -> Any:
    return tiny_llava(seed=0, attn_implementation="eager")


def sparse_config(**options: Any) -> divico.CompressionConfig:
    return divico.CompressionConfig("sparsevlm", **{"keep_ratio": 0.25, **options})


# --- counts and schedule -----------------------------------------------------------------------------------------
def test_counts_are_the_official_tables_and_interpolate_between_them():
    # score.py's v1.5 sparse_token_dict, for LLaVA-1.5's 576 tokens.
    assert stage_counts(192, 576) == [300, 200, 110]
    assert stage_counts(128, 576) == [303, 110, 36]
    assert stage_counts(96, 576) == [238, 48, 26]
    assert stage_counts(64, 576) == [66, 30, 17]
    assert stage_counts(576, 576) == [576, 576, 576]
    # r = 4/16 = 1/4 lies a quarter of the way from 128/576 to 192/576: shares (303 - 3/4, 110 + 90/4, 36 + 74/4)/576.
    by_hand = [int(Fraction(c) / 576 * 16) for c in (Fraction(1209, 4), Fraction(265, 2), Fraction(109, 2))]
    assert stage_counts(4, 16) == by_hand == [8, 3, 1]
    # Below the first point the 64-table shares scale with r: 32/576 is half of 64/576.
    assert stage_counts(32, 576) == [33, 15, 8]
    # r = 1/8: shares (109, 34.5, 19.25)/576 of 8 tokens floor to (1, 0, 0): at least one token is kept.
    assert stage_counts(1, 8) == [1, 1, 1]


def test_schedule_scaling_and_options():
    assert scaled_boundaries(32) == [3, 7, 16]  # the outputs of the official sparse layers 2, 6, 15 are pruned
    assert scaled_boundaries(28) == [3, 6, 14]  # 1.75 -> 2, 5.25 -> 5, 13.125 -> 13
    assert scaled_boundaries(4) == [1, 2, 3]
    method = get_method_class("sparsevlm")(sparse_config(keep_tokens=192, keep_ratio=None))
    assert method.compression_layers(32) == [3, 7, 16] and method.first_compressed_layer == 3
    assert method.kept_visual_tokens(1, 576) == 110
    assert method.tokens_per_layer(32, 600, 576, 110) == [600] * 3 + [324] * 4 + [224] * 9 + [134] * 16
    with pytest.raises(ValueError, match=r"3 distinct boundaries in \[1, 2\]"):
        method.compression_layers(3)
    for config, message in [
        (lambda: sparse_config(per_frame_keep=True), "per_frame_keep"),
        (lambda: sparse_config(extra={"layers": [3, 2, 4]}), "strictly increasing"),
        (lambda: sparse_config(extra={"layers": [1, 2]}), "3 strictly"),
        (lambda: sparse_config(extra={"ratio": 0.5}), "unknown"),
        (lambda: sparse_config(extra={"recycle": 1}), "True or False"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_method_class("sparsevlm")(config())
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        get_method_class("sparsevlm")(sparse_config(extra={"layers": [1, 2, 4]})).compression_layers(4)


# --- the reference -------------------------------------------------------------------------------------------------
def masked_run(model: Any, inputs: dict[str, torch.Tensor], keeps: dict[int, torch.Tensor]) -> Any:
    """Eager forward with hidden states and attentions; layers in ``keeps`` (index -> (N,) bool) see only kept keys."""
    layers = model.model.language_model.layers
    length = inputs["input_ids"].shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    def hook(idx: int, module, args, kwargs):
        allowed = causal & keeps[idx][None, :]
        mask = torch.zeros(length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
        return args, {**kwargs, "attention_mask": mask[None, None]}

    handles = [layers[idx].register_forward_pre_hook(functools.partial(hook, idx), with_kwargs=True) for idx in keeps]
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()


def reference_raters(model: Any, inputs: dict[str, torch.Tensor], query: int) -> torch.Tensor:
    """Positions of the raters of one sample: text after the image up to ``query`` whose mean (over visual tokens)
    softmax relation exceeds the mean."""
    ids = inputs["input_ids"][0]
    embeddings = masked_run(model, inputs, {}).hidden_states[0][0]
    visual = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    text = torch.arange(int(visual.max()) + 1, query + 1)
    m_v_t = torch.softmax(embeddings[visual] @ embeddings[text].T, dim=1).mean(dim=0)
    return text[m_v_t > m_v_t.mean()]


def reference_stages(model: Any, inputs: dict[str, torch.Tensor], boundaries: list[int], counts: list[int],
                     query: int | None = None) -> list[list[int]]:
    """Kept visual positions after each boundary of one sample, from the algorithm."""
    ids = inputs["input_ids"][0]
    query = len(ids) - 1 if query is None else query
    raters = reference_raters(model, inputs, query)
    assert 0 < raters.numel() < query - int((ids == IMAGE_TOKEN_ID).nonzero().max())  # a real choice of raters
    visual = ids == IMAGE_TOKEN_ID
    keep = torch.ones_like(visual)
    keeps: dict[int, torch.Tensor] = {}
    stages = []
    for boundary, count in zip(boundaries, counts):
        attention = masked_run(model, inputs, dict(keeps)).attentions[boundary - 1][0]  # (H, N, N) sparse layer
        relation = attention.mean(dim=0)[raters].mean(dim=0)
        remaining = (visual & keep).nonzero().flatten()
        top = remaining[torch.sort(relation[remaining], descending=True, stable=True).indices[:count]]
        keep = ~visual
        keep[top] = True
        for idx in range(boundary, len(model.model.language_model.layers)):
            keeps[idx] = keep.clone()
        stages.append(sorted(top.tolist()))
    return stages


def engine_report(model: Any, inputs: dict[str, torch.Tensor], config: divico.CompressionConfig,
                  **kwargs: Any) -> Any:
    divico.apply_compression(model, config)
    try:
        with torch.no_grad():
            model(**inputs, **kwargs)
        return divico.last_report(model)
    finally:
        divico.remove_compression(model)


@pytest.mark.parametrize(("options", "boundaries"), [({}, [1, 2, 3]), ({"extra": {"layers": [1, 2, 3]},
                                                                         "keep_ratio": 0.5}, [1, 2, 3])])
def test_sparsevlm_keeps_the_reference_set_at_every_stage(llava, options, boundaries):
    inputs = llava_batch([llava_prompt(1, 5, 7, seed=1)])
    config = sparse_config(**options)
    report = engine_report(llava, inputs, config)
    counts = stage_counts(config.keep_count(64), 64)
    expected = reference_stages(llava, inputs, boundaries, counts)
    stages = report.extra["stages"]
    assert [stage["layer"] for stage in stages] == boundaries and report.layer == boundaries[0]
    assert [[int(p) for p in stage["kept_positions"][0]] for stage in stages] == expected
    assert [len(kept) for kept in expected] == counts and counts[-1] < counts[0] < 64
    assert [int(p) for p in report.kept_positions[0]] == expected[-1]


def test_sparsevlm_batch_equals_singles(llava):
    prompts = [llava_prompt(1, 5, 7, seed=1), llava_prompt(2, 3, 4, seed=2), llava_prompt(0, 9, 6, seed=3)]
    batch = llava_batch(prompts)
    batched = engine_report(llava, batch, sparse_config())
    for row, prompt in enumerate(prompts[:2]):
        shift = batch["input_ids"].shape[1] - len(prompt["ids"])
        alone = engine_report(llava, llava_batch([prompt]), sparse_config())
        for stage_batched, stage_alone in zip(batched.extra["stages"], alone.extra["stages"]):
            got = [int(p) - shift for p in stage_batched["kept_positions"][row] if p >= 0]
            assert got == [int(p) for p in stage_alone["kept_positions"][0]]


def test_sparsevlm_teacher_forcing_keeps_the_inference_stages(llava):
    """With labels the raters are the prompt's (the answer is no candidate) and each stage keeps what the prompt
    alone keeps."""
    inputs = llava_batch([llava_prompt(1, 5, 7, seed=1)])
    alone = engine_report(llava, inputs, sparse_config())
    answer = torch.tensor([[5, 6, 7]])
    extended = {"input_ids": torch.cat([inputs["input_ids"], answer], dim=1),
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1),
                "pixel_values": inputs["pixel_values"]}
    prompt_length = inputs["input_ids"].shape[1]
    labels = extended["input_ids"].masked_fill(torch.arange(extended["input_ids"].shape[1]) < prompt_length, -100)
    forced = engine_report(llava, extended, sparse_config(), labels=labels)
    for with_answer, without in zip(forced.extra["stages"], alone.extra["stages"]):
        assert torch.equal(with_answer["kept_positions"], without["kept_positions"])


# --- recycling -----------------------------------------------------------------------------------------------------
def reference_dpc_knn(tokens: torch.Tensor, num_clusters: int) -> tuple[list[int], list[int]]:
    """utils.py's ``cluster_and_merge`` clustering, element by element: distances / sqrt(C), density from the
    num_clusters nearest (self included), distance to the nearest denser token (max if none), centres by
    distance * density, each token to its nearest centre (ties to the earlier; no noise)."""
    count, channels = tokens.shape
    x = tokens.double()
    dist = [[float((x[i] - x[j]).norm()) / channels**0.5 for j in range(count)] for i in range(count)]
    density = [torch.tensor(sorted(row)[:num_clusters]).pow(2).mean().neg().exp().item() for row in dist]
    largest = max(max(row) for row in dist)
    parent = [min([dist[i][j] for j in range(count) if density[j] > density[i]] or [largest]) for i in range(count)]
    centres = sorted(range(count), key=lambda i: (-parent[i] * density[i], i))[:num_clusters]
    assignment = [min(range(num_clusters), key=lambda c: (dist[centres[c]][j], c)) for j in range(count)]
    for index, centre in enumerate(centres):
        assignment[centre] = index
    return centres, assignment


def reference_recycled(model: Any, inputs: dict[str, torch.Tensor], boundaries: list[int],
                       counts: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, list]]:
    """Logits of the unmodified model in which each stage's layers cannot see its pruned tokens and, at each
    boundary, each cluster centre's row is the mean of its cluster (the official merge), and the final keep mask."""
    ids = inputs["input_ids"][0]
    length = len(ids)
    raters = reference_raters(model, inputs, length - 1)
    visual = ids == IMAGE_TOKEN_ID
    layers = model.model.language_model.layers
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keeps: dict[int, torch.Tensor] = {}
    merges: dict[int, list[tuple[int, list[int]]]] = {}

    def hook(idx: int, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if idx in merges:
            hidden = hidden.clone()
            for centre, members in merges[idx]:
                hidden[0, centre] = hidden[0, members].mean(dim=0)
        mask = torch.zeros(length, length).masked_fill(~(causal & keeps[idx][None, :]), torch.finfo(torch.float32).min)
        kwargs = {**kwargs, "attention_mask": mask[None, None]}
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    def run() -> Any:
        handles = [layers[idx].register_forward_pre_hook(functools.partial(hook, idx), with_kwargs=True)
                   for idx in keeps]
        try:
            with torch.no_grad():
                return model(**inputs, output_attentions=True, output_hidden_states=True)
        finally:
            for handle in handles:
                handle.remove()

    keep = torch.ones_like(visual)
    for boundary, count in zip(boundaries, counts):
        out = run()
        relation = out.attentions[boundary - 1][0].mean(dim=0)[raters].mean(dim=0)
        remaining = (visual & keep).nonzero().flatten()
        order = remaining[torch.sort(relation[remaining], descending=True, stable=True).indices]
        top, pruned = order[:count], order[count:]  # pruned: by descending relation
        recycled = int(len(pruned) * 0.3) + 1
        chosen = pruned[:recycled]
        centres, assignment = reference_dpc_knn(out.hidden_states[boundary][0][chosen], recycled // 10 + 1)
        keep = ~visual
        keep[top] = True
        keep[chosen[centres]] = True
        merges[boundary] = [(int(chosen[centre]), [int(chosen[j]) for j in range(len(chosen)) if assignment[j] == c])
                            for c, centre in enumerate(centres)]
        for idx in range(boundary, len(layers)):
            keeps[idx] = keep.clone()
    return run().logits[0], keep, merges


def test_recycling_equals_the_merge_aware_reference(llava):
    inputs = llava_batch([llava_prompt(1, 5, 7, seed=1)])
    config = sparse_config(extra={"recycle": True})
    divico.apply_compression(llava, config)
    try:
        with torch.no_grad():
            logits = llava(**inputs).logits[0]
        report = divico.last_report(llava)
        method = divico.get_runtime(llava).method
    finally:
        divico.remove_compression(llava)
    counts = stage_counts(config.keep_count(64), 64)
    expected, keep, merges = reference_recycled(llava, inputs, [1, 2, 3], counts)
    visual = inputs["input_ids"][0] == IMAGE_TOKEN_ID
    assert report.kept_positions[0].tolist() == (keep & visual).nonzero().flatten().tolist()
    # 64 -> top 33 + clusters of int(0.3 * 31) + 1 = 10 -> 2; 35 -> 14 + (int(0.3 * 21) + 1 = 7 -> 1); 15 -> 6 + 1.
    assert [int(stage["num_kept"][0]) for stage in report.extra["stages"]] == method.present_counts(64) == [35, 15, 7]
    torch.testing.assert_close(logits[keep], expected[keep], atol=1e-5, rtol=0)
    # Not vacuous: some merged row averages several tokens, and the recycled run keeps another set than the plain one.
    assert any(len(members) > 1 for stage in merges.values() for _, members in stage)
    plain = engine_report(llava, inputs, sparse_config())
    assert plain.kept_positions[0].tolist() != report.kept_positions[0].tolist()


@pytest.mark.parametrize("check", [check_keep_all, check_cache_lengths, check_batch_equals_singles,
                                   check_remove_restores])
def test_recycling_keeps_the_engine_contract(check):
    """The contract checks that do not replace the selection hold with recycling on (Llava, SDPA); the oracle and
    the forced-selection decode check describe stages by kept sets only (the merge-aware reference above instead)."""
    check("sparsevlm", "LlavaForConditionalGeneration", "sdpa", extra={"recycle": True})


# --- FLOPs ---------------------------------------------------------------------------------------------------------
# No system prompt: every text token follows the images (the accounting's stated layout).
TINY_PROMPT = PromptShape(visual_tokens=72, text_tokens=9, system_tokens=0, batch_size=2, images=2)


@pytest.mark.parametrize(("recycle", "present"), [(False, [37, 25, 13]), (True, [39, 26, 14])])
def test_sparsevlm_flops_match_flop_counter(recycle, present):
    """Each stage's layers at the stage's length, the rater product and every candidate row's logits per boundary.
    With recycling: 72 - 37 = 35 pruned -> int(10.5) + 1 = 11 recycled -> 2 clusters; 39 - 25 = 14 -> 5 -> 1;
    26 - 13 = 13 -> 4 -> 1 (the clustering's distances are no matrix product: FlopCounterMode counts none)."""
    config = build_config("tiny-llava")
    model = build_random_model(config, seed=0)
    inputs = build_inputs(config, TINY_PROMPT, seed=0)
    # k = 24 of 72: the 192/576 shares; explicit boundaries (equal to the default scaled to 4 layers).
    sparse_cfg = divico.CompressionConfig("sparsevlm", keep_ratio=1 / 3, extra={"layers": [1, 2, 3],
                                                                              "recycle": recycle})
    measured = {}
    for name, cfg in (("none", None), ("sparsevlm", sparse_cfg)):
        if cfg is not None:
            divico.apply_compression(model, cfg)
        try:
            with torch.inference_mode():
                measured[name], _ = measure_flops(lambda: model(**inputs, logits_to_keep=1))
            if cfg is not None:
                stages = divico.last_report(model).extra["stages"]
                # 300/576 * 72 = 37.5, 200/576 * 72 = 25, 110/576 * 72 = 13.75
                assert [stage["num_kept"].tolist() for stage in stages] == [[count] * 2 for count in present]
        finally:
            divico.remove_compression(model)
    analytic = count_flops(config, TINY_PROMPT, compression=sparse_cfg, attention="dense")
    analytic_none = count_flops(config, TINY_PROMPT, method="none", attention="dense")
    length = TINY_PROMPT.seq_len
    assert analytic.per_layer == [length] + [length - 72 + count for count in present]
    text = model.model.language_model.config
    head_dim = text.hidden_size // text.num_attention_heads
    per_key = 2 * text.num_attention_heads * head_dim
    rows = TINY_PROMPT.text_tokens
    batch = TINY_PROMPT.batch_size
    assert analytic.compressor == batch * 2 * 72 * rows * text.hidden_size  # the raters (n_v x d) x (d x n_t)
    assert analytic.scoring == batch * per_key * rows * (length + (length - 72 + present[0])
                                                         + (length - 72 + present[1]))
    assert analytic_none.total - analytic.total == measured["none"] - measured["sparsevlm"]
