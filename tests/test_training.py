"""Tests of divico.training: LLaVA data, loss = LM + beta * KL, what is trained, resume, save/load, the CLI.

Everything runs on the tiny random LLaVA of tests/tiny_models.py with a matching tiny word-level tokenizer and
32 px PNGs written to tmp_path.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import IMAGE_TOKEN_ID, TOKENS_PER_IMAGE, VOCAB_SIZE, tiny_llava
from transformers import LlavaProcessor, PreTrainedTokenizerFast, TrainerCallback

import divico
from divico.methods.divico import gaussian_kl
from divico.training import (
    DataError,
    LeftPaddingCollator,
    LlavaJsonDataset,
    TrainingConfig,
    encode_conversation,
    train,
)
from divico.training.data import Turn
from divico.training.trainer import (
    DiViCoTrainer,
    build_training_arguments,
    prepare_model_for_training,
    visual_word_loss,
)

WORDS = [
    "what", "color", "is", "the", "shape", "a", "red", "blue", "green", "circle", "square", "how", "many", "one", "two",
]
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    # Two threads on a shared 2-core machine make these millisecond-sized steps 30x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_processor() -> LlavaProcessor:
    """Word-level tokenizer whose ids fit the tiny model (vocab 128, ``<image>`` = 120) + a 32 px image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), VOCAB_SIZE) if i != IMAGE_TOKEN_ID})
    vocab["<image>"] = IMAGE_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"], chat_template=CHAT_TEMPLATE,
    )
    square = {"height": 32, "width": 32}
    image_processor = CLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False)
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>", chat_template=CHAT_TEMPLATE,
    )


def write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[8:24, 8:24] = list(COLORS.values())[index % 3]
        names.append(f"{index}.png")
        Image.fromarray(pixels).save(folder / names[-1])
    return names


def write_color_data(root: Path, count: int = 8) -> tuple[Path, Path]:
    """``count`` one-image records asking the colour of the square; returns (data file, image folder)."""
    images = root / "images"
    names = write_images(images, count)
    records = [
        {"id": f"s{index}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nwhat color is the shape"},
            {"from": "gpt", "value": list(COLORS)[index % 3]},
        ]}
        for index, name in enumerate(names)
    ]
    data = root / "train.json"
    data.write_text(json.dumps(records, indent=1))
    return data, images


def config_for(root: Path, data: Path, images: Path, **overrides: Any) -> TrainingConfig:
    method = overrides.pop("method", "divico")
    encoder = overrides.pop("encoder", "variational")
    settings: dict[str, Any] = {
        "data_path": data, "image_folder": images, "output_dir": root / "out",
        "compression": divico.CompressionConfig(method=method, keep_ratio=0.25, layer=2, encoder=encoder),
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 5e-3, "warmup": 0,
        "lr_scheduler": "constant",
        "per_device_batch_size": 4, "max_steps": 4, "logging_steps": 1, "save_steps": 1000, "show_progress": False,
        "report_to": "none", "seed": 0,
    }
    settings.update(overrides)
    return TrainingConfig(**settings)


def trained_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = dict(load_file(str(folder / "compressor.safetensors")))
    tensors.update({f"lora.{k}": v for k, v in load_file(str(folder / "lora" / "adapter_model.safetensors")).items()})
    return tensors


# --- data ----------------------------------------------------------------------------------------------------------
def test_labels_keep_only_assistant_turns() -> None:
    processor = tiny_processor()
    turns = [
        Turn("user", "<image>\nwhat color is the shape"), Turn("assistant", "red"),
        Turn("user", "how many"), Turn("assistant", "one square"),
    ]
    image = Image.new("RGB", (32, 32))
    example = encode_conversation(processor, turns, [image])
    vocab = processor.tokenizer.get_vocab()
    start, end, user, assistant = (vocab[t] for t in ("<|im_start|>", "<|im_end|>", "user", "assistant"))
    words = [vocab[w] for w in ["what", "color", "is", "the", "shape"]]
    # Hand-built expectation: ChatML turns, 64 image tokens, labels = answer words + their <|im_end|>.
    expected_ids = (
        [start, user] + [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE + words + [end]
        + [start, assistant, vocab["red"], end]
        + [start, user, vocab["how"], vocab["many"], end]
        + [start, assistant, vocab["one"], vocab["square"], end]
    )
    assert example["input_ids"].tolist() == expected_ids
    first_answer = 2 + TOKENS_PER_IMAGE + len(words) + 1 + 2  # after the user turn and "<|im_start|> assistant"
    n = len(expected_ids)
    labelled = {first_answer, first_answer + 1, n - 3, n - 2, n - 1}  # red <|im_end|> ... one square <|im_end|>
    expected_labels = [token if i in labelled else -100 for i, token in enumerate(expected_ids)]
    assert example["labels"].tolist() == expected_labels
    assert example["pixel_values"].shape == (1, 3, 32, 32)


def test_collator_pads_on_the_left() -> None:
    examples = [
        {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": torch.ones(1, 3)},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])},
    ]
    batch = LeftPaddingCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert batch["pixel_values"].shape == (1, 3)


GOOD = {"id": "ok", "image": "0.png", "conversations": [
    {"from": "human", "value": "<image>\nwhat color"}, {"from": "gpt", "value": "red"}]}
BAD_RECORDS = {
    "missing image": ({"id": "bad", "image": "nope.png", "conversations": GOOD["conversations"]},
                      "image file not found"),
    "no <image> placeholder": ({"id": "bad", "image": "0.png", "conversations": [
        {"from": "human", "value": "what color"}, {"from": "gpt", "value": "red"}]}, "no <image>"),
    "empty conversation": ({"id": "bad", "image": "0.png", "conversations": []}, "empty conversation"),
    "no conversations": ({"id": "bad", "image": "0.png"}, "malformed record: no 'conversations'"),
    "unknown role": ({"id": "bad", "conversations": [{"from": "robot", "value": "hi"}]}, "'from'='robot'"),
    "value not text": ({"id": "bad", "conversations": [{"from": "gpt", "value": 3}]}, "'value' must be a string"),
    "no assistant turn": ({"id": "bad", "conversations": [{"from": "human", "value": "hi"}]}, "no assistant"),
    "placeholder without image": ({"id": "bad", "conversations": GOOD["conversations"]}, "1 <image> placeholder"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_each_bad_record_raises_an_error_naming_id_and_line(tmp_path: Path, case: str) -> None:
    write_images(tmp_path, 1)
    record, problem = BAD_RECORDS[case]
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"train\.jsonl:3: record id='bad': .*{problem}") as info:
        LlavaJsonDataset(data, tiny_processor(), tmp_path)
    assert (info.value.line, info.value.record_id) == (3, "bad")


def test_malformed_json_and_non_object_records_name_their_line(tmp_path: Path) -> None:
    write_images(tmp_path, 1)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: record \(no id\): malformed record: not valid JSON"):
        LlavaJsonDataset(data, tiny_processor(), tmp_path)
    listing = tmp_path / "train.json"
    listing.write_text("[\n" + json.dumps(GOOD) + ",\n\n  [1, 2]\n]")
    with pytest.raises(DataError, match=r"train\.json:4: .*expected a JSON object, got list"):
        LlavaJsonDataset(listing, tiny_processor(), tmp_path)


def test_skip_invalid_leaves_bad_records_out_and_counts_them(tmp_path: Path) -> None:
    write_images(tmp_path, 1)
    data = tmp_path / "train.json"
    bad = [record for record, _ in BAD_RECORDS.values()]
    data.write_text(json.dumps([GOOD, *bad, GOOD]))
    dataset = LlavaJsonDataset(data, tiny_processor(), tmp_path, skip_invalid=True)
    assert len(dataset) == 2
    assert len(dataset.skipped) == len(bad)
    assert all(error.record_id == "bad" for error in dataset.skipped)


# --- visual word targets -------------------------------------------------------------------------------------------
def _visual_words_record(record_id: str, words: Any) -> dict[str, Any]:
    return {**GOOD, "id": record_id, "visual_words": words}


def test_visual_words_become_first_word_tokens_weights_and_padded_batches(tmp_path: Path) -> None:
    write_images(tmp_path, 1)
    words = ["red square", ["blue circle", 0.5], "", ["green", 2]] + [""] * (TOKENS_PER_IMAGE - 4)
    data = tmp_path / "train.json"
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "what"}, {"from": "gpt", "value": "red"}]}
    data.write_text(json.dumps([_visual_words_record("w", words), GOOD, text_only]))
    processor = tiny_processor()
    dataset = LlavaJsonDataset(data, processor, tmp_path)
    vocab = processor.tokenizer.get_vocab()
    with_words, without = dataset[0], dataset[1]
    assert dataset[2]["visual_word_ids"].shape == (0, 1)
    assert with_words["visual_word_ids"].shape == (TOKENS_PER_IMAGE, 2)
    assert with_words["visual_word_ids"][:4].tolist() == [
        [vocab["red"], vocab["square"]], [vocab["blue"], vocab["circle"]], [-100, -100], [vocab["green"], -100]]
    assert with_words["visual_word_weights"][:4].tolist() == [1.0, 0.5, 0.0, 2.0]
    assert float(with_words["visual_word_weights"][4:].abs().sum()) == 0.0
    # A record without targets still carries (all-ignored) rows so batches stack in image-token order.
    assert without["visual_word_ids"].shape == (TOKENS_PER_IMAGE, 1)
    assert bool((without["visual_word_ids"] == -100).all()) and float(without["visual_word_weights"].sum()) == 0.0
    batch = LeftPaddingCollator(0)([without, dataset[2], with_words])
    assert batch["visual_word_ids"].shape == (2 * TOKENS_PER_IMAGE, 2)
    assert bool((batch["visual_word_ids"][:TOKENS_PER_IMAGE] == -100).all())
    assert torch.equal(batch["visual_word_ids"][TOKENS_PER_IMAGE:], with_words["visual_word_ids"])
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == batch["visual_word_ids"].shape[0]


@pytest.mark.parametrize("words, problem", [
    ("red", "'visual_words' must be a non-empty list, got str"),
    (["red", ["blue", -1]], r"'visual_words'\[1\] must be a string or a \[words, weight >= 0\] pair"),
    (["red", [3, 1.0]], r"'visual_words'\[1\] must be a string"),
])
def test_bad_visual_words_name_the_record(tmp_path: Path, words: Any, problem: str) -> None:
    write_images(tmp_path, 1)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([_visual_words_record("bad", words)]))
    with pytest.raises(DataError, match=rf"record id='bad': malformed record: {problem}"):
        LlavaJsonDataset(data, tiny_processor(), tmp_path)


def test_visual_words_must_match_the_visual_tokens(tmp_path: Path) -> None:
    write_images(tmp_path, 1)
    data = tmp_path / "train.json"
    data.write_text(json.dumps([_visual_words_record("short", ["red"] * 3)]))
    dataset = LlavaJsonDataset(data, tiny_processor(), tmp_path)
    with pytest.raises(DataError, match=f"visual_words has 3 entries but the prompt has {TOKENS_PER_IMAGE} visual"):
        dataset[0]
    text_only = {"id": "t", "visual_words": ["red"], "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]}
    data.write_text(json.dumps([text_only]))
    with pytest.raises(DataError, match="has 'visual_words' but no image"):
        LlavaJsonDataset(data, tiny_processor(), tmp_path)


def test_visual_word_loss_by_hand() -> None:
    vocab = 5
    logits = torch.randn(1, 4, vocab, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[7, 9, 9, 3]])
    word_ids = torch.tensor([[1, 2], [4, -100]])
    weights = torch.tensor([1.0, 0.5])
    log_probs = torch.log_softmax(logits[0], dim=-1)
    first = -(log_probs[1, 1] + log_probs[1, 2]) / 2
    second = -log_probs[2, 4]
    expected = (1.0 * first + 0.5 * second) / 1.5
    visual = input_ids == 9
    loss = visual_word_loss(logits, visual, word_ids, weights)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(visual_word_loss(logits, visual, word_ids, torch.zeros(2))) == 0.0
    with pytest.raises(ValueError, match="output has 3 positions for 4 inputs"):
        visual_word_loss(logits[:, :3], visual, word_ids, weights)
    with pytest.raises(ValueError, match="3 visual word targets for 2 visual tokens"):
        visual_word_loss(logits, visual, torch.ones(3, 1, dtype=torch.long), torch.ones(3))


def test_training_with_visual_words_adds_and_lowers_the_word_loss(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path, 8)
    records = json.loads(data.read_text())
    for index, record in enumerate(records):  # the square (centre 4x4 patches) shows its colour word
        colour = list(COLORS)[index % 3]
        record["visual_words"] = [colour + " square" if 2 <= r < 6 and 2 <= c < 6 else ["background", 0.2]
                                  for r in range(8) for c in range(8)]
    data.write_text(json.dumps(records))
    processor = tiny_processor()
    keep_all = divico.CompressionConfig(method="deco", keep_ratio=1.0)
    config = config_for(tmp_path, data, images, compression=keep_all, visual_word_weight=0.7)
    model = tiny_llava()
    runtime = prepare_model_for_training(model, config)
    dataset = LlavaJsonDataset(data, processor, images)
    trainer = DiViCoTrainer(
        model=model, args=build_training_arguments(config), train_dataset=dataset,
        data_collator=LeftPaddingCollator(0), runtime=runtime, beta=0.0, visual_word_weight=0.7,
    )
    batch = LeftPaddingCollator(0)([dataset[i] for i in range(4)])
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    word = visual_word_loss(outputs.logits, batch["input_ids"] == IMAGE_TOKEN_ID, batch["visual_word_ids"],
                            batch["visual_word_weights"])
    assert float(word.detach()) > 0
    assert float(loss.detach()) == pytest.approx(float(outputs.loss.detach()) + 0.7 * float(word.detach()), rel=1e-5)
    # Logged means are over each logging window (from its micro-batches only), each reset on its own.
    trainer.log({"loss": 0.0})  # empties the window of the compute_loss above
    for name, value in (("kl", 1.0), ("kl", 2.0), ("sigma_mean", 0.25)):
        trainer.record(name, value)
    trainer.log({"loss": 1.0})
    for name, value in (("kl", 0.5), ("visual_word_loss", 1.0), ("visual_word_loss", 2.0), ("visual_word_loss", 3.0)):
        trainer.record(name, value)
    trainer.log({"loss": 1.0})
    first, second = trainer.state.log_history[-2:]
    assert (first["kl"], first["beta"], first["sigma_mean"], "visual_word_loss" in first) == (1.5, 0.0, 0.25, False)
    assert (second["kl"], second["visual_word_loss"], "sigma_mean" in second) == (0.5, 2.0, False)

    result = train(tiny_llava(), processor, config_for(
        tmp_path, data, images, compression=keep_all, visual_word_weight=1.0, max_steps=30, lora_r=8))
    logged = [entry["visual_word_loss"] for entry in result.log_history if "visual_word_loss" in entry]
    assert len(logged) == 30
    assert sum(logged[-5:]) / 5 < 0.5 * sum(logged[:5]) / 5


# --- loss ----------------------------------------------------------------------------------------------------------
def test_gaussian_kl_matches_closed_form_on_hand_made_mu_sigma() -> None:
    """Eq. 8: per kept token the KL of its 3-dimensional Gaussian (a sum over dimensions), averaged over tokens."""
    mu = torch.tensor([[0.0, 1.0, -2.0], [0.5, 0.0, 3.0]])
    sigma = torch.tensor([[1.0, 0.5, 2.0], [0.1, 1.0, 1.5]])
    per_token = [
        sum(0.5 * (m * m + s * s - 1.0 - 2.0 * math.log(s)) for m, s in zip(mu_row, sigma_row))
        for mu_row, sigma_row in zip(mu.tolist(), sigma.tolist())
    ]
    expected = sum(per_token) / 2
    assert float(gaussian_kl(mu, sigma.log())) == pytest.approx(expected, rel=1e-6)
    assert float(gaussian_kl(mu, sigma.log(), reduction="sum")) == pytest.approx(expected, rel=1e-6)
    assert float(gaussian_kl(mu, sigma.log(), reduction="mean")) == pytest.approx(expected / 3, rel=1e-6)
    assert float(gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 3))) == 0.0
    with pytest.raises(ValueError, match=r"reduction must be one of \('sum', 'mean'\), got 'batchmean'"):
        gaussian_kl(mu, sigma.log(), reduction="batchmean")


def test_kl_reduction_is_validated_saved_and_read_back(tmp_path: Path) -> None:
    assert divico.CompressionConfig("divico", keep_ratio=0.25).kl_reduction == "sum"
    with pytest.raises(ValueError, match=r"kl_reduction must be one of \('sum', 'mean'\), got 'avg'"):
        divico.CompressionConfig("divico", keep_ratio=0.25, kl_reduction="avg")  # type: ignore[arg-type]
    for reduction in ("sum", "mean"):
        model = tiny_llava()
        divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.25, kl_reduction=reduction))
        assert model.divico_compressor.kl_reduction == reduction
        divico.save_compressor(model, tmp_path / reduction)
        saved = json.loads((tmp_path / reduction / "config.json").read_text())
        assert saved["compression"]["kl_reduction"] == reduction
        loaded = divico.load_compressor(tiny_llava(), tmp_path / reduction)
        assert divico.compression_config(loaded).kl_reduction == reduction
        assert loaded.divico_compressor.kl_reduction == reduction
    # A checkpoint written before the field existed was trained with the per-dimension mean and loads so.
    meta = json.loads((tmp_path / "sum" / "config.json").read_text())
    del meta["compression"]["kl_reduction"]
    (tmp_path / "sum" / "config.json").write_text(json.dumps(meta))
    assert divico.compression_config(divico.load_compressor(tiny_llava(), tmp_path / "sum")).kl_reduction == "mean"


@pytest.mark.parametrize(("beta", "kl_reduction"), [(0.0, "sum"), (0.5, "sum"), (0.5, "mean")])
def test_training_loss_is_lm_loss_plus_beta_times_closed_form_kl(
    tmp_path: Path, beta: float, kl_reduction: str
) -> None:
    data, images = write_color_data(tmp_path, 4)
    processor = tiny_processor()
    model = tiny_llava()
    compression = divico.CompressionConfig("divico", keep_ratio=0.25, layer=2, kl_reduction=kl_reduction)
    config = config_for(tmp_path, data, images, beta=beta, compression=compression)
    runtime = prepare_model_for_training(model, config)
    hidden = runtime.adapter.hidden_size()
    mu = torch.linspace(-1.0, 1.0, hidden)
    sigma = torch.linspace(0.2, 2.0, hidden)
    with torch.no_grad():  # g_theta outputs the same hand-made (mu, log sigma) for every kept token
        model.divico_compressor.fc2.weight.zero_()
        model.divico_compressor.fc2.bias.copy_(torch.cat([mu, sigma.log()]))
    per_dimension = 0.5 * (mu**2 + sigma**2 - 1.0 - 2.0 * sigma.log())
    # Eq. 8 sums over the d = 64 dimensions (every kept token has the same Gaussian); "mean" divides by d.
    closed_form = float(per_dimension.sum() if kl_reduction == "sum" else per_dimension.mean())
    dataset = LlavaJsonDataset(data, processor, images)
    trainer = DiViCoTrainer(
        model=model, args=build_training_arguments(config), train_dataset=dataset,
        data_collator=LeftPaddingCollator(0), runtime=runtime, beta=beta,
    )
    batch = LeftPaddingCollator(0)([dataset[i] for i in range(4)])
    model.train()
    loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    assert float(divico.last_report(model).kl.detach()) == pytest.approx(closed_form, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(outputs.loss.detach()) + beta * closed_form, rel=1e-6)
    if beta == 0.0:
        assert torch.equal(loss, outputs.loss)


# --- training --------------------------------------------------------------------------------------------------------
def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("method", "encoder", "trained_prefixes"),
    [
        ("divico", "variational", ("divico_compressor.",)),
        ("divico", "deterministic", ("divico_compressor.",)),
        ("fastv", "variational", ()),
        ("deco", "variational", ("model.multi_modal_projector.",)),
    ],
)
def test_only_intended_parameters_change(
    tmp_path: Path, method: str, encoder: str, trained_prefixes: tuple[str, ...]
) -> None:
    data, images = write_color_data(tmp_path)
    model = tiny_llava()
    before = _snapshot(model)
    train(model, tiny_processor(), config_for(tmp_path, data, images, method=method, encoder=encoder, max_steps=3))
    after = _snapshot(model)
    changed = {name for name in after if name not in before or not torch.equal(before[name], after[name])}
    base_changed = {name for name in changed if name in before and not name.startswith(trained_prefixes)}
    assert base_changed == set(), f"frozen weights changed: {sorted(base_changed)[:5]}"
    lora = {name for name in after if "lora_" in name}
    assert lora and all(".language_model.layers." in name for name in lora)
    assert {name for name in lora if "lora_B" in name} <= changed  # lora_B starts at zero, so training moved it
    for prefix in trained_prefixes:
        assert any(name.startswith(prefix) for name in changed), f"{prefix} was not trained"
    assert not any(name.startswith("model.vision_tower.") for name in changed)


def test_loss_falls_and_trained_parts_reload_with_identical_logits(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path)
    processor = tiny_processor()
    model = tiny_llava()
    result = train(model, processor, config_for(tmp_path, data, images, max_steps=12))
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    logged = [entry for entry in result.log_history if "loss" in entry]
    assert len(losses) == 12 and all({"kl", "gap_norm_ratio", "sigma_mean"} <= set(entry) for entry in logged)
    # The untrained encoder starts at sigma = init_sigma = 0.01, so the first KL is Eq. 8's at mu = 0 (d = 64).
    assert logged[0]["sigma_mean"] == pytest.approx(0.01, rel=1e-4)
    assert logged[0]["kl"] == pytest.approx(64 * 0.5 * (0.01**2 - 1 - 2 * math.log(0.01)), rel=1e-4)
    assert logged[0]["gap_norm_ratio"] > 0 and logged[-1]["sigma_mean"] > logged[0]["sigma_mean"]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert sorted(p.name for p in result.output_dir.iterdir()) == [
        "checkpoints", "compressor.safetensors", "config.json", "learning_curve.json", "lora", "training_config.json",
        "training_summary.json"]
    meta = json.loads((result.output_dir / "config.json").read_text())
    assert meta["hidden_size"] == 64 and meta["lora"]["r"] == 4

    batch = LeftPaddingCollator(0)([LlavaJsonDataset(data, processor, images)[i] for i in range(3)])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        trained_logits = model(**batch).logits
    fresh = tiny_llava()
    divico.load_compressor(fresh, result.output_dir)
    with torch.no_grad():
        reloaded_logits = fresh(**batch).logits
        base_logits = tiny_llava()(**batch).logits
    assert torch.equal(trained_logits, reloaded_logits)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)  # the reload restored real training

    with pytest.raises(ValueError, match="decoder layers"):
        divico.load_compressor(tiny_llava(num_layers=3), result.output_dir)


class KillAt(TrainerCallback):
    """Simulates a kill right after the checkpoint at ``step`` is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def test_run_killed_mid_way_resumes_to_the_same_weights(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path)
    processor = tiny_processor()
    # LoRA dropout, the variational encoder's sampling and a cosine schedule all depend on resumed state.
    settings = {
        "max_steps": 6, "save_steps": 3, "lora_dropout": 0.1, "lr_scheduler": "cosine", "per_device_batch_size": 3,
    }
    killed = config_for(tmp_path / "killed", data, images, **settings)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_llava(), processor, killed, callbacks=[KillAt(3)])
    resumed = train(tiny_llava(), processor, killed)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-3")
    assert resumed.global_step == 6
    straight = train(tiny_llava(), processor, config_for(tmp_path / "straight", data, images, **settings))
    assert straight.resumed_from is None
    a, b = trained_tensors(resumed.output_dir), trained_tensors(straight.output_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # ... and they did train: the resumed weights differ from the checkpoint they started from.
    checkpoint = load_file(str(Path(resumed.resumed_from) / "trainable.safetensors"))
    assert not torch.equal(checkpoint["divico_compressor.fc2.weight"], b["compressor.fc2.weight"])


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path, 4)
    processor = tiny_processor()
    batch = LeftPaddingCollator(0)([LlavaJsonDataset(data, processor, images)[i] for i in range(4)])
    gradients = []
    for checkpointing in (False, True):
        model = tiny_llava()
        prepare_model_for_training(model, config_for(tmp_path, data, images, encoder="deterministic"))
        with torch.no_grad():
            model.divico_compressor.fc2.weight.normal_(std=0.05)  # a non-zero gap, so the encoder gets gradients
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x name
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        model.train()
        model(**batch, use_cache=False).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, rtol=1e-5, atol=1e-7, msg=name)
    assert float(gradients[0]["divico_compressor.fc1.weight"].abs().sum()) > 0


def test_cli_trains_from_a_model_folder(tmp_path: Path) -> None:
    from divico.cli import main

    data, images = write_color_data(tmp_path, 4)
    model_dir = tmp_path / "base"
    tiny_llava().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    out = tmp_path / "cli-out"
    code = main([
        "train", "--model", str(model_dir), "--data", str(data), "--image-folder", str(images),
        "--output", str(out), "--method", "divico", "--keep-ratio", "0.25", "--layer", "2", "--lora-r", "2",
        "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--bf16", "--gradient-checkpointing",
        "--no-progress", "--logging-steps", "1",
    ])
    assert code == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["compression"]["keep_ratio"] == 0.25 and meta["lora"]["r"] == 2
    assert meta["compression"]["kl_reduction"] == "sum"  # Eq. 8 unless --kl-reduction says otherwise
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    # Trained tensors are saved in float32 although the frozen base ran in bf16.
    assert all(t.dtype == torch.float32 for t in trained_tensors(out).values())
    common = ["train", "--model", str(model_dir), "--data", str(data), "--image-folder", str(images), "--method",
              "divico", "--keep-ratio", "0.25", "--lora-r", "2", "--max-steps", "1", "--no-progress"]
    assert main([*common, "--output", str(tmp_path / "warm"), "--init-from", str(out)]) == 0
    assert json.loads((tmp_path / "warm" / "training_config.json").read_text())["init_from"] == str(out)
    assert main([*common, "--output", str(tmp_path / "x"), "--init-from", str(tmp_path / "nowhere")]) == 2
    assert main([*common, "--output", str(tmp_path / "mean"), "--kl-reduction", "mean"]) == 0
    assert json.loads((tmp_path / "mean" / "config.json").read_text())["compression"]["kl_reduction"] == "mean"


def test_cli_reports_a_bad_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from divico.cli import main

    write_images(tmp_path, 1)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(BAD_RECORDS["missing image"][0]) + "\n")
    model_dir = tmp_path / "base"
    tiny_llava().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--image-folder", str(tmp_path),
                 "--output", str(tmp_path / "o"), "--max-steps", "1"])
    assert code == 2
    assert "train.jsonl:1: record id='bad': image file not found" in capsys.readouterr().err


def test_training_config_rejects_bad_values(tmp_path: Path) -> None:
    base = {"data_path": "x.json", "output_dir": tmp_path}
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        TrainingConfig(**base, beta=-0.1)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be >= 1, got 0"):
        TrainingConfig(**base, gradient_accumulation_steps=0)
    with pytest.raises(TypeError, match="lora_r must be an integer"):
        TrainingConfig(**base, lora_r=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"visual_word_weight must be a finite number >= 0 \(0: off\), got -1"):
        TrainingConfig(**base, visual_word_weight=-1)


def test_nothing_to_train_is_refused(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path, 1)
    with pytest.raises(ValueError, match="Nothing to train"):
        train(tiny_llava(), tiny_processor(), config_for(tmp_path, data, images, method="fastv", lora_r=0))


class SaveAtStart(TrainerCallback):
    """Writes the model's trained parts as training begins (after any warm start, before the first step)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        divico.save_compressor(model, self.folder)


def test_warm_start_begins_from_the_earlier_run_and_refuses_a_mismatch(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path)
    processor = tiny_processor()
    first = train(tiny_llava(), processor, config_for(tmp_path / "first", data, images, max_steps=3))
    start = tmp_path / "start"
    second = train(tiny_llava(), processor, config_for(tmp_path / "second", data, images, max_steps=2,
                                                         init_from=first.output_dir),
                   callbacks=[SaveAtStart(start)])
    earlier, began, ended = (trained_tensors(d) for d in (first.output_dir, start, second.output_dir))
    assert earlier.keys() == began.keys() == ended.keys()
    for name in earlier:
        assert torch.equal(began[name], earlier[name]), name
    assert any(not torch.equal(ended[name], earlier[name]) for name in earlier)  # ... and it went on training
    # A cold start begins elsewhere: lora_B is zero and the encoder freshly initialised.
    cold = tmp_path / "cold"
    train(tiny_llava(), processor, config_for(tmp_path / "third", data, images, max_steps=1),
          callbacks=[SaveAtStart(cold)])
    assert any(not torch.equal(trained_tensors(cold)[name], earlier[name]) for name in earlier)

    with pytest.raises(ValueError, match="does not fit this model"):
        train(tiny_llava(), processor, config_for(tmp_path / "rank", data, images, lora_r=2, init_from=first.output_dir))
    with pytest.raises(ValueError, match="is for method='divico'"):
        train(tiny_llava(), processor,
              config_for(tmp_path / "method", data, images, method="deco", init_from=first.output_dir))
    with pytest.raises(FileNotFoundError, match="init_from='.*nowhere' is not the output folder"):
        config_for(tmp_path, data, images, init_from=tmp_path / "nowhere")


# --- dtypes and several processes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["divico", "deco"])
def test_bf16_base_trains_without_autocast_then_generates(tmp_path: Path, method: str) -> None:
    """A bf16 base, bf16=False, via the Python API: float32 trained parts, then eval and generate (also reloaded)."""
    data, images = write_color_data(tmp_path, 4)
    processor = tiny_processor()
    model = tiny_llava().to(torch.bfloat16)
    result = train(model, processor, config_for(tmp_path, data, images, method=method, max_steps=2, lora_dropout=0.1))
    assert result.global_step == 2
    runtime = divico.get_runtime(model)
    trained = runtime.method.trainable_modules(runtime.adapter, runtime.compressor)
    assert all(p.dtype == torch.float32 for module in trained.values() for p in module.parameters())
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16  # the base stays bf16
    batch = LeftPaddingCollator(0)([LlavaJsonDataset(data, processor, images)[i] for i in range(2)])
    batch.pop("labels")
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
    assert generated[:, -2].tolist() == logits[:, -1].argmax(-1).tolist()  # greedy's first token is the argmax
    fresh = divico.load_compressor(tiny_llava().to(torch.bfloat16), result.output_dir)
    with torch.no_grad():
        reloaded = fresh.generate(**batch, max_new_tokens=2, do_sample=False)
    assert reloaded.shape == generated.shape


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_two_process_cpu_training_with_text_only_micro_batches(tmp_path: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine: two gloo processes share the data.

    (``accelerate launch --cpu --num_processes 2`` starts one process.) Half the records are text-only, so with
    batch size 1 some micro-batches of one process have no image while the other's do: g_theta's gradients must
    still be all-reduced (no hang) and the logged KL combine both processes.
    """
    data, images = write_color_data(tmp_path, 4)
    records = json.loads(data.read_text())
    records += [{"id": f"t{index}", "conversations": [
        {"from": "human", "value": "what shape"}, {"from": "gpt", "value": "circle"}]} for index in range(4)]
    data.write_text(json.dumps(records))
    model_dir = tmp_path / "base"
    tiny_llava().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    out = tmp_path / "out"
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "divico.cli", "train", "--model", str(model_dir), "--data", str(data), "--image-folder", str(images),
        "--output", str(out), "--method", "divico", "--keep-ratio", "0.25", "--lora-r", "2", "--max-steps", "4",
        "--batch-size", "1", "--gradient-checkpointing", "--no-progress", "--logging-steps", "1", "--lr", "5e-3",
    ]
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    state = json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
    # 4 steps x 2 processes x batch 1 = the 8 records once: one process alone would be half-way (epoch 0.5).
    assert state["global_step"] == 4 and state["epoch"] == pytest.approx(1.0)
    assert any("kl" in entry for entry in state["log_history"])
    fresh = tiny_llava()
    divico.load_compressor(fresh, out)
    batch = LeftPaddingCollator(0)([LlavaJsonDataset(data, tiny_processor(), images)[i] for i in range(2)])
    batch.pop("labels")
    with torch.no_grad():
        trained, base = fresh(**batch).logits, tiny_llava()(**batch).logits
    assert not torch.allclose(trained, base, atol=1e-4)


def test_warm_start_from_another_rate_and_a_checkpoint_without_kl_reduction(tmp_path: Path) -> None:
    """The new run's config governs a warm start; only the weights of the earlier run are taken."""
    data, images = write_color_data(tmp_path, 4)
    processor = tiny_processor()
    first = train(tiny_llava(), processor, config_for(tmp_path / "first", data, images, max_steps=1))
    meta = json.loads((first.output_dir / "config.json").read_text())
    del meta["compression"]["kl_reduction"]  # as a checkpoint written before the field (read as "mean")
    (first.output_dir / "config.json").write_text(json.dumps(meta))
    other_rate = divico.CompressionConfig("divico", keep_ratio=0.5, layer=2)
    start = tmp_path / "start"
    train(tiny_llava(), processor, config_for(tmp_path / "second", data, images, max_steps=1, compression=other_rate,
                                                init_from=first.output_dir), callbacks=[SaveAtStart(start)])
    began, earlier = trained_tensors(start), trained_tensors(first.output_dir)
    assert began.keys() == earlier.keys() and all(torch.equal(began[name], earlier[name]) for name in earlier)
    assert json.loads((start / "config.json").read_text())["compression"]["keep_ratio"] == 0.5
    assert json.loads((start / "config.json").read_text())["compression"]["kl_reduction"] == "sum"


# --- validation and early stopping ----------------------------------------------------------------------------------
def write_shape_eval_data(root: Path, count: int = 6) -> Path:
    """Validation records on the colour images whose answers are shape words, which colour training never teaches:
    training on colours can only make these answers less likely, so the validation loss stops improving."""
    records = [
        {"id": f"v{index}", "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat shape is the shape"},
            {"from": "gpt", "value": ("circle", "square")[index % 2]},
        ]}
        for index in range(count)
    ]
    path = root / "validation.json"
    path.write_text(json.dumps(records))
    return path


def _model_with_checkpoint(config: TrainingConfig, checkpoint: Path) -> torch.nn.Module:
    """A fresh tiny LLaVA prepared as for training, holding a Trainer checkpoint's trained tensors, in eval mode."""
    model = tiny_llava()
    prepare_model_for_training(model, config)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(checkpoint / "trainable.safetensors")).items():
            parameters[name].copy_(tensor)
    return model.eval()


def test_early_stopping_stops_at_patience_and_saves_the_best_checkpoint(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path)
    eval_data = write_shape_eval_data(tmp_path)
    processor = tiny_processor()
    patience, max_steps = 2, 20
    config = config_for(tmp_path, data, images, max_steps=max_steps, beta=0.02, eval_data_path=eval_data,
                        eval_steps=1, early_stopping_patience=patience, save_total_limit=None,
                        save_steps=None)
    result = train(tiny_llava(), processor, config)
    evals = [(p["step"], p["eval_loss"]) for p in result.learning_curve if p["eval_loss"] is not None]
    assert [step for step, _ in evals] == list(range(1, result.global_step + 1))  # every step, as eval_steps=1
    best_step, best_loss = min(evals, key=lambda point: point[1])
    assert (result.best_step, result.best_eval_loss) == (best_step, pytest.approx(best_loss))
    # Stopped at the first evaluation that was the patience-th in a row without a new best.
    losses = [loss for _, loss in evals]
    fails, expected_stop = 0, None
    for index, loss in enumerate(losses):
        fails = fails + 1 if index and loss >= min(losses[:index]) else 0
        if fails == patience:
            expected_stop = index + 1
            break
    assert expected_stop is not None and expected_stop < max_steps, losses
    assert result.global_step == result.steps_run == expected_stop and result.stopped_early
    assert result.saved_step == best_step and best_step < result.global_step
    summary = json.loads((result.output_dir / "training_summary.json").read_text())
    assert summary["steps_run"] == expected_stop and summary["best_step"] == best_step
    assert summary["stopped_early"] is True and summary["max_steps"] == max_steps
    written = json.loads((result.output_dir / "learning_curve.json").read_text())
    assert written == {"best_step": best_step, "points": result.learning_curve}
    assert all(p["train_loss"] is not None and p["kl"] > 0 and p["eval_kl"] > 0 for p in written["points"])
    assert all(p["eval_gap_norm_ratio"] > 0 and p["eval_sigma_mean"] > 0 for p in written["points"])
    assert json.loads((result.output_dir / "training_config.json").read_text())["eval_data_path"] == str(eval_data)

    # The saved parts are the best checkpoint's, not the last step's: compare logits on the validation batch.
    batch = LeftPaddingCollator(0)([LlavaJsonDataset(eval_data, processor, images)[i] for i in range(4)])
    labels = batch.pop("labels")
    checkpoints = tmp_path / "out" / "checkpoints"
    best_model = _model_with_checkpoint(config, checkpoints / f"checkpoint-{best_step}")
    last_model = _model_with_checkpoint(config, checkpoints / f"checkpoint-{result.global_step}")
    saved = tiny_llava()
    divico.load_compressor(saved, result.output_dir)
    saved.eval()
    with torch.no_grad():  # labels as in evaluation (they move the selection's query to the prompt's end)
        saved_logits, best_output = saved(**batch, labels=labels).logits, best_model(**batch, labels=labels)
        last_logits = last_model(**batch, labels=labels).logits
    torch.testing.assert_close(saved_logits, best_output.logits, rtol=0, atol=1e-6)
    assert not torch.allclose(saved_logits, last_logits, atol=1e-4)
    # eval_loss is the answer loss alone (no beta * KL): the LM loss of the best weights, batch means averaged.
    with torch.no_grad():
        rest = LeftPaddingCollator(0)([LlavaJsonDataset(eval_data, processor, images)[i] for i in range(4, 6)])
        rest_loss = float(best_model(**rest).loss)
    by_hand = (4 * float(best_output.loss) + 2 * rest_loss) / 6
    assert best_loss == pytest.approx(by_hand, rel=1e-5)


def test_validation_without_patience_leaves_training_unchanged(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path)
    eval_data = write_shape_eval_data(tmp_path)
    processor = tiny_processor()
    # LoRA dropout and the encoder's sampling draw random numbers: evaluating must not shift their stream.
    settings = {"max_steps": 6, "lora_dropout": 0.1, "per_device_batch_size": 3}
    plain = train(tiny_llava(), processor, config_for(tmp_path / "plain", data, images, **settings))
    assert plain.best_step is None and not plain.stopped_early and plain.saved_step == 6
    assert all(p["eval_loss"] is None for p in plain.learning_curve) and len(plain.learning_curve) == 6
    watched = train(tiny_llava(), processor, config_for(
        tmp_path / "watched", data, images, **settings, eval_data_path=eval_data, eval_steps=2, save_best=False))
    assert watched.global_step == 6 and not watched.stopped_early and watched.saved_step == 6
    assert [p["step"] for p in watched.learning_curve if p["eval_loss"] is not None] == [2, 4, 6]
    a, b = trained_tensors(plain.output_dir), trained_tensors(watched.output_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_early_stopped_run_killed_mid_way_resumes_to_the_same_result(tmp_path: Path) -> None:
    data, images = write_color_data(tmp_path)
    eval_data = write_shape_eval_data(tmp_path)
    processor = tiny_processor()
    settings = {"max_steps": 20, "eval_data_path": eval_data, "eval_steps": 1, "early_stopping_patience": 2,
                "save_steps": None}
    straight = train(tiny_llava(), processor, config_for(tmp_path / "straight", data, images, **settings))
    assert straight.stopped_early and straight.global_step >= 3
    killed = config_for(tmp_path / "killed", data, images, **settings)
    # Killed after the first evaluation that did not improve, so the patience count must survive the resume.
    kill_at = next(p["step"] for index, p in enumerate(straight.learning_curve)
                   if index and p["eval_loss"] >= min(q["eval_loss"] for q in straight.learning_curve[:index]))
    assert kill_at < straight.global_step
    with pytest.raises(KeyboardInterrupt):
        train(tiny_llava(), processor, killed, callbacks=[KillAt(kill_at)])
    resumed = train(tiny_llava(), processor, killed)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith(f"checkpoint-{kill_at}")
    assert (resumed.global_step, resumed.best_step) == (straight.global_step, straight.best_step)
    a, b = trained_tensors(resumed.output_dir), trained_tensors(straight.output_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_validation_settings_are_checked(tmp_path: Path) -> None:
    base = {"data_path": "x.json", "output_dir": tmp_path}
    with pytest.raises(ValueError, match=r"early_stopping_patience=3 needs validation records: set eval_data_path"):
        TrainingConfig(**base, early_stopping_patience=3)
    with pytest.raises(ValueError, match=r"eval_steps=5 needs validation records"):
        TrainingConfig(**base, eval_steps=5)
    with pytest.raises(ValueError, match=r"early_stopping_patience must be >= 1, got 0"):
        TrainingConfig(**base, eval_data_path="v.json", early_stopping_patience=0)
    with pytest.raises(TypeError, match=r"eval_steps must be an integer >= 1, got 2.5"):
        TrainingConfig(**base, eval_data_path="v.json", eval_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"early_stopping_threshold must be a finite number >= 0, got -0.1"):
        TrainingConfig(**base, eval_data_path="v.json", early_stopping_threshold=-0.1)
    with pytest.raises(ValueError, match=r"save_steps must be None or equal to eval_steps \(10\).*save_steps=500"):
        TrainingConfig(**base, eval_data_path="v.json", save_steps=500)
    config = TrainingConfig(**base, eval_data_path="v.json", logging_steps=7)
    assert (config.eval_interval, config.checkpoint_interval) == (7, 7)
    assert TrainingConfig(**base).checkpoint_interval == 500
    assert TrainingConfig(**base, eval_data_path="v.json", save_best=False).checkpoint_interval == 500
    arguments = build_training_arguments(TrainingConfig(**base, eval_data_path="v.json", eval_steps=3))
    assert (arguments.eval_steps, arguments.save_steps, arguments.load_best_model_at_end) == (3, 3, True)
    assert arguments.metric_for_best_model == "eval_loss" and arguments.greater_is_better is False


def test_cli_trains_with_early_stopping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from divico.cli import main

    data, images = write_color_data(tmp_path, 4)
    eval_data = write_shape_eval_data(tmp_path, 2)
    model_dir = tmp_path / "base"
    tiny_llava().save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    common = ["train", "--model", str(model_dir), "--data", str(data), "--image-folder", str(images), "--method",
              "divico", "--keep-ratio", "0.25", "--lora-r", "2", "--batch-size", "2", "--no-progress",
              "--lr", "0.01", "--warmup", "0"]
    out = tmp_path / "cli-out"
    code = main([*common, "--output", str(out), "--max-steps", "30", "--eval-data", str(eval_data),
                 "--eval-steps", "2", "--early-stopping-patience", "1", "--early-stopping-threshold", "0.001"])
    assert code == 0
    recorded = json.loads((out / "training_config.json").read_text())
    assert (recorded["eval_steps"], recorded["early_stopping_patience"]) == (2, 1)
    assert recorded["early_stopping_threshold"] == 0.001
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["stopped_early"] and summary["steps_run"] < 30 and summary["steps_run"] % 2 == 0
    assert "best validation loss" in capsys.readouterr().out
    assert main([*common, "--output", str(tmp_path / "x"), "--max-steps", "1", "--early-stopping-patience", "2"]) == 2
    assert "needs validation records" in capsys.readouterr().err
