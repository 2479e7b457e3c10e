"""A scripted model and processor for tests of the evaluation runner: each prompt has a hand-chosen answer and
hand-chosen first-token logits, so scores and KLs can be computed by hand (no weights, milliseconds per batch).

The processor turns each prompt text into one token (its index in ``answers``); the model "generates" that
index + 1 as the answer token and returns the chosen logits for the first position.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature

VOCAB = 6


class ScriptedTokenizer:
    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self.padding_side = "right"
        self.pad_token_id = 0

    def batch_decode(self, tokens: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
        return [f"  {self.answers[int(row[0]) - 1]} " for row in tokens]  # padded: the runner strips


class ScriptedProcessor:
    """``prompts[i]`` (the text after the image) is answered ``answers[i]``."""

    def __init__(self, prompts: Sequence[str], answers: Sequence[str]) -> None:
        self.index = {prompt: i for i, prompt in enumerate(prompts)}
        self.tokenizer = ScriptedTokenizer(answers)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return messages[0]["content"][1]["text"]

    def __call__(self, images: Sequence[Image.Image], text: Sequence[str], padding: bool = True,
                 return_tensors: str = "pt") -> BatchFeature:
        ids = torch.tensor([[self.index[t]] for t in text])
        return BatchFeature({"input_ids": ids, "pixel_values": torch.zeros(len(text), 3, 2, 2)})


class ScriptedModel(torch.nn.Module):
    """Answers with the processor's script; logits of prompt i are ``logits[i]`` (V,).

    ``fail_at_call`` raises a RuntimeError at that ``generate`` call (1-based); ``kill_at_call`` kills the process
    with SIGKILL there (as a user's kill or the OOM killer would).
    """

    def __init__(self, logits: torch.Tensor, fail_at_call: int | None = None, kill_at_call: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logits = logits
        self.fail_at_call = fail_at_call
        self.kill_at_call = kill_at_call
        self.calls: list[list[int]] = []

    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, max_new_tokens: int, do_sample: bool,
                 pad_token_id: int, return_dict_in_generate: bool, output_logits: bool) -> Any:
        prompts = input_ids[:, 0].tolist()
        if len(self.calls) + 1 == self.kill_at_call:
            os.kill(os.getpid(), signal.SIGKILL)
        if len(self.calls) + 1 == self.fail_at_call:
            self.calls.append([])
            raise RuntimeError("scripted failure")
        self.calls.append(prompts)
        sequences = torch.cat([input_ids, input_ids + 1], dim=1)
        logits = (self.logits[input_ids[:, 0]],) if output_logits else None
        return type("Output", (), {"sequences": sequences, "logits": logits})()

    @property
    def answered(self) -> list[int]:
        return [p for call in self.calls for p in call]


def write_eval_data(root: Path, records_by_benchmark: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """``<root>/<benchmark>/test.jsonl`` and a small image for every image path the records name."""
    for benchmark, records in records_by_benchmark.items():
        for record in records:
            Image.new("RGB", (4, 4), (200, 10, 10)).save(root / record["image"])
        (root / benchmark).mkdir(parents=True, exist_ok=True)
        (root / benchmark / "test.jsonl").write_text("".join(json.dumps(dict(r)) + "\n" for r in records))
