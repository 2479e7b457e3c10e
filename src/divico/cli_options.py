"""Command-line options shared by the ``divico`` commands: compression, model loading, dtype and device.

``divico train``, ``divico eval`` and ``divico generate`` describe a compression the same way (``--method``,
``--keep-ratio`` / ``--keep-tokens``, ``--layer``, ``--encoder``; eval and generate add ``--compressor DIR``). This
module lives beside :mod:`divico.cli`, not in :mod:`divico.commands`, whose every module is a command.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from divico.config import DEFAULT_SELECTOR, ENCODER_CHOICES, CompressionConfig, selector_choices
from divico.evaluation.runner import BASELINE, EvalConfiguration
from divico.perturbation import NOISE_KINDS, NoiseConfig
from divico.registry import available_methods

__all__ = [
    "DTYPES",
    "add_compression_arguments",
    "add_inference_compression_arguments",
    "add_model_arguments",
    "add_noise_arguments",
    "compression_from_args",
    "configuration_from_args",
    "noise_from_args",
    "resolve_device",
    "resolve_dtype",
]

#: ``--dtype`` choices and the torch dtypes they name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_compression_arguments(
    parser: argparse.ArgumentParser,
    *,
    methods: Sequence[str],
    default_method: str | None,
    method_help: str,
    keep_ratio_help: str,
    with_compressor: bool,
) -> None:
    """Add ``--method``, ``--encoder``, ``--keep-ratio`` | ``--keep-tokens``, ``--layer``, ``--selector`` (and
    ``--compressor``).

    Parameters
    ----------
    parser
        The command's parser.
    methods
        Valid ``--method`` values.
    default_method
        ``--method``'s default; None means "no compression unless --method or --compressor is given".
    method_help, keep_ratio_help
        Help texts (the defaults differ between training and evaluation).
    with_compressor
        Add ``--compressor DIR`` (a trained compressor written by ``divico train`` / ``divico.save_compressor``).
    """
    parser.add_argument("--method", default=default_method, choices=list(methods), help=method_help)
    parser.add_argument("--encoder", default="variational", choices=ENCODER_CHOICES,
                        help="DiViCo's gap encoder: variational (paper), deterministic (Fig. 8 b), none (Fig. 8 a)")
    keep = parser.add_mutually_exclusive_group()
    keep.add_argument("--keep-ratio", type=float, default=None, help=keep_ratio_help)
    keep.add_argument("--keep-tokens", type=int, default=None, help="visual tokens kept per sample")
    parser.add_argument("--layer", type=int, default=2, help="K, the first compressed decoder layer (default 2)")
    parser.add_argument("--selector", default=DEFAULT_SELECTOR, choices=selector_choices(),
                        help="which tokens DiViCo keeps before g_theta fills the gap: attention (paper: the last "
                        "prompt token's attention top-k) or a layer-level method's selection (e.g. random, fastv)")
    if with_compressor:
        parser.add_argument("--compressor", type=Path, default=None, metavar="DIR",
                            help="trained compressor folder (config.json + weights, from divico train); alone it "
                            "brings its own method, rate and layer, with --method/--keep-ratio those given")



def add_inference_compression_arguments(parser: argparse.ArgumentParser) -> None:
    """The compression options of the inference commands (``eval``, ``generate``): any registered method, none by
    default (the uncompressed model), and ``--compressor DIR``."""
    add_compression_arguments(
        parser, methods=available_methods(), default_method=None,
        method_help="compression method (default: none, the uncompressed model)",
        keep_ratio_help="share of visual tokens kept, in (0, 1] (default with --method: 64/576 = 0.111)",
        with_compressor=True,
    )

def compression_from_args(args: argparse.Namespace, *, default_keep_ratio: float | None) -> CompressionConfig | None:
    """The :class:`CompressionConfig` the compression options describe, or None for the uncompressed model.

    ``--method`` without ``--keep-ratio`` / ``--keep-tokens`` keeps ``default_keep_ratio``. Without ``--method``
    the result is None (with ``--compressor`` the saved config applies then).

    Raises
    ------
    ValueError
        ``--keep-ratio`` / ``--keep-tokens`` / a non-default ``--encoder`` without ``--method`` or ``--compressor``,
        or values the config refuses (the message names them and the valid range).
    """
    compressor = getattr(args, "compressor", None)
    selector = getattr(args, "selector", DEFAULT_SELECTOR)
    if args.method is None:
        rate_given = args.keep_ratio is not None or args.keep_tokens is not None
        if compressor is None and (rate_given or args.encoder != "variational" or selector != DEFAULT_SELECTOR):
            raise ValueError("--keep-ratio, --keep-tokens, --encoder and --selector need --method (or --compressor "
                             "DIR); without them the model runs uncompressed.")
        if compressor is not None and rate_given:
            raise ValueError("--keep-ratio / --keep-tokens with --compressor need --method too (the compressor's "
                             "method), so the rate applies to it.")
        return None
    given = args.keep_ratio is not None or args.keep_tokens is not None
    if not given and default_keep_ratio is None:
        raise ValueError(f"--method {args.method} needs --keep-ratio or --keep-tokens.")
    return CompressionConfig(method=args.method, keep_ratio=args.keep_ratio if given else default_keep_ratio,
                             keep_tokens=args.keep_tokens, layer=args.layer, encoder=args.encoder, selector=selector)


def configuration_from_args(args: argparse.Namespace, *, default_keep_ratio: float | None) -> EvalConfiguration:
    """The :class:`~divico.evaluation.runner.EvalConfiguration` of the compression options (``--compressor``
    included), named as its ``--compare`` form would be: ``baseline``, ``METHOD@KEEP`` or the compressor's folder.

    Raises
    ------
    ValueError
        As :func:`compression_from_args`.
    """
    compression = compression_from_args(args, default_keep_ratio=default_keep_ratio)
    compressor = getattr(args, "compressor", None)
    if compression is None:
        return EvalConfiguration(BASELINE) if compressor is None else EvalConfiguration(Path(compressor).name,
                                                                                       compressor=Path(compressor))
    keep = f"{compression.keep_ratio:g}" if compression.keep_ratio is not None else str(compression.keep_tokens)
    return EvalConfiguration(f"{compression.method}@{keep}", compression=compression,
                             compressor=None if compressor is None else Path(compressor))


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--noise-sigma``, ``--noise-kind`` and ``--noise-seed`` (the paper's perturbation, Table II)."""
    parser.add_argument("--noise-sigma", type=float, default=0.0, metavar="SIGMA",
                        help="add SIGMA x standard-Gaussian noise to the visual input (default 0: clean)")
    parser.add_argument("--noise-kind", default="features", choices=NOISE_KINDS,
                        help="where the noise goes: features (the projector's output, the paper's; default) or "
                        "pixels (the processor's normalised pixel values)")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise (default 0)")


def noise_from_args(args: argparse.Namespace) -> NoiseConfig | None:
    """The :class:`~divico.perturbation.NoiseConfig` of the noise options, or None when ``--noise-sigma`` is 0.

    Raises
    ------
    ValueError
        A negative or non-finite sigma, or a negative seed (the message names the value).
    """
    if args.noise_sigma == 0:
        NoiseConfig(0.0, args.noise_kind, args.noise_seed)  # validates the kind and seed all the same
        return None
    return NoiseConfig(args.noise_sigma, args.noise_kind, args.noise_seed)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model`` (required), ``--dtype`` and ``--device``."""
    parser.add_argument("--model", required=True,
                        help="model folder or hub id (from_pretrained), or a registered name such as 'default' (the "
                        "testbed's embedded default model)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="parameter dtype (default float32; bfloat16 is faster only on CPUs/GPUs with bf16 units)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: the process's accelerator under "
                        "accelerate launch, else cuda if available, else cpu)")


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` value.

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`DTYPES`.
    """
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; valid: {', '.join(sorted(DTYPES))}.")
    return DTYPES[name]


def resolve_device(requested: str | None, process_device: Any = None) -> torch.device:
    """``--device`` if given, else the device accelerate assigned to this process, else cuda / cpu.

    Raises
    ------
    ValueError
        If ``requested`` is not a valid torch device string.
    """
    if requested is not None:
        try:
            return torch.device(requested)
        except RuntimeError as error:
            raise ValueError(f"--device {requested!r} is not a torch device (e.g. cpu, cuda, cuda:1): {error}") from None
    if process_device is not None:
        return torch.device(process_device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
