"""Default-model recipe pieces (LoRA merge, export) and the demo's tables on hand-made results."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from divico.cli import main
from divico.registry import available_methods, get_method_class
from tiny_models import IMAGE_SIZE, sample, tiny_llava
from transformers import CLIPImageProcessor

from divico_testbed.data import (
    SMALL_SIZES,
    Scene,
    SceneObject,
    Sign,
    load_scenes,
    write_benchmark_splits,
    write_multiturn_training,
)
from divico_testbed.demo import (
    RUN_TITLES,
    DemoConfig,
    RunSpec,
    assets_fingerprint,
    comparison_pairs,
    cpu_supports_native_bf16,
    demo_runs,
    format_differences,
    format_fidelity,
    format_table1,
    format_table3,
    interleaved_timings,
    method_title,
    relative_improvement,
    resolve_timing_dtype,
    run_fingerprint,
    select_runs,
    timing_summary,
)
from divico_testbed.evaluation import best_constant_scores
from divico_testbed.recipe import (
    ASSETS_DIR,
    PORTABLE_BASE_MODEL,
    RUN_ONLY_FILES,
    RecipeConfig,
    align_projector,
    calibrate_projector,
    compressor_base_record,
    compressor_runs,
    compressor_training_config,
    export_assets,
    merge_lora,
    scene_patch_targets,
    scene_patch_words,
    stage_finished,
    validation_subset,
    warm_start_seed,
    write_visual_words,
)


def test_merge_lora_keeps_outputs_and_removes_lora_modules():
    peft = pytest.importorskip("peft")
    model = tiny_llava(seed=0)
    peft.inject_adapter_in_model(
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)"), model
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        with_lora = model(**sample()).logits
        merge_lora(model)
        merged = model(**sample()).logits
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(merged, with_lora, atol=1e-5, rtol=1e-5)


def test_recipe_runs_cover_paper_rates_and_ablations():
    runs = compressor_runs(RecipeConfig())
    keep = {name: cfg.keep_ratio for name, cfg in runs.items()}
    assert keep["divico-keep16.7"] == pytest.approx(1 / 6)
    assert keep["deco-keep6.7"] == pytest.approx(1 / 15)
    assert [runs[f"variant_a-{tag}"].method for tag in ("keep16.7", "keep11.1", "keep6.7")] == ["fastv"] * 3
    assert runs["variant_b-keep11.1"].encoder == "deterministic"
    assert runs["divico_klmean-keep11.1"].kl_reduction == "mean" and runs["divico-keep11.1"].kl_reduction == "sum"
    assert len(runs) == 3 * 3 + 2 and "variant_b-keep16.7" not in runs
    assert RecipeConfig().scaled(2.0).stage2_steps == 2 * RecipeConfig().stage2_steps
    with pytest.raises(ValueError, match="steps scale must be > 0"):
        RecipeConfig().scaled(0)


def test_export_copies_trained_parts_only(tmp_path):
    stage = tmp_path / "run" / "compressors" / "divico-keep11.1"
    (stage / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (stage / "checkpoints" / "checkpoint-10" / "optimizer.pt").write_bytes(b"x")
    (stage / "lora").mkdir()
    (stage / "lora" / "adapter_model.safetensors").write_bytes(b"w")
    for name in ("config.json", "training_config.json", "compressor.safetensors"):
        (stage / name).write_text("{}")
    (stage / "recipe_base.json").write_text(json.dumps({"stage2_steps": 30}))
    unfinished = tmp_path / "run" / "compressors" / "deco-keep6.7"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    stage1 = tmp_path / "run" / "stage1"  # finished, but only stage 2 of its own run reads it
    stage1.mkdir()
    for name in ("config.json", "training_config.json", "compressor.safetensors", "calibration.json"):
        (stage1 / name).write_text("{}")
    target = export_assets(tmp_path / "run", tmp_path / "assets")
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["compressors/divico-keep11.1/compressor.safetensors", "compressors/divico-keep11.1/config.json",
                     "compressors/divico-keep11.1/lora/adapter_model.safetensors",
                     "compressors/divico-keep11.1/training_config.json"]


def test_export_replaces_the_training_machines_paths(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r9"
    stage = run / "stage2"
    (stage / "lora").mkdir(parents=True)
    (stage / "compressor.safetensors").write_bytes(b"w")
    (stage / "config.json").write_text(json.dumps({"base_model": "/home/me/.cache/divico/default-base-168",
                                                   "hidden_size": 576}, indent=2))
    (stage / "lora" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/home/me/.cache/divico/default-base-168", "r": 16}, indent=2) + "\n")
    (stage / "training_config.json").write_text(json.dumps({
        "data_path": str(run / "data" / "llava_train.json"), "image_folder": str(run / "data"),
        "init_from": str(tmp_path / "runs" / "init9"), "output_dir": str(stage), "max_steps": 180}, indent=2))
    (run / "recipe.json").write_text(json.dumps({"output_dir": str(run), "image_size": 168,
                                                 "stage2_init": "/elsewhere/init9/stage2"}, indent=2))
    monkeypatch.chdir(tmp_path)  # paths under the working directory are shipped relative to it
    target = export_assets("runs/r9", tmp_path / "assets")
    config = json.loads((target / "stage2" / "config.json").read_text())
    assert config == {"base_model": PORTABLE_BASE_MODEL.format(image_size=168), "hidden_size": 576}
    adapter = (target / "stage2" / "lora" / "adapter_config.json").read_text()
    assert adapter.endswith("}\n")  # the file's own format is kept
    assert json.loads(adapter)["base_model_name_or_path"] == "divico-testbed:default-base-168"
    assert json.loads((target / "stage2" / "training_config.json").read_text()) == {
        "data_path": "runs/r9/data/llava_train.json", "image_folder": "runs/r9/data", "init_from": "runs/init9",
        "output_dir": "runs/r9/stage2", "max_steps": 180}
    # A path outside the working directory and the runs' folder keeps only its name.
    assert json.loads((target / "recipe.json").read_text()) == {"output_dir": "runs/r9", "image_size": 168,
                                                                "stage2_init": "stage2"}
    assert str(tmp_path) not in "".join(p.read_text() for p in target.rglob("*.json"))


def test_shipped_assets_hold_no_machine_paths_and_no_run_state():
    texts = {p.relative_to(ASSETS_DIR).as_posix(): p.read_text() for p in ASSETS_DIR.rglob("*.json")}
    assert texts and not [name for name, text in texts.items() if '"/' in text]  # no absolute path anywhere
    assert not (ASSETS_DIR / "stage1").exists()
    assert not [p for p in ASSETS_DIR.rglob("*") if p.name in RUN_ONLY_FILES]
    for name, text in texts.items():
        if name.endswith("/config.json") and "/lora/" not in name:
            assert json.loads(text)["base_model"] == PORTABLE_BASE_MODEL.format(image_size=168), name


def test_demo_titles_come_from_the_method_registry():
    assert not set(RUN_TITLES) & set(available_methods())  # the demo's own run names are no method names
    for spec in demo_runs(ASSETS_DIR, ablation=True):
        if spec.method in available_methods():
            assert method_title(spec.method) == get_method_class(spec.method).title() != ""
        else:
            assert method_title(spec.method) == RUN_TITLES[spec.method]
    assert [method_title(m) for m in ("fastv", "deco", "divico")] == ["FastV", "DeCo", "DiViCo"]
    with pytest.raises(ValueError, match="Unknown method 'nope'"):
        method_title("nope")


def _row(method, tag, scores, kept, flops, memory, seconds):
    return {"method": method, "tag": tag, "scores": scores,
            "efficiency": {"visual_tokens": 144, "kept_tokens": kept, "flops": flops, "peak_memory_bytes": memory,
                           "prefill_seconds": seconds}}


def test_demo_results_are_keyed_by_checkpoint_content(tmp_path):
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "compressor.safetensors").write_bytes(b"weights-1")
    (tmp_path / "recipe.json").write_text("{}")
    first = assets_fingerprint(tmp_path)
    assert assets_fingerprint(tmp_path) == first
    (tmp_path / "stage2" / "compressor.safetensors").write_bytes(b"weights-2")  # retrained checkpoints
    assert assets_fingerprint(tmp_path) != first


def test_retraining_one_compressor_changes_only_that_runs_key(tmp_path):
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "lora.safetensors").write_bytes(b"base-1")
    for name in ("divico-keep11.1", "deco-keep11.1"):
        (tmp_path / "compressors" / name).mkdir(parents=True)
        (tmp_path / "compressors" / name / "compressor.safetensors").write_bytes(b"compressor-1")
    runs = [RunSpec("baseline", "baseline", None, None),
            RunSpec("fastv-keep11.1", "fastv", "keep11.1", 1 / 9),
            *(RunSpec(name, name.split("-")[0], "keep11.1", 1 / 9, str(tmp_path / "compressors" / name))
              for name in ("divico-keep11.1", "deco-keep11.1"))]
    before = [run_fingerprint(tmp_path, run) for run in runs]
    assert before[0] == before[1]  # training-free runs depend on the base only
    assert before[2] != before[0]
    (tmp_path / "compressors" / "divico-keep11.1" / "compressor.safetensors").write_bytes(b"compressor-2")
    after = [run_fingerprint(tmp_path, run) for run in runs]
    assert [a == b for a, b in zip(before, after)] == [True, True, False, True]
    (tmp_path / "recipe.json").write_text(json.dumps({"image_size": 168, "threads": 1}))
    assert [run_fingerprint(tmp_path, run) for run in runs] == after  # the recipe's threads change no answer
    (tmp_path / "recipe.json").write_text(json.dumps({"image_size": 224}))
    assert all(a != b for a, b in zip(after, [run_fingerprint(tmp_path, run) for run in runs]))
    (tmp_path / "recipe.json").write_text(json.dumps({"image_size": 168}))
    (tmp_path / "stage2" / "lora.safetensors").write_bytes(b"base-2")  # a new base invalidates every run
    assert all(a != b for a, b in zip(after, [run_fingerprint(tmp_path, run) for run in runs]))


def test_tables_compute_improvement_and_ratios_by_hand():
    benchmarks = ("vqav2", "pope")
    results = {
        "baseline": _row("baseline", None, {"vqav2": 50.0, "pope": 80.0}, 144, 40e9, 400 * 2**20, 0.200),
        "fastv-keep11.1": _row("fastv", "keep11.1", {"vqav2": 40.0, "pope": 70.0}, 16, 10e9, 200 * 2**20, 0.100),
        "deco-keep11.1": _row("deco", "keep11.1", {"vqav2": 44.0, "pope": 60.0}, 16, 8e9, 180 * 2**20, 0.080),
        "divico-keep11.1": _row("divico", "keep11.1", {"vqav2": 46.2, "pope": 63.0}, 16, 11e9, 210 * 2**20, 0.110),
    }
    assert relative_improvement(46.2, 44.0) == pytest.approx(5.0)
    table1 = format_table1(results, benchmarks)
    # vqav2: (46.2 - 44) / 44 = +5.0 %; pope: (63 - 70) / 70 = -10.0 %
    assert "| 88.9% | Improvement | +5.0% | -10.0% |" in table1
    assert "| 88.9% | DiViCo | 46.2 | 63.0 |" in table1
    table3 = format_table3(results)
    # FLOPs 11 vs 40 G: -72.5 %; memory 210 vs 400 MB: -47.5 %; time 110 vs 200 ms: -45.0 %; accuracy -7.6 %
    assert "| Δ ratio | | -7.6% | -72.5% | -47.5% | -45.0% | |" in table3
    assert "| DiViCo @88.9% compr. | 16/144 | 46.2 | 11.0 | 210 | 110 | - |" in table3


def test_tables_show_intervals_differences_fidelity_and_timing_spread():
    results = {
        "baseline": _row("baseline", None, {"gqa": 80.0}, 144, 40e9, 4 * 2**20, 0.200),
        "fastv-keep11.1": _row("fastv", "keep11.1", {"gqa": 40.0}, 16, 10e9, 2 * 2**20, 0.100),
        "divico-keep11.1": _row("divico", "keep11.1", {"gqa": 50.0}, 16, 11e9, 2 * 2**20, 0.110),
    }
    results["baseline"]["intervals"] = {"gqa": {"low": 70.04, "high": 88.96}}
    results["divico-keep11.1"]["differences"] = {
        "fastv-keep11.1": {"gqa": {"estimate": 10.0, "low": 2.5, "high": 17.5}}}
    results["divico-keep11.1"]["fidelity"] = {"agreement": 62.5, "first_token_kl": 0.1234}
    results["divico-keep11.1"]["efficiency"].update(prefill_q1_seconds=0.1051, prefill_q3_seconds=0.1149)
    assert "| - | Baseline | 80.0 [70.0, 89.0] |" in format_table1(results, ("gqa",))
    assert "| 88.9% | DiViCo - FastV | +10.0 [+2.5, +17.5] * |" in format_differences(results, ("gqa",))
    results["divico-keep11.1"]["differences"]["fastv-keep11.1"]["gqa"]["low"] = -2.5  # 0 inside: no mark
    assert "| 88.9% | DiViCo - FastV | +10.0 [-2.5, +17.5] |" in format_differences(results, ("gqa",))
    assert "| 88.9% | DiViCo | 62.5 | 0.123 |" in format_fidelity(results)
    assert "| DiViCo @88.9% compr. | 16/144 | nan | 11.0 | 2 | 110 | 105-115 |" in format_table3(results)


def test_comparison_pairs_are_each_method_against_fastv_and_deco_at_its_rate():
    pairs = comparison_pairs(demo_runs(ASSETS_DIR, ablation=True))
    keep = [p for p in pairs if p[0].endswith("keep16.7")]
    assert keep == [("deco-keep16.7", "fastv-keep16.7"), ("divico-keep16.7", "fastv-keep16.7"),
                    ("divico-keep16.7", "deco-keep16.7"), ("divico-keep16.7", "variant_a-keep16.7"),
                    ("variant_a-keep16.7", "fastv-keep16.7"), ("variant_a-keep16.7", "deco-keep16.7")]
    assert ("variant_b-keep11.1", "fastv-keep11.1") in pairs and ("divico_klmean-keep11.1", "deco-keep11.1") in pairs
    assert len(pairs) == 3 * 6 + 2 * 2 and not any(a.startswith("fastv") for a, _ in pairs)
    # Without the ablation runs DiViCo is compared with FastV and DeCo only.
    assert len(comparison_pairs(demo_runs(ASSETS_DIR))) == 3 * 3


def test_timing_dtype_follows_native_bf16_flags():
    avx512_bf16 = "processor : 0\nflags : fpu sse avx2 avx512f avx512_bf16\n"
    avx2 = "processor : 0\nflags : fpu sse avx2\n"
    assert cpu_supports_native_bf16(avx512_bf16) and not cpu_supports_native_bf16(avx2)
    assert cpu_supports_native_bf16("flags : avx2 amx_bf16 amx_tile\n")
    assert resolve_timing_dtype("auto", avx512_bf16) == "bfloat16"
    assert resolve_timing_dtype("auto", avx2) == "float32"
    assert resolve_timing_dtype("bfloat16", avx2) == "bfloat16"
    with pytest.raises(ValueError, match="timing dtype must be one of"):
        resolve_timing_dtype("fp16", avx2)
    with pytest.raises(ValueError, match="timing_rounds must be >= 4"):
        DemoConfig(timing_rounds=3)


def test_interleaved_timings_run_every_call_once_per_round_in_shuffled_orders():
    log = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c", "d")}
    times = interleaved_timings(calls, rounds=6, warmup=2, seed=1)
    assert log[:8] == ["a", "a", "b", "b", "c", "c", "d", "d"]  # warm-up, untimed
    rounds = [log[8 + 4 * r: 12 + 4 * r] for r in range(6)]
    assert all(sorted(r) == ["a", "b", "c", "d"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes between rounds
    assert {name: len(t) for name, t in times.items()} == {"a": 6, "b": 6, "c": 6, "d": 6}
    summary = timing_summary([0.4, 0.1, 0.3, 0.2, 0.5])
    # Quartiles of 0.1..0.5 (linear): 0.2, 0.3, 0.4.
    assert (summary["prefill_q1_seconds"], summary["prefill_seconds"], summary["prefill_q3_seconds"]) == \
        pytest.approx((0.2, 0.3, 0.4))
    assert summary["prefill_iqr_seconds"] == pytest.approx(0.2) and summary["timing_rounds"] == 5


def test_finished_stages_reopen_for_more_steps_or_a_new_base(tmp_path):
    stage = tmp_path / "stage"
    (stage / "checkpoints" / "checkpoint-30").mkdir(parents=True)
    (stage / "config.json").write_text("{}")
    (stage / "training_config.json").write_text(json.dumps({"max_steps": 30}))
    (stage / "recipe_base.json").write_text(json.dumps({"stage2_steps": 550}))
    assert stage_finished(stage, 30, {"stage2_steps": 550})
    assert stage_finished(stage, 20, {"stage2_steps": 550})
    assert not stage_finished(stage, 60, {"stage2_steps": 550})  # more steps asked: resume from the checkpoint
    assert (stage / "checkpoints" / "checkpoint-30").is_dir() and not (stage / "config.json").exists()
    (stage / "config.json").write_text("{}")
    (stage / "training_config.json").write_text(json.dumps({"max_steps": 30}))
    assert not stage_finished(stage, 30, {"stage2_steps": 1000})  # the base changed: start over
    assert not (stage / "checkpoints").exists()


def test_calibrate_projector_standardises_features_and_matches_embedding_norm():
    model = tiny_llava(seed=0)
    torch.manual_seed(0)
    pixels = torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE) * 2.0
    with torch.no_grad():
        features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:].flatten(0, 1)
    mean, std = features.mean(dim=0), features.std(dim=0)
    before = copy.deepcopy(model.model.multi_modal_projector)
    stats = calibrate_projector(model, pixels)
    after = model.model.multi_modal_projector
    embedding_norm = model.get_input_embeddings().weight.detach().norm(dim=-1).mean()
    with torch.no_grad():
        # linear_1 now sees standardised features: same as the old layer on (x - mean) / std.
        torch.testing.assert_close(after.linear_1(features), before.linear_1((features - mean) / std),
                                   atol=1e-4, rtol=1e-4)
        tokens = after(features)
        reference = before((features - mean) / std)
        # Only a global scale separates the two outputs, chosen to give the mean word-embedding norm.
        scale = (tokens.norm(dim=-1) / reference.norm(dim=-1)).mean()
        torch.testing.assert_close(tokens, reference * scale, atol=1e-4, rtol=1e-4)
        assert abs(tokens.norm(dim=-1).mean() - embedding_norm) < 1e-4 * embedding_norm
    assert stats["token_norm_after"] == pytest.approx(float(embedding_norm), rel=1e-5)
    assert stats["feature_std_min"] == pytest.approx(float(std.min()), rel=1e-5)
    assert stats["token_norm_before"] != pytest.approx(stats["token_norm_after"], rel=1e-2)


def test_best_constant_scores_by_hand(tmp_path):
    def write(benchmark, rows):
        (tmp_path / benchmark).mkdir()
        (tmp_path / benchmark / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("gqa", [{"id": f"g{i}", "benchmark": "gqa", "image": "x.png", "question": "q", "answer": a}
                  for i, a in enumerate(["left", "left", "right", "red"])])
    # POPE: 3 positives, 1 negative in one split type. "yes": P = 3/4, R = 1 -> F1 = 6/7.
    write("pope", [{"id": f"p{i}", "benchmark": "pope", "image": "x.png", "question": "q", "answer": a,
                    "split_type": "random"} for i, a in enumerate(["yes", "yes", "no", "yes"])])
    # MMBench is answered with option texts: "a" is right in every rotation of m1 and never in m2 (right: "b").
    rotations = [{"id": f"{group}-r{k}", "benchmark": "mmbench", "image": "x.png", "question": "q",
                  "options": ["a", "b", "c", "d"][k:] + ["a", "b", "c", "d"][:k],
                  "answer": "ABCD"[(4 - k + right) % 4], "circular_group": group, "rotation": k}
                 for group, right in (("m1", 0), ("m2", 1)) for k in range(4)]
    write("mmbench", rotations)
    scores = best_constant_scores(tmp_path, ["gqa", "pope", "mmbench"], limit=None)
    assert scores["gqa"] == {"score": pytest.approx(50.0), "answer": "left"}
    assert scores["pope"]["answer"] == "yes" and scores["pope"]["score"] == pytest.approx(100 * 6 / 7)
    assert scores["mmbench"] == {"score": pytest.approx(50.0), "answer": "a"}
    # A slice of the first two groups: "left" answers both.
    assert best_constant_scores(tmp_path, ["gqa"], limit=2)["gqa"]["score"] == pytest.approx(100.0)


def test_table1_has_the_chance_row():
    results = {"baseline": {"method": "baseline", "tag": None, "scores": {"gqa": 80.0}}}
    table = format_table1(results, ("gqa",), chance={"gqa": 25.0})
    assert table.splitlines()[2] == "| - | Best constant answer | 25.0 |"
    assert table.splitlines()[3] == "| - | Baseline | 80.0 |"


class _WordTokenizer:
    """Stub tokenizer: every distinct word is one id (a word's ids are what the targets average)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.ids.setdefault(w, 1 + len(self.ids)) for w in text.split()]}


def test_scene_patch_targets_by_hand():
    model = tiny_llava(seed=0)
    tokenizer = _WordTokenizer()
    embedding = model.get_input_embeddings().weight
    scene = Scene(seed=0, background="beige", signs=(Sign("AB", "blue", 0, 0, 1 / 12, 1 / 12),), objects=(
        SceneObject("square", "red", 2, 2, x=0.75, y=0.75, size=0.26),   # radius 0.13: 4 patch centres of an 8x8 grid
        SceneObject("star", "green", 0, 2, x=0.8, y=0.2, size=0.01),     # smaller than a patch: its nearest patch
    ))
    targets, on_item = scene_patch_targets(model, tokenizer, scene, grid=8)

    def word(w):
        return embedding[tokenizer.ids[w]].float()

    red_square = (word("red") + word("square")) / 2
    square_patches = {r * 8 + c for r in (5, 6) for c in (5, 6)}   # centres 0.6875 / 0.8125, within 0.13 of 0.75
    star_patch = 1 * 8 + 6                                          # y 0.2 -> row 1, x 0.8 -> col 6
    sign_patches = {0, 1, 8, 9}                                     # radius 1/6 around (1/12, 1/12)
    background = (word("beige") + word("background")) / 2
    for index in range(64):
        if index in square_patches:
            expected = red_square
        elif index == star_patch:
            expected = (word("green") + word("star")) / 2
        elif index in sign_patches:
            expected = (word("blue") + word("sign")) / 2
        else:
            expected = background
        torch.testing.assert_close(targets[index], expected)
    assert set(on_item.nonzero().flatten().tolist()) == square_patches | {star_patch} | sign_patches


def test_write_visual_words_labels_each_patch_of_each_record(tmp_path):
    write_benchmark_splits(tmp_path, seed=0, sizes=SMALL_SIZES, image_size=64, show_progress=False)
    source = write_multiturn_training(tmp_path, seed=0, turns=3)
    target = tmp_path / "with_words.json"
    count = write_visual_words(source, target, tmp_path, grid=12, background_weight=0.25)
    records = json.loads(target.read_text())
    assert count == len(records) == len(json.loads(source.read_text())) > 0
    scenes = load_scenes(tmp_path, "train")
    for record in records[:5]:
        patches = scene_patch_words(scenes[record["image"]], 12)
        assert len(record["visual_words"]) == 144
        for entry, (words, on_item) in zip(record["visual_words"], patches):
            assert entry == (" ".join(words) if on_item else [" ".join(words), 0.25])
        objects = scenes[record["image"]].objects
        shown = {entry for entry in record["visual_words"] if isinstance(entry, str)}
        assert {f"{o.color} {o.shape}" for o in objects} <= shown
    with pytest.raises(ValueError, match="background_weight must be a finite number >= 0, got -1"):
        write_visual_words(source, target, tmp_path, grid=12, background_weight=-1)


def test_align_projector_moves_tokens_onto_their_word_targets(tmp_path):
    write_benchmark_splits(tmp_path, seed=0, sizes=SMALL_SIZES, image_size=64, show_progress=False)
    model = tiny_llava(seed=0)
    model.config.image_seq_length = 64  # 8 x 8 patches of the 32 px tiny tower
    processor = type("Processor", (), {})()
    processor.tokenizer = _WordTokenizer()
    processor.image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    vision_before = copy.deepcopy(model.model.vision_tower.state_dict())
    stats = align_projector(model, processor, tmp_path, images=20, steps=300, lr=3e-3, batch_tokens=512)
    assert stats["images"] == 20
    assert stats["cosine_background"] > stats["cosine_background_before"] + 0.3
    # (Item patches are not asserted: a random 2-layer tower does not separate 6 shapes x 8 colours; the real
    # DINOv2 run reaches 0.92 held-out, recorded in docs/results.md.)
    for name, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, vision_before[name]), name
    with pytest.raises(ValueError, match="needs >= 10 training scenes"):
        align_projector(model, processor, tmp_path, images=5, steps=1)


def test_retrain_default_refuses_bad_stage2_options_before_training(tmp_path, capsys):
    assert main(["retrain-default", "--out", str(tmp_path / "r"), "--stage2-steps", "0"]) == 2
    assert "--stage2-steps must be >= 1, got 0" in capsys.readouterr().out
    assert main(["retrain-default", "--out", str(tmp_path / "r"), "--stage2-init", str(tmp_path / "nowhere")]) == 2
    assert "stage2_init='" in capsys.readouterr().out
    assert main(["retrain-default", "--out", str(tmp_path / "r"), "--choice-orders", "0"]) == 2
    assert "--choice-orders must be in [1, 21], got 0" in capsys.readouterr().out
    assert main(["retrain-default", "--out", str(tmp_path / "r"), "--compressor-steps", "0"]) == 2
    assert "--compressor-steps must be >= 1, got 0" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_chained_warm_starts_each_get_a_new_data_order(tmp_path):
    assert warm_start_seed(RecipeConfig(seed=0)) is None  # from scratch: the recipe's own seed
    init = tmp_path / "stage2"
    init.mkdir()
    (init / "config.json").write_text("{}")
    (init / "training_config.json").write_text(json.dumps({"seed": 0}))
    assert warm_start_seed(RecipeConfig(seed=0, stage2_init=init)) == 1
    (init / "training_config.json").write_text(json.dumps({"seed": 1}))  # the init was itself a warm start
    assert warm_start_seed(RecipeConfig(seed=0, stage2_init=init)) == 2


def test_compressors_train_with_early_stopping_on_a_fixed_validation_subset(tmp_path):
    records = [{"id": f"v{index}", "image": f"{index}.png", "conversations": []} for index in range(40)]
    (tmp_path / "llava_validation.json").write_text(json.dumps(records))
    config = RecipeConfig(output_dir=tmp_path / "run", compressor_steps=120)
    compression = compressor_runs(config)["divico-keep11.1"]
    training = compressor_training_config(config, tmp_path, tmp_path / "c", compression)
    subset = tmp_path / "llava_validation_first32.json"
    assert training.eval_data_path == subset and json.loads(subset.read_text()) == records[:32]
    assert (training.eval_interval, training.early_stopping_patience, training.max_steps) == (10, 3, 120)
    assert training.checkpoint_interval == 10 and training.save_best  # a checkpoint at every evaluation
    assert training.data_path == tmp_path / "llava_train.json" and training.compression == compression
    assert validation_subset(tmp_path, 32) == subset  # written once, then reused
    with pytest.raises(ValueError, match="compressor_eval_records=41 but .* holds 40 conversations"):
        validation_subset(tmp_path, 41)
    plain = compressor_training_config(RecipeConfig(compressor_patience=None), tmp_path, tmp_path / "c", compression)
    assert plain.eval_data_path is None and plain.checkpoint_interval == 10
    # A compressor trained without (or with other) early stopping is retrained, not taken as finished.
    assert compressor_base_record(config, 550) == {
        "stage2_steps": 550, "validation": {"records": 32, "eval_steps": 10, "patience": 3}}
    assert compressor_base_record(RecipeConfig(compressor_patience=None), 550) == {"stage2_steps": 550}
    stage = tmp_path / "c"
    stage.mkdir()
    (stage / "config.json").write_text("{}")
    (stage / "training_config.json").write_text(json.dumps({"max_steps": 120}))
    (stage / "recipe_base.json").write_text(json.dumps({"stage2_steps": 550}))
    assert not stage_finished(stage, 120, compressor_base_record(config, 550))
    with pytest.raises(ValueError, match="compressor_patience must be None .* or an integer >= 1, got 0"):
        RecipeConfig(compressor_patience=0)
    with pytest.raises(ValueError, match="compressor_eval_steps must be an integer >= 1, got 0"):
        RecipeConfig(compressor_eval_steps=0)


def test_retrain_default_refuses_bad_validation_options_before_training(tmp_path, capsys):
    out = ["retrain-default", "--out", str(tmp_path / "r")]
    assert main([*out, "--compressor-patience", "-1"]) == 2
    assert "--compressor-patience must be >= 0 (0: off), got -1" in capsys.readouterr().out
    assert main([*out, "--compressor-eval-steps", "0"]) == 2
    assert "--compressor-eval-steps must be >= 1, got 0" in capsys.readouterr().out
    assert main([*out, "--compressor-eval-records", "0"]) == 2
    assert "--compressor-eval-records must be >= 1, got 0" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()


def test_demo_runs_further_training_free_methods_at_every_rate():
    runs = demo_runs(ASSETS_DIR, methods=("fastv", "random", "dart"))
    at_keep11 = [spec.name for spec in runs if spec.tag == "keep11.1"]
    assert at_keep11 == ["fastv-keep11.1", "random-keep11.1", "dart-keep11.1", "deco-keep11.1", "divico-keep11.1"]
    assert all(spec.checkpoint is None for spec in runs if spec.method in ("random", "dart"))
    # every added method is compared with FastV and DeCo at its rate
    pairs = comparison_pairs(runs)
    assert ("random-keep6.7", "fastv-keep6.7") in pairs and ("dart-keep6.7", "deco-keep6.7") in pairs
    for bad in (("deco",), ("nope",), ("fastv", "fastv"), ()):
        with pytest.raises(ValueError, match="methods must be distinct registered methods run without a checkpoint"):
            DemoConfig(methods=bad)


def test_selected_runs_keep_the_baseline_first_and_refuse_unknown_names():
    runs = demo_runs(ASSETS_DIR, ablation=True)
    chosen = select_runs(runs, ("divico-keep6.7", "fastv-keep16.7"))
    assert [spec.name for spec in chosen] == ["baseline", "fastv-keep16.7", "divico-keep6.7"]
    assert select_runs(runs, None) == runs
    with pytest.raises(ValueError, match=r"Unknown runs \['divico-keep50'\]; valid with these options: \['baseline'"):
        select_runs(runs, ("divico-keep50",))
    for bad in ((), ("fastv-keep6.7", "fastv-keep6.7")):
        with pytest.raises(ValueError, match="runs must be distinct run names or None"):
            DemoConfig(runs=bad)
