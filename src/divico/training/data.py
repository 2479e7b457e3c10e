"""LLaVA instruction-tuning data: records -> chat-template prompts -> (input_ids, labels, pixel_values) -> batches.

A data file is a JSON list or a JSONL file of records::

    {"id": "000001", "image": "coco/000001.jpg",            # or a list of paths, or absent for text-only
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A red cup."}, ...]}

Every ``<image>`` in a human turn marks where one image goes (one per image, in order). Prompts are rendered with
the processor's own chat template, so the training text is exactly what inference sees; labels keep only the tokens
of assistant turns (their text and the template's end-of-turn marker), everything else is -100.

A record may also carry ``"visual_words"``: one entry per image token of its images (in order), each a string of the
words that the token shows (``"red square"``; ``""`` for none) or a ``[words, weight]`` pair. They are the targets of
the optional *visual word loss* (``TrainingConfig.visual_word_weight``): the LM head, read at each image token, should
name what the token shows.

Records are validated when the dataset is built; a bad record raises :class:`DataError` naming the file, line and
record id, unless ``skip_invalid=True``, in which case it is left out and counted (:attr:`LlavaJsonDataset.skipped`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

#: Placeholder for an image in LLaVA-format conversation text (independent of the processor's own image token).
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A training record that cannot be used; the message names the file, line and record id.

    Attributes
    ----------
    path
        The data file.
    line
        1-based line where the record starts (None if unknown).
    record_id
        The record's ``"id"`` (None if it has none or could not be read).
    """

    def __init__(self, path: str | Path, line: int | None, record_id: Any, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.record_id = record_id
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        who = f"record id={record_id!r}" if record_id is not None else "record (no id)"
        super().__init__(f"{where}: {who}: {problem}")


@dataclass
class Turn:
    """One conversation turn; ``role`` is ``"user"``, ``"assistant"`` or ``"system"``."""

    role: str
    text: str


@dataclass
class Record:
    """A validated training record."""

    record_id: Any
    line: int
    turns: list[Turn]
    image_paths: list[Path] = field(default_factory=list)
    #: (words, weight) per visual token, or None (see the module docstring).
    visual_words: list[tuple[str, float]] | None = None


# --- reading files -----------------------------------------------------------------------------------------------
def iter_json_records(path: str | Path) -> list[tuple[int, Any] | DataError]:
    """Parse a JSON list or JSONL file into ``(line, object)`` pairs, keeping the line each record starts on.

    A JSONL line that is not valid JSON becomes a :class:`DataError` entry (so it can be skipped); a JSON list
    with a syntax error raises, since nothing after the error can be located.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    DataError
        If a JSON list is malformed or the file is neither a JSON list nor JSONL.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Training data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(path, None, None, "the file is empty.")
    if stripped[0] == "[":
        return _parse_json_list(path, text)
    records: list[tuple[int, Any] | DataError] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            records.append(DataError(path, number, None, f"malformed record: not valid JSON ({error.msg})."))
    return records


def _parse_json_list(path: Path, text: str) -> list[tuple[int, Any] | DataError]:
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any] | DataError] = []
    position = text.index("[") + 1
    line, counted_to = 1, 0

    def line_at(index: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, index)
        counted_to = index
        return line

    def skip_space(index: int) -> int:
        while index < len(text) and text[index].isspace():
            index += 1
        return index

    position = skip_space(position)
    if position < len(text) and text[position] == "]":
        return records
    while True:
        position = skip_space(position)
        try:
            obj, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise DataError(path, error.lineno, None, f"malformed JSON list ({error.msg}, column {error.colno}).")
        records.append((line_at(position), obj))
        position = skip_space(end)
        if position < len(text) and text[position] == ",":
            position += 1
            continue
        if position < len(text) and text[position] == "]":
            return records
        raise DataError(path, line_at(min(position, len(text))), None, "malformed JSON list: expected ',' or ']'.")


# --- validating records ------------------------------------------------------------------------------------------
def parse_record(obj: Any, line: int, path: str | Path, image_folder: Path) -> Record:
    """Validate one LLaVA-format record.

    Parameters
    ----------
    obj
        The decoded JSON value.
    line
        Line the record starts on (for error messages).
    path
        The data file (for error messages).
    image_folder
        Folder that image paths are relative to.

    Raises
    ------
    DataError
        Malformed record, empty conversation, no assistant turn, an image without an ``<image>`` placeholder (or
        the reverse), or a missing image file.
    """
    if not isinstance(obj, dict):
        raise DataError(path, line, None, f"malformed record: expected a JSON object, got {type(obj).__name__}.")
    record_id = obj.get("id")

    def fail(problem: str) -> DataError:
        return DataError(path, line, record_id, problem)

    if "conversations" not in obj:
        raise fail("malformed record: no 'conversations' field.")
    conversations = obj["conversations"]
    if not isinstance(conversations, list):
        raise fail(f"malformed record: 'conversations' must be a list, got {type(conversations).__name__}.")
    if not conversations:
        raise fail("empty conversation: 'conversations' has no turns.")
    turns: list[Turn] = []
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise fail(f"malformed record: turn {index} must be an object with 'from' and 'value', got {turn!r}.")
        role = _ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise fail(f"malformed record: turn {index} has 'from'={turn['from']!r}; valid: {sorted(_ROLES)}.")
        if not isinstance(turn["value"], str):
            raise fail(f"malformed record: turn {index} 'value' must be a string, got {type(turn['value']).__name__}.")
        if role != "user" and IMAGE_PLACEHOLDER in turn["value"]:
            raise fail(f"turn {index} ({turn['from']!r}) contains {IMAGE_PLACEHOLDER}; images go in human turns only.")
        turns.append(Turn(role, turn["value"]))
    if not any(t.role == "assistant" for t in turns):
        raise fail("the conversation has no assistant ('gpt') turn, so there is nothing to learn.")

    image_field = obj.get("image")
    if image_field is None:
        names: list[str] = []
    elif isinstance(image_field, str):
        names = [image_field]
    elif isinstance(image_field, list) and all(isinstance(name, str) for name in image_field):
        names = list(image_field)
    else:
        raise fail(f"malformed record: 'image' must be a path or a list of paths, got {image_field!r}.")
    placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if names and placeholders == 0:
        raise fail(
            f"has {len(names)} image(s) but no {IMAGE_PLACEHOLDER} in its conversation; one {IMAGE_PLACEHOLDER} "
            "per image is required in the human turns."
        )
    if placeholders != len(names):
        raise fail(f"has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(names)} image(s).")
    image_paths = [image_folder / name for name in names]
    for image_path in image_paths:
        if not image_path.is_file():
            raise fail(f"image file not found: {image_path}")
    visual_words = None
    if "visual_words" in obj:
        if not names:
            raise fail("has 'visual_words' but no image.")
        visual_words = _parse_visual_words(obj["visual_words"], fail)
    return Record(record_id=record_id, line=line, turns=turns, image_paths=image_paths, visual_words=visual_words)


def _parse_visual_words(value: Any, fail: Any) -> list[tuple[str, float]]:
    if not isinstance(value, list) or not value:
        raise fail(f"malformed record: 'visual_words' must be a non-empty list, got {type(value).__name__}.")
    parsed: list[tuple[str, float]] = []
    for index, entry in enumerate(value):
        if isinstance(entry, str):
            parsed.append((entry, 1.0))
            continue
        valid = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                 and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool))
        if not valid or not (entry[1] >= 0 and entry[1] < float("inf")):
            raise fail(f"malformed record: 'visual_words'[{index}] must be a string or a [words, weight >= 0] "
                       f"pair, got {entry!r}.")
        parsed.append((entry[0], float(entry[1])))
    return parsed


# --- prompt building ---------------------------------------------------------------------------------------------
def to_chat_messages(turns: list[Turn]) -> list[dict[str, Any]]:
    """Turns -> chat-template messages with typed content (``{"type": "image"}`` where ``<image>`` was).

    Text around a placeholder is stripped: the template decides the separators around an image.
    """
    messages: list[dict[str, Any]] = []
    for turn in turns:
        content: list[dict[str, Any]] = []
        pieces = turn.text.split(IMAGE_PLACEHOLDER)
        for index, piece in enumerate(pieces):
            if index > 0:
                content.append({"type": "image"})
            piece = piece.strip() if len(pieces) > 1 else piece
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": turn.role, "content": content})
    return messages


def assistant_char_spans(processor: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and find the characters of every assistant turn.

    An assistant turn spans from the end of the prompt rendered with ``add_generation_prompt=True`` before it to the
    end of the conversation rendered through it (its text plus the template's end-of-turn marker).

    Returns
    -------
    tuple[str, list[tuple[int, int]]]
        The full rendered text and ``[start, end)`` character spans.

    Raises
    ------
    ValueError
        If the chat template does not render conversations as prefixes of each other (labels cannot be placed).
    """
    render = processor.apply_chat_template
    full = render(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
        through = render(messages[: index + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(prompt)):
            raise ValueError(
                "The processor's chat template does not render a conversation as an extension of its prefix "
                f"(turn {index}), so assistant tokens cannot be located; use a template that appends turns."
            )
        spans.append((len(prompt), len(through)))
    return full, spans


def encode_conversation(
    processor: Any,
    turns: list[Turn],
    images: list[Any] | None = None,
    visual_words: list[tuple[str, float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize one conversation with its images and label only the assistant turns.

    Parameters
    ----------
    processor
        A transformers multimodal processor with a chat template and a fast tokenizer (e.g. ``LlavaProcessor``).
    turns
        The conversation.
    images
        PIL images, one per ``<image>`` placeholder, in order.
    visual_words
        ``(words, weight)`` per visual token (see the module docstring), or None.

    Returns
    -------
    dict[str, torch.Tensor]
        ``input_ids`` (L,) long, ``labels`` (L,) long with -100 outside assistant turns and at image tokens, and
        the processor's image tensors (e.g. ``pixel_values`` (num_images, 3, H, W)) when there are images. With
        ``visual_words``: ``visual_word_ids`` (P, W) long, the first token of each word (" " + word) of the P
        visual tokens, -100-padded to the most words W, and ``visual_word_weights`` (P,) float.

    Raises
    ------
    ValueError
        If ``visual_words`` does not have one entry per visual token.
    """
    messages = to_chat_messages(turns)
    text, spans = assistant_char_spans(processor, messages)
    tokenizer = processor.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"divico training needs a fast tokenizer (offsets), got {type(tokenizer).__name__}.")
    bos = getattr(tokenizer, "bos_token", None)
    # Templates that write the BOS token themselves must not get a second one.
    add_special = bool(bos) and not text.startswith(bos)
    encoded = processor(
        text=[text],
        images=images if images else None,
        return_tensors="pt",
        return_offsets_mapping=True,
        add_special_tokens=add_special,
    )
    input_ids = encoded["input_ids"][0]
    offsets = encoded["offset_mapping"][0].tolist()
    image_token = processor.image_token
    image_token_id = int(processor.image_token_id)
    is_image = input_ids == image_token_id
    if images and not bool(is_image.any()):
        raise ValueError("The chat template dropped the image placeholders: the prompt has no image tokens.")

    # Compare positions in "text without image tokens" coordinates: the processor expands each placeholder into
    # many image tokens, but assistant turns contain none, so this coordinate is the same before and after.
    def text_only(position: int) -> int:
        return position - len(image_token) * text.count(image_token, 0, position)

    text_spans = [(text_only(start), text_only(end)) for start, end in spans]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    image_chars = 0
    for index, (start, end) in enumerate(offsets):
        if bool(is_image[index]):
            image_chars += end - start
            continue
        if end <= start:  # special tokens added by the tokenizer carry no characters
            continue
        position = start - image_chars
        if any(span_start <= position < span_end for span_start, span_end in text_spans):
            labels[index] = input_ids[index]
    example = {"input_ids": input_ids, "labels": labels}
    if visual_words is not None:
        example.update(encode_visual_words(tokenizer, visual_words, int(is_image.sum())))
    for key, value in encoded.items():
        if key not in ("input_ids", "attention_mask", "offset_mapping") and isinstance(value, torch.Tensor):
            example[key] = value
    return example


def encode_visual_words(
    tokenizer: Any, visual_words: list[tuple[str, float]], visual_tokens: int
) -> dict[str, torch.Tensor]:
    """Visual word targets as tensors: ``visual_word_ids`` (P, W) long, -100-padded, and ``visual_word_weights`` (P,).

    Each word is represented by the first token of ``" " + word`` (how it starts mid-sentence); a token without
    words gets weight 0.
    """
    if len(visual_words) != visual_tokens:
        raise ValueError(f"visual_words has {len(visual_words)} entries but the prompt has {visual_tokens} visual "
                         "tokens; give one entry per visual token.")
    cache: dict[str, int] = {}

    def first_token(word: str) -> int:
        if word not in cache:
            ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            cache[word] = int(ids[0])
        return cache[word]

    words = [entry.split() for entry, _ in visual_words]
    width = max(1, max((len(w) for w in words), default=0))
    ids = torch.full((visual_tokens, width), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(visual_tokens, dtype=torch.float32)
    for index, (token_words, (_, weight)) in enumerate(zip(words, visual_words)):
        if token_words:
            ids[index, : len(token_words)] = torch.tensor([first_token(word) for word in token_words])
            weights[index] = weight
    return {"visual_word_ids": ids, "visual_word_weights": weights}


# --- dataset and collator ----------------------------------------------------------------------------------------
class LlavaJsonDataset(Dataset):
    """LLaVA-format training data, validated up front and tokenized lazily.

    Parameters
    ----------
    data_path
        JSON list or JSONL file.
    processor
        The model's processor (chat template, fast tokenizer, image processor).
    image_folder
        Folder that ``"image"`` paths are relative to (default: the data file's folder).
    skip_invalid
        Leave invalid records out (counted in :attr:`skipped`, logged) instead of raising :class:`DataError`.

    Raises
    ------
    DataError
        On the first invalid record when ``skip_invalid`` is False, or when no valid record remains.
    """

    def __init__(
        self,
        data_path: str | Path,
        processor: Any,
        image_folder: str | Path | None = None,
        skip_invalid: bool = False,
    ) -> None:
        self.data_path = Path(data_path)
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder is not None else self.data_path.parent
        if not self.image_folder.is_dir():
            raise FileNotFoundError(f"Image folder not found: {self.image_folder}")
        self.records: list[Record] = []
        self.skipped: list[DataError] = []
        for entry in iter_json_records(self.data_path):
            try:
                if isinstance(entry, DataError):
                    raise entry
                line, obj = entry
                self.records.append(parse_record(obj, line, self.data_path, self.image_folder))
            except DataError as error:
                if not skip_invalid:
                    raise
                self.skipped.append(error)
        if self.skipped:
            logger.warning(
                "divico: skipped %d invalid record(s) of %s (first: %s)",
                len(self.skipped), self.data_path, self.skipped[0],
            )
        if not self.records:
            raise DataError(self.data_path, None, None, f"no valid record (skipped {len(self.skipped)}).")
        #: Every example carries visual word targets (all-zero weights where its record has none) so batches stack.
        self.has_visual_words = any(record.visual_words is not None for record in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        try:
            images = [_load_image(path) for path in record.image_paths]
            example = encode_conversation(self.processor, record.turns, images, record.visual_words)
            if self.has_visual_words and record.visual_words is None:
                visual = int((example["input_ids"] == int(self.processor.image_token_id)).sum())
                example.update(encode_visual_words(self.processor.tokenizer, [("", 0.0)] * visual, visual))
            return example
        except (OSError, ValueError, TypeError) as error:
            raise DataError(self.data_path, record.line, record.record_id, f"cannot be encoded: {error}") from error


def _load_image(path: Path) -> Any:
    with Image.open(path) as image:
        return image.convert("RGB")


class LeftPaddingCollator:
    """Stack examples into a left-padded batch (the layer-K engine needs the last position to be a real token).

    Parameters
    ----------
    pad_token_id
        Id written into padded positions of ``input_ids``.

    Returns (when called)
    ---------------------
    dict[str, torch.Tensor]
        ``input_ids`` (B, L), ``attention_mask`` (B, L), ``labels`` (B, L) (-100 where padded) and image tensors
        concatenated over the batch in sample order (e.g. ``pixel_values`` (total_images, 3, H, W)).
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(int(example["input_ids"].shape[0]) for example in examples)
        batch_size = len(examples)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, example in enumerate(examples):
            length = int(example["input_ids"].shape[0])
            input_ids[row, width - length:] = example["input_ids"]
            labels[row, width - length:] = example["labels"]
            attention_mask[row, width - length:] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        extra_keys = sorted({key for example in examples for key in example} - {"input_ids", "labels"})
        if "visual_word_ids" in extra_keys:  # (P_i, W_i) per example -> (sum P_i, max W_i), -100-padded
            extra_keys.remove("visual_word_ids")
            rows = [example["visual_word_ids"] for example in examples]
            width = max(int(row.shape[1]) for row in rows)
            batch["visual_word_ids"] = torch.cat([
                torch.nn.functional.pad(row, (0, width - int(row.shape[1])), value=IGNORE_INDEX) for row in rows])
        for key in extra_keys:
            batch[key] = torch.cat([example[key] for example in examples if key in example], dim=0)
        return batch


def pad_token_id_of(processor: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padded positions are masked, so any id works)."""
    tokenizer = processor.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
