"""The lmms-eval plugin (divico.integrations.lmms_eval): registered through the ``lmms_eval.models`` entry point,
run end to end by lmms-eval's own CLI on a tiny LLaVA and two local tasks (tests/lmms_eval_task: one open-ended
``generate_until`` task scored by exact_match, one ``multiple_choice`` task scored by acc from loglikelihoods).

The expected answers and continuation losses are computed here without the plugin (one prompt at a time, no
padding, the loss from transformers' own ``labels`` path), and the records' reference answers are chosen from them
so each task's score is a known fraction (2/3). Skipped when lmms-eval is not installed (``pip install
'divico[eval]'``; a CPU-torch environment installs it as tests/lmms_eval_task/requirements-cpu.txt says).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import IMAGE_TOKEN_ID, VOCAB_SIZE, tiny_llava
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import divico
from divico.evaluation.generation import build_chat_text, generate_batch
from divico.models import load_model_and_processor

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'divico[eval]'; with a CPU torch "
                    "see tests/lmms_eval_task/requirements-cpu.txt)")

from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402

from divico.integrations.lmms_eval import (  # noqa: E402
    DivicoLMM,
    compression_config_from_args,
    continuation_scores,
    greedy_settings,
    truncate_at_stop,
)

TASK_DIR = Path(__file__).parent / "lmms_eval_task"


def load_task_utils() -> Any:
    """tests/lmms_eval_task/utils.py (the tasks' own image builder), under a name no other module uses."""
    spec = importlib.util.spec_from_file_location("divico_lmms_eval_task_utils", TASK_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


square_image = load_task_utils().square_image

WORDS = ["what", "color", "is", "the", "shape", "of", "a", "red", "blue", "green", "circle", "square"]
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Three documents, of different prompt lengths so that a batch of two is left-padded.
COLORS = [[220, 30, 30], [30, 30, 220], [30, 200, 30]]
QUESTIONS = ["what color is the shape", "what is the color of the shape", "what shape"]
CHOICES = ["red", "blue circle", "green square shape"]  # 1, 2 and 3 tokens: the mean loss differs from the sum
MAX_NEW_TOKENS = 3  # divico_tiny_vqa.yaml's generation_kwargs
COMPRESSION = {"method": "divico", "keep_ratio": 0.25, "layer": 2}


def tiny_processor() -> LlavaProcessor:
    """Word-level tokenizer (unknown words -> ``w<id>``) fitting the tiny LLaVA (vocab 128, ``<image>`` = 120)."""
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB_SIZE) if i != IMAGE_TOKEN_ID})
    vocab["<image>"] = IMAGE_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"], chat_template=CHAT_TEMPLATE,
    )
    square = {"height": 32, "width": 32}
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False),
        tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>", chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LLaVA + processor saved as a model folder, and an (untrained) DiViCo compressor saved at keep 0.5."""
    root = tmp_path_factory.mktemp("lmms_eval_plugin")
    tiny_llava(seed=0).save_pretrained(root / "model")
    tiny_processor().save_pretrained(root / "model")
    model, _ = load_model_and_processor(str(root / "model"))
    divico.apply_compression(model, divico.CompressionConfig(method="divico", keep_ratio=0.5, layer=2))
    divico.save_compressor(model, root / "compressor")
    return {"root": root, "model": root / "model", "compressor": root / "compressor"}


def reference_model(saved: dict[str, Path]) -> tuple[Any, Any]:
    """The model the plugin should build from ``COMPRESSION`` + the saved compressor, built with divico's API."""
    model, processor = load_model_and_processor(str(saved["model"]))
    divico.apply_compression(model, divico.CompressionConfig(**COMPRESSION))
    divico.load_compressor(model, saved["compressor"], override_config=True)
    return model.eval(), processor


@torch.no_grad()
def reference_loss(model: Any, processor: Any, question: str, image: Any, continuation: str) -> tuple[float, bool]:
    """Mean loss of ``continuation`` after the chat prompt, from transformers' ``labels`` loss (one prompt, no pad)."""
    prompt = build_chat_text(processor, question, 1, False)
    inputs = processor(text=[prompt + continuation], images=[image], return_tensors="pt")
    prompt_length = processor(text=[prompt], images=[image], return_tensors="pt")["input_ids"].shape[1]
    labels = inputs["input_ids"].clone()
    labels[:, :prompt_length] = -100
    output = model(**inputs, labels=labels)
    greedy = output.logits[0, prompt_length - 1:-1].argmax(-1).equal(inputs["input_ids"][0, prompt_length:])
    return float(output.loss), bool(greedy)


def run_lmms_eval(work: Path, model_args: str, batch_size: int) -> tuple[dict, dict]:
    """``python -m lmms_eval`` in ``work`` (where the records are), offline; (results JSON, samples by task)."""
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "divico", "--model_args", model_args,
               "--tasks", "divico_tiny_vqa,divico_tiny_mc", "--include_path", str(TASK_DIR),
               "--batch_size", str(batch_size), "--log_samples", "--output_path", str(work / "out")]
    done = subprocess.run(command, check=False, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    results = sorted((work / "out").rglob("*_results.json"))
    # lmms-eval's CLI exits 0 after an error too: the result file is the evidence.
    assert results, f"lmms-eval wrote no results (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}"
    samples = {}
    for task in ("divico_tiny_vqa", "divico_tiny_mc"):
        (path,) = (work / "out").rglob(f"*_samples_{task}.jsonl")
        samples[task] = {row["doc_id"]: row for row in map(json.loads, path.read_text().splitlines())}
    return json.loads(results[0].read_text()), samples


def write_records(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_entry_point_registers_the_model() -> None:
    names = {entry.name: entry.value for entry in entry_points(group="lmms_eval.models")}
    assert names.get("divico") == "divico.integrations.lmms_eval:MODEL_MANIFEST", (
        f"divico's lmms_eval.models entry point is not installed ({names}); reinstall divico (pip install -e .)."
    )
    assert get_model("divico") is DivicoLMM


def test_lmms_eval_cli_end_to_end(saved: dict[str, Path], tmp_path: Path) -> None:
    model, processor = reference_model(saved)
    images = [square_image(color) for color in COLORS]
    expected_answers = [generate_batch(model, processor, [question], [[image]], max_new_tokens=MAX_NEW_TOKENS)[0]
                        for question, image in zip(QUESTIONS, images, strict=True)]
    assert len(set(expected_answers)) == 3, expected_answers  # else a mix-up of documents could go unseen
    expected_losses = [[reference_loss(model, processor, question, image, " " + choice) for choice in CHOICES]
                       for question, image in zip(QUESTIONS, images, strict=True)]
    # References: documents 0 and 2 answered right, document 1 wrong (both tasks: score 2/3).
    answers = [expected_answers[0], expected_answers[1] + " not", expected_answers[2]]
    best = [min(range(3), key=lambda c: losses[c][0]) for losses in expected_losses]
    labels = [best[0], (best[1] + 1) % 3, best[2]]
    write_records(tmp_path / "divico_tiny_vqa.jsonl", [
        {"question": q, "color": c, "answer": a} for q, c, a in zip(QUESTIONS, COLORS, answers, strict=True)])
    write_records(tmp_path / "divico_tiny_mc.jsonl", [
        {"question": q, "color": c, "choices": CHOICES, "label": label}
        for q, c, label in zip(QUESTIONS, COLORS, labels, strict=True)])

    model_args = (f"pretrained={saved['model']},method=divico,keep_ratio={COMPRESSION['keep_ratio']},"
                  f"layer={COMPRESSION['layer']},compressor={saved['compressor']}")
    results, samples = run_lmms_eval(tmp_path, model_args, batch_size=2)

    vqa = samples["divico_tiny_vqa"]
    assert [vqa[doc]["filtered_resps"] for doc in range(3)] == expected_answers
    hand_exact_match = sum(vqa[doc]["filtered_resps"] == answers[doc] for doc in range(3)) / 3
    assert results["results"]["divico_tiny_vqa"]["exact_match,none"] == pytest.approx(hand_exact_match)
    assert hand_exact_match == pytest.approx(2 / 3)

    mc = samples["divico_tiny_mc"]
    logged = [[(float(loss), greedy == "True") for loss, greedy in mc[doc]["filtered_resps"]] for doc in range(3)]
    for doc in range(3):
        assert [greedy for _, greedy in logged[doc]] == [greedy for _, greedy in expected_losses[doc]]
        assert [loss for loss, _ in logged[doc]] == pytest.approx([loss for loss, _ in expected_losses[doc]],
                                                                   abs=1e-4)
    hand_acc = sum(min(range(3), key=lambda c: logged[doc][c][0]) == labels[doc] for doc in range(3)) / 3
    assert results["results"]["divico_tiny_mc"]["acc,none"] == pytest.approx(hand_acc)
    assert hand_acc == pytest.approx(2 / 3)


# --- the model class in-process -----------------------------------------------------------------------------------
def requests_for(questions: list[str], gen_kwargs: dict[str, Any]) -> list[Instance]:
    def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
        return [square_image(doc["color"])]

    return [Instance(request_type="generate_until", arguments=(q, dict(gen_kwargs), doc_to_visual, i, "t", "test"),
                     idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i, q in enumerate(questions)]


def test_generate_until_respects_until_and_max_new_tokens(saved: dict[str, Path]) -> None:
    lm = DivicoLMM(pretrained=str(saved["model"]), batch_size="2")
    lm.task_dict = {"t": {"test": [{"color": color} for color in COLORS]}}
    long = lm.generate_until(requests_for(QUESTIONS, {"max_new_tokens": 4, "until": None}))
    model, processor = load_model_and_processor(str(saved["model"]))
    assert long == [generate_batch(model.eval(), processor, [q], [[square_image(c)]], max_new_tokens=4)[0]
                    for q, c in zip(QUESTIONS, COLORS, strict=True)]
    short = lm.generate_until(requests_for(QUESTIONS, {"max_new_tokens": 2}))
    assert [answer.split() for answer in short] == [answer.split()[:2] for answer in long]  # greedy: a prefix
    # Stop at the first word that differs from the answer's first word: the answer is cut just before it.
    doc = next(i for i, answer in enumerate(long) if len(set(answer.split())) > 1)
    stop = next(word for word in long[doc].split() if word != long[doc].split()[0])
    cut = lm.generate_until(requests_for(QUESTIONS, {"max_new_tokens": 4, "until": ["\n\n", stop]}))[doc]
    assert cut and stop not in cut and long[doc].startswith(cut) and long[doc][len(cut):].startswith(stop)


def test_generate_until_multi_round_feeds_each_round_the_earlier_answers(saved: dict[str, Path]) -> None:
    """lmms-eval's multi-round protocol: round 0 answers the context; each later round's context and visuals come
    from doc_to_text(previous_output=...), until it signals the end. Every round equals a single greedy answer."""
    lm = DivicoLMM(pretrained=str(saved["model"]), batch_size="1")
    lm.task_dict = {"t": {"test": [{"color": color} for color in COLORS]}}
    seen: list[list[str]] = []

    def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
        return [square_image(doc["color"])]

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        seen.append(list(previous_output))
        other = COLORS[(COLORS.index(doc["color"]) + 1) % len(COLORS)]
        return [square_image(other)], QUESTIONS[1], round_idx == 2, previous_output, {"other": other}

    requests = [Instance(request_type="generate_until_multi_round",
                         arguments=(QUESTIONS[0], {"max_new_tokens": 3}, doc_to_visual, doc_to_text, i, "t", "test"),
                         idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i in range(2)]
    answers = lm.generate_until_multi_round(requests)
    model, processor = load_model_and_processor(str(saved["model"]))
    model.eval()
    for doc, rounds in enumerate(answers):
        other = COLORS[(doc + 1) % len(COLORS)]
        assert rounds == [generate_batch(model, processor, [QUESTIONS[0]], [[square_image(COLORS[doc])]],
                                         max_new_tokens=3)[0],
                          generate_batch(model, processor, [QUESTIONS[1]], [[square_image(other)]],
                                         max_new_tokens=3)[0]]
    # doc 0: round 1 sees [r0], round 2 sees [r0, r1] (and ends); then doc 1 likewise
    assert seen == [answers[0][:1], answers[0][:2], answers[1][:1], answers[1][:2]]


def test_greedy_settings() -> None:
    assert greedy_settings({"until": "\n", "max_new_tokens": 5, "temperature": 0, "top_p": 1.0}, 9) == (5, ("\n",))
    assert greedy_settings({"do_sample": False, "num_beams": 1}, 9) == (9, ())
    assert greedy_settings({"until": ["\n\n", "", "."]}, 9) == (9, ("\n\n", "."))
    for sampling, named in (({"do_sample": True}, "do_sample=True"), ({"temperature": 0.2}, "temperature=0.2"),
                            ({"num_beams": 3}, "num_beams=3")):
        with pytest.raises(ValueError, match=named):
            greedy_settings(sampling, 9)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_settings({"max_new_tokens": 0}, 9)
    with pytest.raises(ValueError, match="until"):
        greedy_settings({"until": 3}, 9)


def test_truncate_at_stop() -> None:
    assert truncate_at_stop("yes. no\n\nmore", ["\n\n", "."]) == "yes"
    assert truncate_at_stop("answer", ["\n"]) == "answer"
    assert truncate_at_stop("answer", []) == "answer"


def test_continuation_scores_by_hand() -> None:
    # Row 0 (no padding): continuation = its last 2 tokens [2, 0], predicted at positions 0 and 1; row 1 (left
    # padded): its last token [1], predicted at position 1.
    logits = torch.zeros(2, 3, 3)
    logits[0, 0] = torch.tensor([0.0, 0.0, 2.0])  # token 2 is the argmax: greedy
    logits[0, 1] = torch.tensor([1.0, 0.0, 0.0])  # token 0 is the argmax: greedy
    logits[1, 1] = torch.tensor([3.0, 1.0, 0.0])  # token 1 is not the argmax
    input_ids = torch.tensor([[1, 2, 0], [0, 0, 1]])
    (loss0, greedy0), (loss1, greedy1) = continuation_scores(logits, input_ids, [2, 1])
    nll_token2 = -(2.0 - math.log(1.0 + 1.0 + math.e**2))  # -log softmax([0, 0, 2])[2]
    nll_token0 = -(1.0 - math.log(math.e + 1.0 + 1.0))  # -log softmax([1, 0, 0])[0]
    nll_token1 = -(1.0 - math.log(math.e**3 + math.e + 1.0))  # -log softmax([3, 1, 0])[1]
    assert loss0 == pytest.approx((nll_token2 + nll_token0) / 2, abs=1e-6) and greedy0
    assert loss1 == pytest.approx(nll_token1, abs=1e-6) and not greedy1
    with pytest.raises(ValueError, match="continuation length"):
        continuation_scores(logits, input_ids, [3, 1])


def test_model_args_are_checked(saved: dict[str, Path]) -> None:
    with pytest.raises(TypeError, match="keep_ratoi.*valid names"):
        DivicoLMM(pretrained=str(saved["model"]), method="fastv", keep_ratoi=0.5)
    with pytest.raises(ValueError, match="no method"):
        compression_config_from_args(None, None, {"keep_ratio": 0.5})
    with pytest.raises(ValueError, match="batch_size"):
        DivicoLMM(pretrained=str(saved["model"]), batch_size="auto")
    assert compression_config_from_args(None, None, {}) is None
    # A saved compressor's config is the starting point; model_args override it (keep_tokens replaces keep_ratio).
    config = compression_config_from_args(None, saved["compressor"], {"keep_tokens": 8, "layer": 1})
    assert (config.method, config.keep_ratio, config.keep_tokens, config.layer) == ("divico", None, 8, 1)
