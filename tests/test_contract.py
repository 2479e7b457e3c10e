"""The contract matrix: every registered method x every registered model class x {sdpa, eager}.

The lists are read from the registries when this file is collected, so a method or model family registered by
``divico`` joins the matrix without editing this file (a model class without a tiny builder in
``tests/contract_cases.py`` fails loudly). What each cell guarantees is documented on the check functions in
``tests/contract_cases.py``; ``tests/test_adding_a_method.py`` runs the same checks on a method defined there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import divico
from contract_cases import (
    ATTN_IMPLEMENTATIONS,
    FAMILIES,
    MIXED,
    ATOL_REORDER,
    adapter_class,
    batch_of,
    check_batch_equals_singles,
    check_cache_lengths,
    check_cached_decode,
    check_keep_all,
    check_oracle,
    check_remove_restores,
    check_save_load,
    check_scores,
    compress_config,
    family,
    fresh,
    hook_snapshot,
    is_layer_level,
    one_torch_thread,
    pristine,
    scores_apply,
    supports,
)
from divico.registry import adapter_classes, get_method_class
from tiny_models import randomize_compressor

# Read once, at collection: the parametrisation below is fixed before any test runs, so a method that a test
# registers while it runs (tests/test_adding_a_method.py) never joins this matrix.
METHODS = divico.available_methods()
MODELS = divico.available_models()


def cells(applies=lambda method: True) -> list:
    """(method, model class, attn) for every registered method that ``applies``, every model class whose adapter
    supports it (:func:`contract_cases.supports`; the other pairs are :func:`refused_pairs`), both kernels."""
    return [pytest.param(method, model_class, attn, id=f"{method}-{model_class}-{attn}")
            for method in METHODS if applies(method)
            for model_class in MODELS if supports(method, model_class)
            for attn in ATTN_IMPLEMENTATIONS]


def refused_pairs() -> list:
    """(method, model class) for every method whose required capabilities the model's adapter lacks."""
    return [pytest.param(method, model_class, id=f"{method}-{model_class}")
            for method in METHODS for model_class in MODELS if not supports(method, model_class)]


CELL = ("method", "model_class", "attn")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def test_matrix_covers_exactly_the_registries():
    """Guards the parametrisation: no method was registered or removed between collection and run (a toy method
    leaking from another test file would show here), and every adapter class has a model class in the matrix."""
    assert METHODS == divico.available_methods()
    assert MODELS == divico.available_models()
    served = {name for cls in adapter_classes() for name in cls.model_classes}
    assert served == set(MODELS)
    assert sorted(FAMILIES) == MODELS, "tests/contract_cases.py FAMILIES has a builder for an unregistered class"


@pytest.mark.parametrize("model_class", MODELS)
def test_tiny_family_exists_and_sdpa_equals_eager_weights(model_class):
    """Every registered class has a tiny builder, and its sdpa and eager models share weights (the eager model is
    the attention reference of the sdpa cells)."""
    family(model_class)
    sdpa, eager = pristine(model_class, "sdpa").state_dict(), pristine(model_class, "eager").state_dict()
    assert sdpa.keys() == eager.keys()
    assert all(torch.equal(sdpa[key], eager[key]) for key in sdpa)


@pytest.mark.parametrize(CELL, cells())
def test_keep_all_is_bit_identical(method, model_class, attn):
    check_keep_all(method, model_class, attn)


@pytest.mark.parametrize(CELL, cells(scores_apply))
def test_scores_equal_eager_attention(method, model_class, attn):
    check_scores(method, model_class, attn)


@pytest.mark.parametrize(CELL, cells())
def test_kv_cache_lengths_match_the_accounting(method, model_class, attn):
    check_cache_lengths(method, model_class, attn)


@pytest.mark.parametrize(CELL, cells())
def test_cached_decode_equals_uncached_forward(method, model_class, attn):
    check_cached_decode(method, model_class, attn)


@pytest.mark.parametrize(CELL, cells())
def test_batch_equals_single_runs(method, model_class, attn):
    check_batch_equals_singles(method, model_class, attn)


@pytest.mark.parametrize(CELL, cells())
def test_save_load_round_trip(method, model_class, attn, tmp_path: Path):
    check_save_load(method, model_class, attn, tmp_path)


@pytest.mark.parametrize(CELL, cells())
def test_remove_and_context_manager_restore(method, model_class, attn):
    check_remove_restores(method, model_class, attn)


@pytest.mark.parametrize(CELL, cells(is_layer_level))
def test_matches_masked_oracle(method, model_class, attn):
    check_oracle(method, model_class, attn)


@pytest.mark.parametrize(("method", "model_class"), refused_pairs())
def test_unsupported_pairs_are_refused_with_the_missing_capability(method, model_class):
    """A method the family cannot serve fails at apply_compression, naming what is missing and what works instead,
    and leaves the model unmodified (no hook, no attribute)."""
    model = fresh(model_class, "sdpa")
    missing = sorted(get_method_class(method).required_capabilities - adapter_class(model_class).capabilities)
    with pytest.raises(TypeError, match=rf"Method '{method}' needs {missing[0]}.*methods for this model: .*fastv"):
        divico.apply_compression(model, compress_config(method))
    assert divico.get_runtime(model) is None
    assert hook_snapshot(model) == hook_snapshot(pristine(model_class, "sdpa"))


@pytest.mark.parametrize("attn", ATTN_IMPLEMENTATIONS)
@pytest.mark.parametrize("model_class", MODELS)
def test_untrained_divico_equals_fastv(model_class, attn):
    """DiViCo's g_theta starts at zero: untrained, it is FastV's selection exactly (same kept set, same logits), so
    the oracle above holds for it with a zero gap; a trained (randomised) one differs only through the gap."""
    inputs = batch_of(model_class, MIXED)
    outputs = {}
    for method in ("fastv", "divico"):
        model = fresh(model_class, attn)
        divico.apply_compression(model, compress_config(method))
        with torch.no_grad():
            outputs[method] = (model(**inputs).logits, divico.last_report(model).kept_positions)
    assert torch.equal(outputs["fastv"][0], outputs["divico"][0])
    assert torch.equal(outputs["fastv"][1], outputs["divico"][1])


@pytest.mark.parametrize("model_class", MODELS)
def test_sdpa_and_eager_compress_identically(model_class):
    """The two kernels keep the same tokens and give the same logits (to summation order) for every method, with
    the same randomised compressor state."""
    inputs = batch_of(model_class, MIXED)
    for method in (m for m in METHODS if supports(m, model_class)):
        outputs = {}
        for attn in ATTN_IMPLEMENTATIONS:
            model = fresh(model_class, attn)
            torch.manual_seed(0)  # the same initial compressor (g_theta's first layer is randomly initialised)
            divico.apply_compression(model, compress_config(method))
            randomize_compressor(model, seed=5)
            with torch.no_grad():
                outputs[attn] = (model(**inputs).logits[:, -1], divico.last_report(model).kept_positions)
        torch.testing.assert_close(outputs["sdpa"][0], outputs["eager"][0], atol=ATOL_REORDER, rtol=0)
        assert torch.equal(outputs["sdpa"][1], outputs["eager"][1]), method
