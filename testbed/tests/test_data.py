"""Synthetic benchmark generation: determinism, disjoint splits, answers that match the scenes."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from divico.cli import main
from divico.metrics import score_benchmark
from PIL import Image

from divico_testbed.data import (
    BENCHMARKS,
    DATA_FORMAT,
    SMALL_SIZES,
    SPLITS,
    Scene,
    benchmark_data_current,
    build_prompt,
    load_eval_records,
    load_llava_conversations,
    load_scenes,
    sizes_for_test_groups,
    write_benchmark_splits,
    write_multiturn_training,
)
from divico_testbed.data.benchmarks import OPTION_HINT, SEED_SLOTS, SHORT_ANSWER_HINT
from divico_testbed.data.scenes import (
    COLORS,
    SHAPE_PLURALS,
    SHAPES,
    generate_scene,
    render_scene,
)

_PLURAL_TO_SHAPE = {plural: shape for shape, plural in SHAPE_PLURALS.items()}
_WORD_TO_NUMBER = {w: i for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))}
# More test images than SMALL_SIZES so every question template is exercised.
_CONSISTENCY_SIZES = {
    "train": {name: 0 for name in (*BENCHMARKS, "caption")},
    "validation": {name: 0 for name in (*BENCHMARKS, "caption")},
    "test": {"vqav2": 60, "pope": 20, "mme": 40, "mmbench": 40, "gqa": 60, "caption": 0},
}


@pytest.fixture(scope="module")
def small_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two seed-0 runs and one seed-1 run of the small preset."""
    dirs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path_factory.mktemp(name)
        write_benchmark_splits(out, seed=seed, sizes=SMALL_SIZES, show_progress=False)
        dirs.append(out)
    return dirs[0], dirs[1], dirs[2]


@pytest.fixture(scope="module")
def consistency_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("consistency")
    write_benchmark_splits(out, seed=3, sizes=_CONSISTENCY_SIZES, show_progress=False)
    return out


def _file_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(small_dirs: tuple[Path, Path, Path]) -> None:
    first, second, other_seed = small_dirs
    digests_first = _file_digests(first)
    assert any(name.endswith(".jsonl") for name in digests_first)
    assert any(name.endswith(".png") for name in digests_first)
    assert digests_first == _file_digests(second)
    json_first = {k: v for k, v in digests_first.items() if k.endswith(".jsonl")}
    json_other = {k: v for k, v in _file_digests(other_seed).items() if k.endswith(".jsonl")}
    assert json_first.keys() == json_other.keys()
    assert all(json_first[k] != json_other[k] for k in json_first)


def test_splits_are_disjoint(small_dirs: tuple[Path, Path, Path]) -> None:
    root = small_dirs[0]
    seeds_by_split = {s: {scene.seed for scene in load_scenes(root, s).values()} for s in SPLITS}
    pixels_by_split = {
        s: {hashlib.sha256(Image.open(root / image).tobytes()).hexdigest()
            for image in load_scenes(root, s)}
        for s in SPLITS
    }
    for i, split_a in enumerate(SPLITS):
        for split_b in SPLITS[i + 1:]:
            assert not seeds_by_split[split_a] & seeds_by_split[split_b]
            assert not pixels_by_split[split_a] & pixels_by_split[split_b]
    for split in SPLITS:
        ids = [r["id"] for b in BENCHMARKS for r in load_eval_records(root, b, split)]
        assert len(ids) == len(set(ids))


def _by_name(scene: Scene, name: str) -> Any:
    color, shape = name.split(" ")
    matches = [o for o in scene.objects if o.color == color and o.shape == shape]
    assert len(matches) == 1, f"{name} does not identify one object"
    return matches[0]


def _only_shape(scene: Scene, shape: str) -> Any:
    matches = [o for o in scene.objects if o.shape == shape]
    assert len(matches) == 1, f"{shape} does not identify one object"
    return matches[0]


def _sign_text(scene: Scene, question: str) -> str:
    colored = re.search(r"on the (\w+) sign", question)
    if colored:
        return next(s.text for s in scene.signs if s.color == colored.group(1))
    assert len(scene.signs) == 1
    return scene.signs[0].text


def _in_cell(scene: Scene, position: str) -> Any:
    matches = [o for o in scene.objects if o.position == position]
    assert len(matches) == 1, f"no object at {position}"
    return matches[0]


_STEPS = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (-1, 0), "below": (1, 0)}


def _expected_vqav2(scene: Scene, question: str) -> str:
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return _only_shape(scene, m.group(1)).color
    if m := re.fullmatch(r"What color is the (\w+) at the ([a-z ]+) of the image\?", question):
        obj = _in_cell(scene, m.group(2))
        assert obj.shape == m.group(1)
        return obj.color
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        matches = [o for o in scene.objects if o.color == m.group(1)]
        assert len(matches) == 1
        return matches[0].shape
    if m := re.fullmatch(r"What shape is at the ([a-z ]+) of the image\?", question):
        return _in_cell(scene, m.group(1)).shape
    if question == "How many shapes are there?":
        return str(len(scene.objects))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(scene.count(color=m.group(1)))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(scene.count(shape=_PLURAL_TO_SHAPE[m.group(1)]))
    if m := re.fullmatch(r"Where is the (\w+ \w+)\?", question):
        return _by_name(scene, m.group(1)).position
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return _only_shape(scene, m.group(1)).position
    if m := re.fullmatch(r"What is directly (to the left of|to the right of|above|below) the (\w+ \w+)\?", question):
        target = _by_name(scene, m.group(2))
        d_row, d_col = _STEPS[m.group(1)]
        cells = {(o.row, o.col): o.name for o in scene.objects} | {(s.row, s.col): "sign" for s in scene.signs}
        row, col = target.row + d_row, target.col + d_col
        while (row, col) not in cells:
            assert 0 <= row < 3 and 0 <= col < 3, "nothing in that direction"
            row, col = row + d_row, col + d_col
        assert cells[(row, col)] != "sign"
        return cells[(row, col)]
    raise AssertionError(f"unrecognised question {question!r}")


def _expected_yes_no(scene: Scene, question: str) -> str:
    question = question.removesuffix(" Please answer yes or no.")
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", question):
        return "yes" if scene.count(color=m.group(1), shape=m.group(2)) else "no"
    if m := re.fullmatch(r"Is there a (\w+) in this image\?", question):
        return "yes" if scene.count(shape=m.group(1)) else "no"
    if m := re.fullmatch(r"(?:Is|Are) there exactly (\w+) (\w+) in this image\?", question):
        shape = _PLURAL_TO_SHAPE.get(m.group(2), m.group(2))
        return "yes" if scene.count(shape=shape) == _WORD_TO_NUMBER[m.group(1)] else "no"
    if m := re.fullmatch(r"Is the (\w+ \w+) on the (left|right) side of this image\?", question):
        col = _by_name(scene, m.group(1)).col
        return "yes" if col == {"left": 0, "right": 2}[m.group(2)] else "no"
    if m := re.fullmatch(r"Is the (\w+ \w+) in the (top|bottom) part of this image\?", question):
        row = _by_name(scene, m.group(1)).row
        return "yes" if row == {"top": 0, "bottom": 2}[m.group(2)] else "no"
    if m := re.fullmatch(r"Is the (\w+) in this image (\w+)\?", question):
        return "yes" if _only_shape(scene, m.group(1)).color == m.group(2) else "no"
    if m := re.fullmatch(r'Is the word "(\w+)" written in this image\?', question):
        return "yes" if m.group(1) in {s.text for s in scene.signs} else "no"
    raise AssertionError(f"unrecognised question {question!r}")


def _expected_mmbench(scene: Scene, question: str) -> str:
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return _only_shape(scene, m.group(1)).color
    if m := re.fullmatch(r"How many (\w+) are in the image\?", question):
        return str(scene.count(shape=_PLURAL_TO_SHAPE[m.group(1)]))
    if m := re.fullmatch(r"Where is the (\w+ \w+) in the image\?", question):
        return _by_name(scene, m.group(1)).position
    if m := re.fullmatch(r"What is the shape of the (\w+) object\?", question):
        matches = [o for o in scene.objects if o.color == m.group(1)]
        assert len(matches) == 1
        return matches[0].shape
    return _sign_text(scene, question)


def _expected_gqa(scene: Scene, question: str) -> str:
    if m := re.fullmatch(r"What color is the shape directly to the (left|right) of the (\w+)\?",
                         question):
        target = _only_shape(scene, m.group(2))
        step = -1 if m.group(1) == "left" else 1
        mates = [o for o in scene.objects
                 if o.row == target.row and (o.col - target.col) * step > 0]
        assert len(mates) == 1
        return mates[0].color
    if m := re.fullmatch(r"What shape is directly (above|below) the (\w+ \w+)\?", question):
        target = _by_name(scene, m.group(2))
        step = -1 if m.group(1) == "above" else 1
        mates = [o for o in scene.objects
                 if o.col == target.col and (o.row - target.row) * step > 0]
        assert len(mates) == 1
        return mates[0].shape
    if m := re.fullmatch(r"Is the (\w+ \w+) to the left or to the right of the (\w+ \w+)\?",
                         question):
        return "left" if _by_name(scene, m.group(1)).col < _by_name(scene, m.group(2)).col \
            else "right"
    if m := re.fullmatch(r"Is the (\w+ \w+) above or below the (\w+ \w+)\?", question):
        return "above" if _by_name(scene, m.group(1)).row < _by_name(scene, m.group(2)).row \
            else "below"
    raise AssertionError(f"unrecognised question {question!r}")


def test_answers_follow_from_scene_ground_truth(consistency_dir: Path) -> None:
    scenes = load_scenes(consistency_dir, "test")
    for record in load_eval_records(consistency_dir, "vqav2", "test"):
        expected = _expected_vqav2(scenes[record["image"]], record["question"])
        assert record["answer"] == expected and len(record["answers"]) == 10
        assert 5 <= record["answers"].count(expected) <= 8, record  # the canonical answer stays at accuracy 100
    for benchmark in ("pope", "mme"):
        for record in load_eval_records(consistency_dir, benchmark, "test"):
            assert record["answer"] == _expected_yes_no(scenes[record["image"]],
                                                        record["question"]), record
    for record in load_eval_records(consistency_dir, "mmbench", "test"):
        correct = record["options"]["ABCD".index(record["answer"])]
        assert correct == _expected_mmbench(scenes[record["image"]], record["question"]), record
        assert len(set(record["options"])) == 4
    for record in load_eval_records(consistency_dir, "gqa", "test"):
        assert record["answer"] == _expected_gqa(scenes[record["image"]], record["question"])


def test_categories_and_mmbench_rotations(consistency_dir: Path) -> None:
    vqav2 = Counter(r["category"] for r in load_eval_records(consistency_dir, "vqav2", "test"))
    assert vqav2 == {c: 12 for c in ("color", "shape", "count", "position", "relation")}
    mme = load_eval_records(consistency_dir, "mme", "test")
    assert Counter(r["subtask"] for r in mme) == {
        s: 16 for s in ("existence", "count", "position", "color", "ocr")}
    per_image = defaultdict(list)
    for r in mme:
        per_image[r["image"]].append(r["answer"])
    assert all(sorted(answers) == ["no", "yes"] for answers in per_image.values())
    groups = defaultdict(list)
    for r in load_eval_records(consistency_dir, "mmbench", "test"):
        groups[r["circular_group"]].append(r)
    assert len(groups) == 40
    for rotations in groups.values():
        assert sorted(r["rotation"] for r in rotations) == [0, 1, 2, 3]
        assert sorted(r["answer"] for r in rotations) == ["A", "B", "C", "D"]
        correct = {r["options"]["ABCD".index(r["answer"])] for r in rotations}
        assert len(correct) == 1


def test_pope_labels_balanced_per_split_type(consistency_dir: Path) -> None:
    records = load_eval_records(consistency_dir, "pope", "test")
    counts = Counter((r["split_type"], r["answer"]) for r in records)
    assert counts == {(t, a): 20 for t in ("random", "popular", "adversarial")
                      for a in ("yes", "no")}
    scenes = load_scenes(consistency_dir, "test")
    for r in records:
        if r["split_type"] == "adversarial" and r["answer"] == "no":
            # Adversarial negatives reuse a shape or a colour that the image shows.
            color, shape = re.fullmatch(r"Is there a (\w+) (\w+) in the image\?",
                                        r["question"]).groups()
            scene = scenes[r["image"]]
            assert scene.count(shape=shape) or scene.count(color=color)


def test_ground_truth_answers_score_perfectly(consistency_dir: Path) -> None:
    perfect = {"vqav2": 100.0, "pope": 100.0, "mme": 5 * 200.0, "mmbench": 100.0, "gqa": 100.0}
    for benchmark, best in perfect.items():
        records = load_eval_records(consistency_dir, benchmark, "test")
        truth = [r["answer"] for r in records]
        assert score_benchmark(benchmark, truth, records)["score"] == pytest.approx(best)


def test_objects_span_several_patches_inside_their_cell(consistency_dir: Path) -> None:
    """Objects are 0.20-0.26 of the side (2-3 patches of 14 px at 168 px) and never leave their grid cell."""
    objects = [o for scene in load_scenes(consistency_dir, "test").values() for o in scene.objects]
    assert len(objects) > 100
    for obj in objects:
        assert 0.20 <= obj.size <= 0.26
        half = obj.size / 2
        assert obj.col / 3 < obj.x - half and obj.x + half < (obj.col + 1) / 3
        assert obj.row / 3 < obj.y - half and obj.y + half < (obj.row + 1) / 3
    assert 168 * min(o.size for o in objects) / 14 >= 2.4


def test_benchmark_data_current_checks_the_generator_format(small_dirs: tuple[Path, Path, Path],
                                                            tmp_path: Path) -> None:
    written = small_dirs[0]
    assert json.loads((written / "manifest.json").read_text())["format"] == DATA_FORMAT
    assert benchmark_data_current(written)
    assert not benchmark_data_current(tmp_path)  # nothing written (or interrupted before the manifest)
    old = json.loads((written / "manifest.json").read_text())
    old.pop("format")  # what the first generator wrote
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert not benchmark_data_current(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    assert not benchmark_data_current(tmp_path)


def test_rendered_pixels_match_scene(consistency_dir: Path) -> None:
    for image_path, scene in list(load_scenes(consistency_dir, "test").items())[:40]:
        image = Image.open(consistency_dir / image_path).convert("RGB")
        side = image.width
        for obj in scene.objects:
            assert image.getpixel((round(obj.x * side), round(obj.y * side))) == COLORS[obj.color]
        for sign in scene.signs:
            cell = np.asarray(image)[sign.row * side // 3:(sign.row + 1) * side // 3,
                                     sign.col * side // 3:(sign.col + 1) * side // 3]
            board = np.all(cell == COLORS[sign.color], axis=-1)
            assert board.sum() > 50
            rows, cols = np.nonzero(board)
            inside = cell[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            # Light text strokes inside the coloured board.
            assert (inside.min(axis=-1) > 150).sum() > 15


def test_llava_training_file(small_dirs: tuple[Path, Path, Path]) -> None:
    root = small_dirs[0]
    conversations = load_llava_conversations(root, "train")
    assert len({c["id"] for c in conversations}) == len(conversations)
    assert {c["id"].split("-")[0] for c in conversations} == {*BENCHMARKS, "caption"}
    for item in conversations:
        assert set(item) == {"id", "image", "conversations"}
        assert (root / item["image"]).is_file()
        human, gpt = item["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
        assert gpt["value"].strip()
        if item["id"].startswith("mmbench"):
            # Multiple choice is answered with the text of one of the shown options.
            option_texts = [line[3:] for line in human["value"].split("\n")[2:-1]]
            assert len(option_texts) == 4 and gpt["value"] in option_texts
    assert load_llava_conversations(root, "validation")


def test_build_prompt() -> None:
    record = {"benchmark": "mmbench", "question": "What color is the star?",
              "options": ["red", "blue", "green", "pink"]}
    assert build_prompt(record) == (
        "What color is the star?\nA. red\nB. blue\nC. green\nD. pink\n" + OPTION_HINT)
    assert build_prompt({"benchmark": "gqa", "question": "Q?"}) == "Q?\n" + SHORT_ANSWER_HINT
    with pytest.raises(ValueError, match="lacks"):
        build_prompt({"question": "Q?"})


def test_scene_generation_is_deterministic_and_validated() -> None:
    assert generate_scene(11) == generate_scene(11)
    assert generate_scene(11) != generate_scene(12)
    scene = generate_scene(5)
    assert Scene.from_dict(scene.to_dict()) == scene
    assert all(o.shape in SHAPES for o in scene.objects)
    assert render_scene(scene, 96).size == (96, 96)
    with pytest.raises(ValueError, match="image_size"):
        render_scene(scene, 32)
    with pytest.raises(ValueError, match="seed"):
        generate_scene(-1)
    with pytest.raises(ValueError, match="unknown set"):
        write_benchmark_splits("/nonexistent", sizes={"test": {"vqa": 3}})


def test_make_data_cli(tmp_path: Path) -> None:
    out = tmp_path / "data"
    assert main(["make-data", "--out", str(out), "--small", "--image-size", "96",
                 "--no-progress"]) == 0
    record = load_eval_records(out, "pope", "validation")[0]
    assert Image.open(out / record["image"]).size == (96, 96)
    assert (out / "manifest.json").is_file()
    assert main(["make-data", "--out", str(tmp_path / "grown"), "--small", "--test-groups", "7",
                 "--no-progress"]) == 0
    assert len(load_eval_records(tmp_path / "grown", "pope", "test")) == 12  # ceil(7 / 6) images x 6
    assert len(load_eval_records(tmp_path / "grown", "mmbench", "test")) == 7 * 4
    assert main(["make-data", "--out", str(tmp_path / "bad"), "--test-groups", "0", "--no-progress"]) == 2


def test_vqav2_references_vary_like_annotators(consistency_dir: Path) -> None:
    records = load_eval_records(consistency_dir, "vqav2", "test")
    counts = [r for r in records if r["category"] == "count"]
    # Digits, number words and the count with its noun ("2", "two", "2 circles"), as VQAv2's annotators answer.
    assert any(_WORD_TO_NUMBER.get(a) == int(r["answer"]) for r in counts for a in r["answers"])
    assert any(re.fullmatch(rf"{r['answer']} [a-z ]+", a) for r in counts for a in r["answers"])
    assert any(len(set(r["answers"])) > 1 for r in records)
    # A variant given by fewer than 3 annotators scores below 100 (VQA accuracy), the canonical answer 100.
    record = next(r for r in records if 0 < sum(a != r["answer"] for a in r["answers"]) and
                  min(r["answers"].count(a) for a in r["answers"]) < 3)
    rare = min(set(record["answers"]), key=record["answers"].count)
    assert score_benchmark("vqav2", [rare], [record])["score"] < 100.0
    assert score_benchmark("vqav2", [record["answer"]], [record])["score"] == pytest.approx(100.0)
    assert not any(r["category"] == "ocr" for r in records)  # sign text is asked only where it is legible


def test_a_larger_test_split_starts_with_the_same_questions(tmp_path: Path) -> None:
    empty = {name: 0 for name in (*BENCHMARKS, "caption")}
    small = {"train": empty, "validation": empty, "test": sizes_for_test_groups(6)}
    large = {"train": empty, "validation": empty, "test": sizes_for_test_groups(13)}
    write_benchmark_splits(tmp_path / "small", sizes=small, show_progress=False)
    write_benchmark_splits(tmp_path / "large", sizes=large, show_progress=False)
    for benchmark in BENCHMARKS:
        first = load_eval_records(tmp_path / "small", benchmark, "test")
        assert load_eval_records(tmp_path / "large", benchmark, "test")[:len(first)] == first
    assert sizes_for_test_groups(13) == {"vqav2": 13, "pope": 3, "mme": 13, "mmbench": 13, "gqa": 13, "caption": 0}
    assert benchmark_data_current(tmp_path / "small", small)
    assert not benchmark_data_current(tmp_path / "small", large)  # other sizes: regenerate
    with pytest.raises(ValueError, match="test groups must be an int >= 1, got 0"):
        sizes_for_test_groups(0)


def _expected_turn_answer(scene: Scene, prompt: str) -> str:
    """Answer of one multi-turn prompt from the scene, whichever benchmark style it has."""
    if prompt == "Describe the image.":
        return scene.describe()
    if prompt.endswith(OPTION_HINT):
        question, *options = prompt.removesuffix("\n" + OPTION_HINT).split("\n")
        correct = _expected_mmbench(scene, question)
        assert [line[3:] for line in options].count(correct) == 1, prompt
        return correct
    question = prompt.removesuffix("\n" + SHORT_ANSWER_HINT)
    if question.startswith(("Is there", "Are there", "Is the")) and not re.search("left or|above or", question):
        return _expected_yes_no(scene, question)
    try:
        return _expected_gqa(scene, question)
    except AssertionError:
        return _expected_vqav2(scene, question)


def test_multiturn_training_file(small_dirs: tuple[Path, Path, Path]) -> None:
    root = small_dirs[0]
    path = write_multiturn_training(root, seed=0, turns=6, caption_share=0.5)
    first = path.read_bytes()
    assert write_multiturn_training(root, seed=0, turns=6, caption_share=0.5).read_bytes() == first
    scenes = load_scenes(root, "train")
    conversations = json.loads(first)
    assert sorted(c["image"] for c in conversations) == sorted(scenes)
    styles: Counter[str] = Counter()
    captions = 0
    for item in conversations:
        turns = item["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
        prompts = [t["value"].removeprefix("<image>\n") for t in turns[::2]]
        assert len(set(prompts)) == len(prompts), "a question is repeated within a conversation"
        has_caption = prompts[0] == "Describe the image."
        captions += has_caption
        assert len(prompts) - has_caption == 6
        for prompt, answer in zip(prompts, [t["value"] for t in turns[1::2]]):
            assert answer == _expected_turn_answer(scenes[item["image"]], prompt), prompt
            styles["mmbench" if prompt.endswith(OPTION_HINT) else
                   "mme" if "Please answer yes or no." in prompt else "other"] += 1
    assert styles["mmbench"] and styles["mme"] and styles["other"]
    assert 0 < captions < len(conversations)
    with pytest.raises(ValueError, match="turns must be an int >= 1, got 0"):
        write_multiturn_training(root, turns=0)
    with pytest.raises(ValueError, match=r"caption_share must be in \[0, 1\], got 1.5"):
        write_multiturn_training(root, caption_share=1.5)


def test_multiturn_choice_orders_repeat_each_question_behind_other_letters(
    small_dirs: tuple[Path, Path, Path],
) -> None:
    root = small_dirs[0]
    once = json.loads(write_multiturn_training(root, seed=0, turns=6, caption_share=0.0).read_bytes())
    path = write_multiturn_training(root, seed=0, turns=6, caption_share=0.0, choice_orders=3)
    assert path.name == "llava_train_multiturn6_orders3.json"
    scenes = load_scenes(root, "train")
    reordered = json.loads(path.read_bytes())
    assert len(reordered) == len(once)
    checked = 0
    for item in reordered:
        prompts = [t["value"].removeprefix("<image>\n") for t in item["conversations"][::2]]
        answers = [t["value"] for t in item["conversations"][1::2]]
        by_question: dict[str, list[tuple[list[str], str]]] = {}
        for prompt, answer in zip(prompts, answers):
            # Every answer, re-ordered or not, is the text of the ground-truth option.
            assert answer == _expected_turn_answer(scenes[item["image"]], prompt), prompt
            if prompt.endswith(OPTION_HINT):
                question, *option_lines = prompt.removesuffix("\n" + OPTION_HINT).split("\n")
                by_question.setdefault(question, []).append(([line[3:] for line in option_lines], answer))
        single = [t for t in prompts if not t.endswith(OPTION_HINT)]
        assert len(single) + len(by_question) == 6
        for asked in by_question.values():
            assert len(asked) == 3
            first = asked[0][0]
            shifts = {tuple(first[s:] + first[:s]) for s in range(4)}
            assert all(answer in options for options, answer in asked)
            assert len({answer for _, answer in asked}) == 1  # the same content behind every letter
            assert all(tuple(options) not in shifts for options, _ in asked[1:])
            assert sorted(asked[0][0]) == sorted(asked[1][0]) == sorted(asked[2][0])
            checked += 1
    assert checked
    with pytest.raises(ValueError, match=r"choice_orders must be an int in \[1, 21\], got 22"):
        write_multiturn_training(root, choice_orders=22)


def test_seed_slots_leave_the_removed_sets_seeds_unused(small_dirs: tuple[Path, Path, Path]) -> None:
    assert SEED_SLOTS == {"pope": 1, "mme": 2, "mmbench": 3, "gqa": 4, "caption": 5, "vqav2": 7}
    # Scene seed = ((seed * 3 + split) * 8 + slot) * 1e6 + index: seed 0, test split (2), vqav2 (slot 7).
    seeds = sorted(scene.seed for image, scene in load_scenes(small_dirs[0], "test").items() if "/vqav2/" in image)
    assert seeds[0] >= (2 * 8 + 7) * 1_000_000 and seeds[-1] < (2 * 8 + 8) * 1_000_000
