"""Compression methods, one file each; importing this package registers them all."""

from divico.methods.base import CompressionMethod, InputCompressionMethod, TextShape
from divico.methods.dart import DART
from divico.methods.deco import DeCo
from divico.methods.divico import DiViCo, GapEncoder, gaussian_kl
from divico.methods.divprune import DivPrune
from divico.methods.fastv import FastV
from divico.methods.pdrop import PyramidDrop
from divico.methods.pooling import AveragePooling
from divico.methods.random_selection import RandomSelection
from divico.methods.sparsevlm import SparseVLM
from divico.methods.visionzip import VisionZip

__all__ = [
    "AveragePooling", "CompressionMethod", "DeCo", "DiViCo", "DivPrune", "FastV", "GapEncoder",
    "InputCompressionMethod", "RandomSelection", "TextShape", "VisionZip", "gaussian_kl",
]
