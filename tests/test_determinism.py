"""A loaded compressor is deterministic (issues 17 and 21): every module divico adds follows the model's train/eval
mode, so LoRA dropout and g_theta's sampling never run at inference.

The checkpoint comes from the real training entry point with ``lora_dropout > 0`` (its modules were in training
mode when it was saved). ``tiny_llava()`` reseeds the global RNG, so both models are built *before* anything runs
and no call reseeds between the forwards compared: a dropout mask left active would differ from call to call.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

import divico
from contract_cases import one_torch_thread
from divico.lora import inject_lora, lora_target_regex
from divico.training import train
from test_training import config_for, tiny_processor, write_color_data
from tiny_models import make_batch, prompt_ids, tiny_llava

LORA_DROPOUT = 0.3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One step of DiViCo training (LoRA r=4, dropout 0.3) on the tiny colour data."""
    root = tmp_path_factory.mktemp("determinism")
    data, images = write_color_data(root, count=4)
    config = config_for(root, data, images, lora_dropout=LORA_DROPOUT, max_steps=1, per_device_batch_size=2)
    result = train(tiny_llava(), tiny_processor(), config)
    return Path(result.output_dir)


def inputs() -> dict[str, torch.Tensor]:
    return make_batch([prompt_ids(1, 5, 7, seed=1), prompt_ids(0, 9, 6, seed=3)], [1, 0])


def modules_in_training_mode(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if module.training]


def test_loaded_checkpoint_has_no_module_in_training_mode_and_repeats_exactly(trained: Path):
    first, second = tiny_llava(), tiny_llava()  # both built (and the RNG reseeded) before any forward
    assert not first.training and not second.training
    divico.load_compressor(first, trained)
    divico.load_compressor(second, trained)
    lora_layers = [m for m in first.modules() if isinstance(m, LoraLayer)]
    assert lora_layers and float(lora_layers[0].lora_dropout["default"].p) == LORA_DROPOUT
    assert modules_in_training_mode(first) == []
    assert modules_in_training_mode(second) == []
    batch = inputs()
    with torch.no_grad():
        once = first(**batch).logits
        twice = first(**batch).logits
        other_load = second(**batch).logits
    assert torch.equal(once, twice), "two calls of one loaded model differ"
    assert torch.equal(once, other_load), "two loads of one checkpoint differ"
    # Not vacuous: in training mode the same model is random (LoRA dropout, g_theta's sampling) ...
    first.train()
    with torch.no_grad():
        noisy = first(**batch).logits
    assert not torch.equal(noisy, once)
    # ... and back in eval mode it is the loaded model again.
    first.eval()
    with torch.no_grad():
        assert torch.equal(first(**batch).logits, once)


def test_added_modules_follow_a_model_in_training_mode(trained: Path):
    """The same rule the other way round: loading onto a model being trained leaves LoRA and g_theta training."""
    model = tiny_llava().train()
    divico.load_compressor(model, trained)
    lora_layers = [name for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert lora_layers and set(lora_layers) <= set(modules_in_training_mode(model))
    assert divico.get_runtime(model).compressor.training


def test_lora_injected_into_a_compressed_eval_model_stays_in_eval_mode():
    """inject_lora on a compressed model removes and re-applies the compression: nothing may come back training."""
    model = tiny_llava()
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.25, layer=2))
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=lora_target_regex(model, ["q_proj"]))
    inject_lora(model, config)
    assert modules_in_training_mode(model) == []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # B = 0 would hide dropout
        batch = inputs()
        assert torch.equal(model(**batch).logits, model(**batch).logits)
