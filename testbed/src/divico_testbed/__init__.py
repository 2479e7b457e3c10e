"""divico-testbed: divico's default small vision-language model and the application built around it.

The library (:mod:`divico`) compresses any supported model; this package holds what is specific to the default
model: its offline build from packaged pretrained weights (:mod:`divico_testbed.default_model`,
:mod:`divico_testbed.packaged`), its training recipe and shipped weights (:mod:`divico_testbed.recipe`,
``assets/``), the generated mini-benchmarks (:mod:`divico_testbed.data`), their evaluation
(:mod:`divico_testbed.evaluation`) and the demo (:mod:`divico_testbed.demo`). Its commands (``divico demo``,
``build-default``, ``make-data``, ``retrain-default``) reach the ``divico`` CLI through the ``divico.commands``
entry-point group.
"""

from divico_testbed.default_model import (
    DEFAULT_IMAGE_SIZE,
    build_default_model,
    default_cache_root,
    default_model_available,
    default_model_dir,
    load_default_model,
    num_visual_tokens,
)
from divico_testbed.packaged import PIP_INSTALL_COMMANDS, PackagedWeightsMissingError, packaged_weights_available

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "PIP_INSTALL_COMMANDS",
    "PackagedWeightsMissingError",
    "build_default_model",
    "default_cache_root",
    "default_model_available",
    "default_model_dir",
    "load_default_model",
    "num_visual_tokens",
    "packaged_weights_available",
]
