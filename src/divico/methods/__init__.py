"""Compression methods, one file each; importing this package registers them all."""

from divico.methods.base import CompressionMethod, InputCompressionMethod, TextShape
from divico.methods.deco import DeCo
from divico.methods.divico import DiViCo, GapEncoder, gaussian_kl
from divico.methods.fastv import FastV
from divico.methods.pooling import AveragePooling
from divico.methods.random_selection import RandomSelection

__all__ = [
    "AveragePooling", "CompressionMethod", "DeCo", "DiViCo", "FastV", "GapEncoder", "InputCompressionMethod",
    "RandomSelection", "TextShape", "gaussian_kl",
]
