"""divico: visual-token compression (DiViCo, FastV, DeCo) inside unmodified Hugging Face vision-language models.

>>> cfg = divico.CompressionConfig(method="divico", keep_ratio=64 / 576, layer=2)
>>> model = divico.apply_compression(model, cfg)
>>> out = model.generate(**inputs)
>>> divico.last_report(model).kept_positions
"""

from divico.adapters.base import available_models
from divico.api import apply_compression, compression_config, get_runtime, last_report, remove_compression
from divico.config import CompressionConfig
from divico.io import load_compressor, save_compressor
from divico.registry import available_methods, register_method
from divico.report import CompressionReport

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "apply_compression",
    "available_methods",
    "available_models",
    "compression_config",
    "get_runtime",
    "last_report",
    "load_compressor",
    "register_method",
    "remove_compression",
    "save_compressor",
]
