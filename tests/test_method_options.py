"""Methods' ``extra`` options: unknown keys refused by the shared check, layer schedules validated."""

from __future__ import annotations

import re

import divico
import pytest
from divico.methods.base import increasing_layers
from divico.registry import get_method_class


@pytest.mark.parametrize("method, valid", [("dart", ["pivot_image_tokens", "pivot_text_tokens"]),
                                           ("pdrop", ["layers"]), ("sparsevlm", ["layers", "recycle"])])
def test_unknown_extra_options_are_refused_naming_the_valid_ones(method, valid):
    config = divico.CompressionConfig(method, keep_ratio=0.5, extra={"nope": 1})
    with pytest.raises(ValueError, match=re.escape(f"{method}: unknown extra options ['nope']; valid: {valid!r}.")):
        get_method_class(method)(config)


def test_layer_schedules_must_be_strictly_increasing_integers_from_1():
    assert increasing_layers([2, 8, 16]) == [2, 8, 16] and increasing_layers((1,)) == [1]
    for bad in ([], [0, 4], [4, 2], [2, 2], [2, 3.0], [True, 2], "2,3", None):
        assert increasing_layers(bad) is None, bad
    with pytest.raises(ValueError, match=r"pdrop: extra\['layers'\] must be a non-empty, strictly increasing"):
        get_method_class("pdrop")(divico.CompressionConfig("pdrop", keep_ratio=0.5, extra={"layers": [8, 4]}))
    with pytest.raises(ValueError, match=r"sparsevlm: extra\['layers'\] must be 3 strictly increasing"):
        get_method_class("sparsevlm")(divico.CompressionConfig("sparsevlm", keep_ratio=0.5, extra={"layers": [2, 4]}))
    assert get_method_class("pdrop")(divico.CompressionConfig("pdrop", keep_ratio=0.5,
                                                              extra={"layers": [4, 8]})).explicit_layers == [4, 8]
