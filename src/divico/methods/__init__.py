"""Compression methods, one file each; importing this package registers them all."""

from divico.methods.base import CompressionMethod, InputCompressionMethod, TextShape
from divico.methods.deco import DeCo
from divico.methods.divico import DiViCo, GapEncoder, gaussian_kl
from divico.methods.fastv import FastV

__all__ = ["CompressionMethod", "DeCo", "DiViCo", "FastV", "GapEncoder", "InputCompressionMethod", "TextShape", "gaussian_kl"]
