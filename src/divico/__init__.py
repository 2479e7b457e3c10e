"""divico: visual-token compression (DiViCo, FastV, DeCo) inside unmodified Hugging Face vision-language models.

>>> cfg = divico.CompressionConfig(method="divico", keep_ratio=64 / 576, layer=2)
>>> model = divico.apply_compression(model, cfg)
>>> out = model.generate(**inputs)
>>> divico.last_report(model).kept_positions
"""

from divico import adapters, methods  # noqa: F401  (importing them registers every shipped method and adapter)
from divico.api import (
    apply_compression,
    compressed,
    compression_config,
    get_runtime,
    last_report,
    remove_compression,
)
from divico.checkpoint import load_compressor, save_compressor
from divico.config import CompressionConfig
from divico.registry import available_methods, available_models, register_adapter, register_method
from divico.report import CompressionReport

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "apply_compression",
    "available_methods",
    "available_models",
    "compressed",
    "compression_config",
    "get_runtime",
    "last_report",
    "load_compressor",
    "register_adapter",
    "register_method",
    "remove_compression",
    "save_compressor",
]
