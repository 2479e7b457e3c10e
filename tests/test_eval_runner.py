"""Tests of divico.evaluation.generation and divico.evaluation.runner: batched greedy generation, predictions files,
scores, resume after a crash, data-parallel sharding (2 CPU processes) and compare mode.

Everything runs on the tiny random LLaVA of tests/tiny_models.py with a tiny word-level tokenizer and 32 px PNGs
written to tmp_path; :class:`ColorBench` is a minimal benchmark whose score is the exact-match share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image
from tiny_models import IMAGE_TOKEN_ID, VOCAB_SIZE, randomize_compressor, tiny_llava
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import divico
from divico.evaluation import benchmark as benchmark_module
from divico.evaluation.benchmark import Benchmark, Sample
from divico.evaluation.generation import GenerationTimings, generate_batch
from divico.evaluation.runner import (
    EvalConfiguration,
    compare_configurations,
    configured,
    evaluate_benchmark,
    format_comparison_table,
    read_predictions,
)
from divico.lora import has_lora, inject_lora, lora_target_regex

TESTS = Path(__file__).resolve().parent
WORDS = ["what", "color", "is", "the", "shape", "a", "red", "blue", "green", "circle", "square", "how", "many"]
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
PROMPTS = ["what color is the shape", "what is the shape", "how many shape", "what color", "is the shape red",
           "what shape is blue"]


def tiny_llava_processor() -> LlavaProcessor:
    """Word-level tokenizer whose ids fit the tiny LLaVA (vocab 128, ``<image>`` = 120) + a 32 px image processor."""
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
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False),
        tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>", chat_template=CHAT_TEMPLATE,
    )


def write_images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        paths.append(folder / f"{index}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    return paths


class ColorBench(Benchmark):
    """Six questions over ``data_root/images`` (question 1 shows two images, question 4 has its own budget of 2
    tokens); ``references`` (settable) default to "red"; score = exact-match share in %."""

    folder = "colors"
    default_max_new_tokens = 4
    option_defaults = {"references": None}

    def load(self) -> list[Sample]:
        images = write_images(self.root / "images", 7)
        references = self.options["references"] or {}
        samples = []
        for index, prompt in enumerate(PROMPTS):
            shown = (images[index], images[6]) if index == 1 else (images[index],)
            samples.append(Sample(question_id=f"q{index}", prompt=prompt, images=shown,
                                  reference=references.get(f"q{index}", "red"), meta={"index": index},
                                  max_new_tokens=2 if index == 4 else None))
        return samples

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *, judge: Any = None) -> dict[str, Any]:
        answers = self.require_predictions(predictions, samples)
        hits = sum(answer == s.reference for answer, s in zip(answers, samples, strict=True))
        return {"score": 100.0 * hits / len(samples), "n": len(samples), "hits": hits}


ColorBench.name = "tiny_colors"


def budget(sample: Sample) -> int:
    return sample.max_new_tokens or ColorBench.default_max_new_tokens


def answers_one_by_one(model: torch.nn.Module, processor: Any, samples: Sequence[Sample]) -> dict[str, str]:
    """Reference answers: each question alone through generate_batch (itself checked against model.generate)."""
    out = {}
    for s in samples:
        images = [Image.open(path).convert("RGB") for path in s.images]
        out[s.question_id] = generate_batch(model, processor, [s.prompt], [images], max_new_tokens=budget(s))[0]
    return out


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def processor() -> LlavaProcessor:
    return tiny_llava_processor()


# -- generation -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fastv", "divico"])
def test_generate_batch_equals_model_generate_one_by_one(tmp_path: Path, processor: LlavaProcessor,
                                                         method: str) -> None:
    model = tiny_llava()
    divico.apply_compression(model, divico.CompressionConfig(method, keep_ratio=0.25, layer=2))
    if method == "divico":
        randomize_compressor(model)
    paths = write_images(tmp_path, 4)
    images = [[Image.open(paths[0])], [Image.open(paths[1]), Image.open(paths[2])], [Image.open(paths[3])]]
    prompts = ["what color is the shape", "what is the shape", "how many"]
    timings = GenerationTimings()
    batch = generate_batch(model, processor, prompts, images, max_new_tokens=5, timings=timings)
    # keep_ratio 0.25 of each prompt's pool: 64 tokens -> 16, two images (128) -> 32.
    assert divico.last_report(model).num_kept.tolist() == [16, 32, 16]
    expected = []
    for prompt, imgs in zip(prompts, images, strict=True):
        content = [{"type": "image"}] * len(imgs) + [{"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=imgs, text=[text], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
        expected.append(processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                                   skip_special_tokens=True).strip())
    assert batch == expected
    assert len(set(expected)) > 1  # the answers depend on the inputs
    assert (timings.batches, timings.prompts, timings.decode_steps) == (1, 3, 4)
    assert timings.generated_tokens == 15  # nobody produced the end-of-sequence id within 5 tokens
    assert timings.prefill_seconds > 0 and timings.decode_seconds > 0
    assert timings.tokens_per_second == pytest.approx(15 / (timings.prefill_seconds + timings.decode_seconds))
    assert timings.decode_ms_per_token == pytest.approx(1000 * timings.decode_seconds / 4)


def test_generated_tokens_stop_at_the_end_of_sequence(tmp_path: Path, processor: LlavaProcessor) -> None:
    model = tiny_llava()
    paths = write_images(tmp_path, 2)
    prompts, images = ["what color", "what is the shape"], [[Image.open(paths[0])], [Image.open(paths[1])]]
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                             "text": p}]}],
                                           add_generation_prompt=True) for p in prompts]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=[i[0] for i in images], text=texts, padding=True, return_tensors="pt")
    model.generation_config.eos_token_id = None
    free = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, inputs["input_ids"].shape[1]:]
    eos = int(free[0, 0])  # prompt 0 now ends with its first token; prompt 1 where it first produces that id
    model.generation_config.eos_token_id = eos
    row1 = free[1].tolist()
    expected = 1 + (row1.index(eos) + 1 if eos in row1 else 4)
    timings = GenerationTimings()
    generate_batch(model, processor, prompts, images, max_new_tokens=4, timings=timings)
    assert timings.generated_tokens == expected
    assert timings.decode_steps == expected - 2  # one step per position after the first, until the last row ends


def test_generate_batch_refuses_bad_input(tmp_path: Path, processor: LlavaProcessor) -> None:
    model = tiny_llava()
    image = Image.open(write_images(tmp_path, 1)[0])
    with pytest.raises(ValueError, match="no video processor"):
        generate_batch(model, processor, ["what"], [[image]], [np.zeros((2, 32, 32, 3), np.uint8)])
    with pytest.raises(ValueError, match="one sequence per prompt: 2 prompts, 1 entries"):
        generate_batch(model, processor, ["what", "is"], [[image]])
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        generate_batch(model, processor, ["what"], [[image]], max_new_tokens=0)


# -- one benchmark: files, scores, resume ---------------------------------------------------------------------------

def test_evaluate_benchmark_writes_predictions_and_scores(tmp_path: Path, processor: LlavaProcessor) -> None:
    model = tiny_llava()
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_tokens=16, layer=2))
    bench = ColorBench(tmp_path / "data")
    samples = bench.load()
    expected = answers_one_by_one(model, processor, samples)
    # Two questions get their true answer as reference: score 2/5 = 40 % on the first five.
    bench = ColorBench(tmp_path / "data", references={"q0": expected["q0"], "q3": expected["q3"]})
    result = evaluate_benchmark(model, processor, bench, tmp_path / "out", limit=5, batch_size=2,
                                show_progress=False, run_info={"compressor": None})
    folder = tmp_path / "out" / "tiny_colors"
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert {r["question_id"]: r["prediction"] for r in rows} == {q: expected[q] for q in ["q0", "q1", "q2", "q3", "q4"]}
    assert rows[1]["prompt"] == "what is the shape" and len(rows[1]["images"]) == 2 and rows[1]["meta"] == {"index": 1}
    assert len(rows[4]["prediction"].split()) == 2  # the sample's own budget (2) beat the benchmark's (4)
    scores = json.loads((folder / "scores.json").read_text())
    assert scores == json.loads(json.dumps(result))
    assert scores["scores"] == {"score": 40.0, "n": 5, "hits": 2}
    config = scores["config"]
    assert config["compression"]["method"] == "fastv" and config["compression"]["keep_tokens"] == 16
    assert config["compression"]["layer"] == 2 and config["dtype"] == "float32"
    assert (config["limit"], config["batch_size"], config["num_processes"], config["questions"]) == (5, 2, 1, 5)
    # q1 shows two images (128 tokens), the others one (64); 16 kept each.
    assert scores["visual_tokens"] == {"total": 6 * 64, "kept": 5 * 16, "questions": 5}
    timings = scores["timings"]
    # Batches of two with equal budgets: [q0 q1] [q2 q3] then q4 (budget 2) alone.
    assert (timings["batches"], timings["prompts"], timings["decode_steps"]) == (3, 5, 3 + 3 + 1)
    assert timings["generated_tokens"] == 4 * 4 + 2 and timings["prefill_ms_per_batch"] > 0


class CrashAfter:
    """Wraps ``model.generate``: counts calls and raises on call number ``crash_at`` (None: never)."""

    def __init__(self, model: torch.nn.Module, crash_at: int | None) -> None:
        self.calls, self.crash_at, self.generate = 0, crash_at, model.generate
        model.generate = self  # instance attribute: only this model object is affected

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        return self.generate(*args, **kwargs)


def test_a_crashed_run_resumes_without_redoing_anything(tmp_path: Path, processor: LlavaProcessor) -> None:
    bench = ColorBench(tmp_path / "data")
    straight_model = tiny_llava()
    evaluate_benchmark(straight_model, processor, bench, tmp_path / "straight", show_progress=False)
    straight = (tmp_path / "straight" / "tiny_colors" / "predictions.jsonl").read_bytes()

    model = tiny_llava()
    crash = CrashAfter(model, crash_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_benchmark(model, processor, bench, tmp_path / "out", show_progress=False)
    path = tmp_path / "out" / "tiny_colors" / "predictions.jsonl"
    assert list(read_predictions(path)) == ["q0", "q1", "q2"]
    with path.open("a") as handle:  # the process was killed while writing q3's line
        handle.write('{"question_id": "q3", "predic')
    assert list(read_predictions(path)) == ["q0", "q1", "q2"]
    crash.crash_at, crash.calls = None, 0
    evaluate_benchmark(model, processor, bench, tmp_path / "out", show_progress=False)
    assert crash.calls == 3  # q3, q4, q5 only
    assert path.read_bytes() == straight

    # A limited run, then the full one: only the rest is asked, the file is the straight run's again.
    model2 = tiny_llava()
    counter = CrashAfter(model2, crash_at=None)
    evaluate_benchmark(model2, processor, bench, tmp_path / "limited", limit=2, show_progress=False)
    evaluate_benchmark(model2, processor, bench, tmp_path / "limited", show_progress=False)
    assert counter.calls == 6
    assert (tmp_path / "limited" / "tiny_colors" / "predictions.jsonl").read_bytes() == straight
    # And a rerun asks nothing.
    evaluate_benchmark(model2, processor, bench, tmp_path / "limited", show_progress=False)
    assert counter.calls == 6


def test_resume_refuses_another_configuration(tmp_path: Path, processor: LlavaProcessor) -> None:
    model = tiny_llava()
    bench = ColorBench(tmp_path / "data")
    evaluate_benchmark(model, processor, bench, tmp_path / "out", limit=1, show_progress=False)
    divico.apply_compression(model, divico.CompressionConfig("fastv", keep_ratio=0.5))
    with pytest.raises(ValueError, match="holds predictions of another configuration.*compression: None then"):
        evaluate_benchmark(model, processor, bench, tmp_path / "out", show_progress=False)


def test_a_damaged_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"question_id": "a", "prediction": "x"}\nnot json\n{"question_id": "b", "prediction": "y"}\n')
    with pytest.raises(ValueError, match="predictions.jsonl, line 2: not a JSON object"):
        read_predictions(path)


# -- data parallel --------------------------------------------------------------------------------------------------

LAUNCHER = """
import sys
sys.path.insert(0, {tests!r})
from test_eval_runner import ColorBench
from divico.evaluation.benchmark import register_benchmark
from divico.cli import main
register_benchmark("tiny_colors")(ColorBench)
sys.exit(main())
"""


def test_two_cpu_processes_give_the_single_process_files(tmp_path: Path) -> None:
    """SLOWEST TEST (~30 s): `accelerate launch --multi_gpu --num_processes 2 ... eval` on CPUs == one process,
    byte for byte.

    ``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.15 (its simple launcher,
    no mpirun), so the two CPU processes come from the torchrun launcher ``--multi_gpu`` selects; the runner's
    ``process_state`` makes them one gloo group. The benchmark is the test's own, so the launcher script registers it and then runs ``divico.cli.main`` (the
    module ``-m divico.cli`` runs)."""
    model_dir = tmp_path / "model"
    tiny_llava().save_pretrained(model_dir)
    tiny_llava_processor().save_pretrained(model_dir)
    launcher = tmp_path / "launch_eval.py"
    launcher.write_text(LAUNCHER.format(tests=str(TESTS)))
    ColorBench(tmp_path / "data").load()  # writes the images once, before two processes would
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def eval_args(out: Path) -> list[str]:
        return ["eval", "--model", str(model_dir), "--benchmark", "tiny_colors", "--data-root", str(tmp_path / "data"),
                "--out", str(out), "--method", "fastv", "--keep-ratio", "0.25", "--no-progress"]

    single = subprocess.run([sys.executable, str(launcher), *eval_args(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    double = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(launcher), *eval_args(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = tmp_path / "one" / "tiny_colors", tmp_path / "two" / "tiny_colors"
    assert (two / "predictions.jsonl").read_bytes() == (one / "predictions.jsonl").read_bytes()
    assert len((one / "predictions.jsonl").read_text().splitlines()) == len(PROMPTS)
    assert sorted(p.name for p in two.iterdir()) == ["predictions.jsonl", "run_config.json", "scores.json"]
    scores_one, scores_two = (json.loads((d / "scores.json").read_text()) for d in (one, two))
    assert scores_two["scores"] == scores_one["scores"]
    assert scores_two["visual_tokens"] == scores_one["visual_tokens"]
    assert scores_two["config"]["num_processes"] == 2 and scores_one["config"]["num_processes"] == 1
    assert scores_two["timings"]["prompts"] == scores_one["timings"]["prompts"] == len(PROMPTS)
    assert double.stdout.count("| 75.0% | fastv@0.25 |") == 1  # the table is printed once, by the main process


# -- configurations and compare mode --------------------------------------------------------------------------------

def test_configuration_syntax(tmp_path: Path) -> None:
    saved = tmp_path / "ckpt"
    model = divico.apply_compression(tiny_llava(), divico.CompressionConfig("divico", keep_tokens=8))
    divico.save_compressor(model, saved)
    assert EvalConfiguration.parse("baseline").is_baseline
    fastv = EvalConfiguration.parse("fastv:0.111")
    assert fastv.name == "fastv@0.111" and fastv.compression.keep_ratio == pytest.approx(0.111)
    assert fastv.compression.layer == 2 and fastv.compressor is None
    tokens = EvalConfiguration.parse("mine=divico:64:layer=3:encoder=deterministic", default_layer=5)
    assert tokens.name == "mine" and tokens.compression.keep_tokens == 64 and tokens.compression.layer == 3
    assert tokens.compression.encoder == "deterministic"
    assert EvalConfiguration.parse(f"divico:0.25:{saved}").compressor == saved
    assert EvalConfiguration.parse(f"divico:0.25:compressor={saved}").compressor == saved
    alone = EvalConfiguration.parse(str(saved))
    assert alone.name == "ckpt" and alone.compression is None and alone.compressor == saved
    with pytest.raises(ValueError, match="Unknown method 'fast' in configuration 'fast:0.1'"):
        EvalConfiguration.parse("fast:0.1")
    with pytest.raises(ValueError, match="KEEP must be a keep ratio .* got 'x'"):
        EvalConfiguration.parse("fastv:x")
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        EvalConfiguration.parse("fastv:1.5")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        EvalConfiguration.parse(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="Unknown option 'depth=2'"):
        EvalConfiguration.parse("fastv:0.5:depth=2")


def test_comparison_table_by_hand() -> None:
    def run(score: float | None, compression: dict[str, Any] | None, kept: int = 0) -> dict[str, Any]:
        return {"scores": {"score": score}, "config": {"compression": compression, "questions": 2},
                "timings": {"batches": 2, "prefill_seconds": 0.05},
                "visual_tokens": {"kept": kept, "total": 1152, "questions": 2} if compression else None}

    rate = {"keep_ratio": 0.25, "keep_tokens": None}
    results = {
        "baseline": {"a": run(80.0, None), "b": run(40.0, None)},
        "fastv@0.25": {"a": run(50.0, rate, 288), "b": run(20.0, rate, 288)},
        "deco@0.25": {"a": run(40.0, rate, 288), "b": run(25.0, rate, 288)},
        "divico@0.25": {"a": run(60.0, rate, 288), "b": run(None, rate, 288)},
    }
    lines = format_comparison_table(results, ["a", "b"]).splitlines()
    assert lines[0] == "| Rate | Configuration | Visual tokens | Prefill (ms) | a | b |"
    assert lines[2] == "| - | baseline | all | 25.0 | 80.0 | 40.0 |"
    assert lines[3] == "| 75.0% | fastv@0.25 | 144.0/576.0 | 25.0 | 50.0 | 20.0 |"
    assert lines[5] == "| 75.0% | divico@0.25 | 144.0/576.0 | 25.0 | 60.0 | - |"
    # (60 - max(50, 40)) / 50 = +20 %; b has no score for the last configuration.
    assert lines[6] == "| 75.0% | Improvement (divico@0.25 vs best other) | | | +20.0% | - |"
    assert len(lines) == 7


def save_lora_compressor(folder: Path) -> None:
    """A DiViCo compressor with a LoRA adapter that changes the model's outputs."""
    model = tiny_llava()
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=lora_target_regex(model, None)))
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.25, layer=2))
    randomize_compressor(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    divico.save_compressor(model, folder)


def test_compare_mode_with_one_model_load(tmp_path: Path, processor: LlavaProcessor) -> None:
    save_lora_compressor(tmp_path / "ckpt")
    bench = ColorBench(tmp_path / "data")
    samples = bench.load()[:3]
    plain = answers_one_by_one(tiny_llava(), processor, samples)
    fastv_model = divico.apply_compression(tiny_llava(), divico.CompressionConfig("fastv", keep_ratio=0.25, layer=2))
    fastv = answers_one_by_one(fastv_model, processor, samples)
    ours_model = divico.load_compressor(tiny_llava(), tmp_path / "ckpt")
    ours = answers_one_by_one(ours_model.eval(), processor, samples)
    assert ours != plain  # LoRA and g_theta act, so a LoRA left behind would show in the baseline
    bench = ColorBench(tmp_path / "data", references=plain)

    model = tiny_llava()
    configurations = [EvalConfiguration.parse(s) for s in ("fastv:0.25", f"ours=divico:0.25:{tmp_path / 'ckpt'}",
                                                           "baseline")]
    results = compare_configurations(model, processor, configurations, [bench], tmp_path / "out", limit=3,
                                     show_progress=False)
    for name, expected in (("fastv@0.25", fastv), ("ours", ours), ("baseline", plain)):
        lines = (tmp_path / "out" / name / "tiny_colors" / "predictions.jsonl").read_text().splitlines()
        assert {json.loads(line)["question_id"]: json.loads(line)["prediction"] for line in lines} == expected, name
    assert results["baseline"]["tiny_colors"]["scores"]["score"] == 100.0
    hits = {name: sum(answers[q] == plain[q] for q in answers) for name, answers in (("fastv@0.25", fastv),
                                                                                     ("ours", ours))}
    assert results["ours"]["tiny_colors"]["scores"]["hits"] == hits["ours"]
    assert results["ours"]["tiny_colors"]["config"]["lora"] is True
    table = (tmp_path / "out" / "table.md").read_text()
    assert table == format_comparison_table(results, ["tiny_colors"]) + "\n"
    assert "| 75.0% | Improvement (ours vs best other) |" in table
    # The model is the stock model again: no hooks, no LoRA, the same logits as a fresh one.
    assert divico.get_runtime(model) is None and not has_lora(model)
    inputs = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    torch.testing.assert_close(model(**inputs).logits, tiny_llava()(**inputs).logits, rtol=0, atol=0)


def test_a_trained_compressor_is_evaluated_at_the_rate_asked_for(tmp_path: Path) -> None:
    """METHOD:KEEP:DIR: the rate and layer given, the saved weight-shaping fields (g_theta's width, the KL
    reduction of a checkpoint saved before that field) kept; the weights are the saved ones."""
    model = tiny_llava()
    divico.apply_compression(model, divico.CompressionConfig("divico", keep_ratio=0.5, layer=2,
                                                             encoder_hidden_size=16, kl_reduction="mean"))
    randomize_compressor(model)
    divico.save_compressor(model, tmp_path / "ckpt")
    saved = {name: tensor.clone() for name, tensor in model.divico_compressor.state_dict().items()}
    stock = tiny_llava()
    with configured(stock, EvalConfiguration.parse(f"divico:0.25:layer=1:{tmp_path / 'ckpt'}")):
        config = divico.compression_config(stock)
        assert (config.keep_ratio, config.layer) == (0.25, 1)
        assert (config.encoder_hidden_size, config.kl_reduction) == (16, "mean")
        for name, tensor in stock.divico_compressor.state_dict().items():
            torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    assert divico.get_runtime(stock) is None


def test_compare_refuses_repeated_names(tmp_path: Path, processor: LlavaProcessor) -> None:
    configurations = [EvalConfiguration.parse("fastv:0.5"), EvalConfiguration.parse("fastv:0.5")]
    with pytest.raises(ValueError, match=r"\['fastv@0.5'\] repeat"):
        compare_configurations(tiny_llava(), processor, configurations, [ColorBench(tmp_path)], tmp_path / "o")


@pytest.fixture
def registered_color_bench(monkeypatch: pytest.MonkeyPatch) -> type[ColorBench]:
    """ColorBench in the benchmark registry for one test (the registry is restored afterwards)."""
    monkeypatch.setitem(benchmark_module._BENCHMARKS, "tiny_colors", ColorBench)
    return ColorBench


def test_configured_restores_the_projector_a_deco_compressor_overwrote(tmp_path):
    """Compare mode loads DeCo's trained projector into the model itself; leaving the configuration puts the stock
    weights back, so the configurations after it (e.g. the baseline) are not evaluated with DeCo's projector."""
    model = tiny_llava(seed=0).eval()
    stock = {key: value.clone() for key, value in model.state_dict().items()}
    trained = tiny_llava(seed=0).eval()
    divico.apply_compression(trained, divico.CompressionConfig("deco", keep_ratio=0.25))
    with torch.no_grad():
        for parameter in trained.model.multi_modal_projector.parameters():
            parameter.add_(torch.randn_like(parameter))
    divico.save_compressor(trained, tmp_path / "deco")
    with configured(model, EvalConfiguration("deco", compressor=tmp_path / "deco")):
        loaded = model.model.multi_modal_projector.linear_1.weight
        assert not torch.equal(loaded, stock["model.multi_modal_projector.linear_1.weight"])
    after = model.state_dict()
    assert after.keys() == stock.keys() and all(torch.equal(after[key], stock[key]) for key in stock)
