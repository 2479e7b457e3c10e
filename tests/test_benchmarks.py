"""The image benchmarks' loaders, prompts, scores and submission files, on tiny files in the official formats.

Expected scores are computed by hand in the comments from the official scripts' rules (LLaVA's eval_textvqa.py /
m4c_evaluator.py, eval_pope.py, MME's calculation.py, lmms-eval's mmbench_evals.py, vqaEval.py after LLaVA's EvalAI
answer processing, GQA's eval.py after convert_gqa_for_eval.py, eval_science_qa.py).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest

from divico.evaluation import BenchmarkDataError, available_benchmarks, get_benchmark
from divico.evaluation.benchmarks.scienceqa import scienceqa_answer_letter
from fixtures_official import (
    FIXTURE_BENCHMARKS,
    FIXTURE_QUESTION_COUNTS,
    LETTER,
    MMBENCH_DEV,
    SHORT,
    TEXTVQA_LLAVA,
    pope_llava_questions,
    VIZWIZ_INSTRUCTION,
    write_all_fixtures,
    write_benchmark_fixture,
    write_jsonl,
    write_mmbench_tsv,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_all_fixtures(tmp_path_factory.mktemp("eval"))


@pytest.fixture
def fresh_root(tmp_path) -> Path:
    return tmp_path


def load(root: Path, name: str, **kwargs):
    benchmark = get_benchmark(name)(root, **kwargs)
    return benchmark, benchmark.load()


# -- registry and loading ----------------------------------------------------------------------------------------

def test_every_image_benchmark_is_registered():
    assert set(FIXTURE_BENCHMARKS) <= set(available_benchmarks())
    with pytest.raises(ValueError, match="textvqa"):
        get_benchmark("textvqa2")


def test_bad_split_option_and_rules_are_refused(data_root):
    with pytest.raises(ValueError, match="dev, test"):
        get_benchmark("mmbench")(data_root, split="val")
    with pytest.raises(ValueError, match="no splits"):
        get_benchmark("gqa")(data_root, split="val")
    with pytest.raises(ValueError, match="colour"):
        get_benchmark("gqa")(data_root, colour=1)
    with pytest.raises(ValueError, match="'strict'"):
        get_benchmark("pope")(data_root, rules="strict")


@pytest.mark.parametrize("name", FIXTURE_BENCHMARKS)
def test_fixture_loads(data_root, name):
    benchmark, samples = load(data_root, name)
    assert len(samples) == FIXTURE_QUESTION_COUNTS[name]
    assert len({s.question_id for s in samples}) == len(samples)
    assert all(image.is_file() for s in samples for image in s.images)
    assert all(s.reference is not None for s in samples)
    assert benchmark.has_public_answers
    # The benchmark's own folder works as data root too.
    own = data_root / benchmark.folder
    assert [s.question_id for s in get_benchmark(name)(own).load()] == [s.question_id for s in samples]


# -- prompts as LLaVA-1.5 builds them ----------------------------------------------------------------------------

def test_textvqa_prompts_are_llavas_and_ids_the_release_ones(data_root):
    _, samples = load(data_root, "textvqa")
    assert [s.prompt for s in samples] == [r["text"] for r in TEXTVQA_LLAVA]
    assert [s.question_id for s in samples] == ["34602", "34603", "34700"]
    assert samples[1].reference[2] == "two"


def test_pope_prompts_and_labels(data_root):
    _, samples = load(data_root, "pope")
    by_id = {s.question_id: s for s in samples}
    # llava_pope_test.jsonl lists adversarial (ids 1, 2), popular (3, 4), random (5, 6).
    assert by_id["1"].prompt == f"Is there a dining table in the image?\n{SHORT}"
    assert [by_id[str(i)].reference for i in range(1, 7)] == ["no", "yes", "yes", "no", "yes", "no"]
    assert [by_id[str(i)].meta["split"] for i in (1, 3, 5)] == ["adversarial", "popular", "random"]


def test_pope_without_llava_file_and_one_split(fresh_root):
    write_benchmark_fixture("pope", fresh_root)
    (fresh_root / "pope" / "llava_pope_test.jsonl").unlink()
    _, samples = load(fresh_root, "pope", split="random")
    assert [(s.question_id, s.prompt, s.reference) for s in samples] == [
        ("random/1", f"Is there a bird in the image?\n{SHORT}", "yes"),
        ("random/2", f"Is there a knife in the image?\n{SHORT}", "no")]


def test_mme_prompts_and_both_folder_layouts(data_root):
    _, samples = load(data_root, "mme")
    by_id = {s.question_id: s for s in samples}
    sample = by_id["existence/000000006040.jpg:2"]
    assert sample.prompt == f"Is there a bed in this image? Please answer yes or no.\n{SHORT}"
    assert sample.reference == "No"
    artwork = by_id["artwork/10002.jpg:1"]
    assert artwork.images[0].parent.name == "images" and artwork.meta["image_id"] == "artwork/10002.jpg"
    assert sorted({s.meta["subtask"] for s in samples}) == ["artwork", "code_reasoning", "existence"]


def test_mmbench_prompt_circular_rows_and_images(data_root):
    _, samples = load(data_root, "mmbench")
    by_id = {s.question_id: s for s in samples}
    assert by_id["1"].prompt == ("The photo was taken outdoors.\nWhich season is it?\nA. spring\nB. summer\n"
                                 f"C. autumn\nD. winter\n{LETTER}")
    assert by_id["0"].prompt == f"What animal is shown?\nA. cat\nB. dog\n{LETTER}"
    assert (by_id["2000001"].meta["group"], by_id["2000001"].meta["rotation"]) == (1, 2)
    assert by_id["2000001"].reference == "B"
    # A copy whose image field is the main row's index shares the main row's decoded image.
    assert by_id["1000000"].images == by_id["0"].images
    assert by_id["0"].images[0].read_bytes()[:4] == b"\x89PNG"


def test_mmbench_rotations_generated_equal_the_releases_copies(fresh_root):
    main_rows = [row for row in MMBENCH_DEV if row[0] < 1_000_000]
    write_mmbench_tsv(fresh_root / "mmbench" / "plain.tsv", main_rows, image_references=False)
    _, generated = load(fresh_root, "mmbench", tsv="plain.tsv", cache_dir=fresh_root / "cache")
    expected = {str(index): (options, answer) for index, _, _, options, answer, _, _ in MMBENCH_DEV}
    assert {s.question_id: (s.meta["options"], s.reference) for s in generated} == expected
    assert all(s.images[0].parent == fresh_root / "cache" for s in generated)
    _, single = load(fresh_root, "mmbench", tsv="plain.tsv", cache_dir=fresh_root / "cache", circular=False)
    assert [s.question_id for s in single] == ["0", "1"]


def test_scienceqa_prompt_and_text_only_question(data_root):
    _, samples = load(data_root, "scienceqa")
    assert samples[0].prompt == ("Context: N/A\nQuestion: Which property do these three objects have in common?\n"
                                 f"Options: (A) shiny (B) slippery (C) opaque\n{LETTER}")
    assert samples[0].reference == "B" and len(samples[0].images) == 1
    assert samples[2].images == () and samples[2].reference == "C"


def test_vizwiz_vqav2_gqa_prompts(data_root):
    _, vizwiz = load(data_root, "vizwiz")
    assert vizwiz[0].prompt == f"What is this?\n{VIZWIZ_INSTRUCTION}\n{SHORT}"
    assert vizwiz[0].question_id == "VizWiz_val_00000000.jpg"
    _, vqav2 = load(data_root, "vqav2")
    assert vqav2[1].prompt == f"How many people are there?\n{SHORT}"
    assert vqav2[1].images[0].name == "COCO_val2014_000000262148.jpg"
    _, gqa = load(data_root, "gqa")
    assert gqa[1].prompt == f"What is the man wearing?\n{SHORT}" and gqa[1].reference == "t-shirt"


def test_default_split_follows_the_files_on_disk(fresh_root):
    write_benchmark_fixture("vqav2", fresh_root)
    write_benchmark_fixture("vizwiz", fresh_root)
    (fresh_root / "vqav2" / "v2_mscoco_val2014_annotations.json").unlink()
    (fresh_root / "vizwiz" / "val.json").unlink()
    vqav2, samples = load(fresh_root, "vqav2")
    assert (vqav2.split, vqav2.has_public_answers, len(samples)) == ("test-dev", False, 2)
    vizwiz, samples = load(fresh_root, "vizwiz")
    assert (vizwiz.split, vizwiz.has_public_answers, len(samples)) == ("test", False, 2)
    assert samples[0].prompt == f"What colour is this shirt?\n{VIZWIZ_INSTRUCTION}\n{SHORT}"


# -- scores from hand-made predictions ---------------------------------------------------------------------------

def score(root: Path, name: str, predictions: dict[str, str], **kwargs) -> dict:
    benchmark, samples = load(root, name, **kwargs)
    return benchmark.score(predictions, samples)


def test_textvqa_score(data_root):
    # 34602 "Nikon." -> EvalAI "nikon" (period stripped), 7 of 10 answers: every leave-one-out subset has >= 3 -> 1.
    # 34603 "Two" -> "2"; answers "2","2","two"->"2" and seven "3": 3 matches; leaving out one of the three "2"s
    #   leaves 2 -> 2/3, leaving out a "3" leaves 3 -> 1: (3 * 2/3 + 7) / 10 = 0.9.
    # 34700 "yes" against ten "no" -> 0.        mean = (1 + 0.9 + 0) / 3 = 63.33%
    result = score(data_root, "textvqa", {"34602": "Nikon.", "34603": "Two", "34700": "yes"})
    assert result["score"] == pytest.approx(190 / 3)
    assert result["n"] == 3


def test_pope_score(data_root):
    predictions = {"1": "Not really.", "2": "NO", "3": "Yes.", "4": "There is a dog.", "5": "Yes", "6": "No"}
    # eval_pope.py: first sentence, words split on " ", "no" only for the words No/not/no.
    # adversarial (labels no, yes): "Not really" -> yes (FP), "NO" -> yes (TP): P 1/2, R 1, F1 2/3.
    # popular (yes, no): "Yes" TP, "There is a dog" -> yes (FP): F1 2/3.     random (yes, no): TP, TN: F1 1.
    # mean F1 = (2/3 + 2/3 + 1) / 3 = 77.78%; accuracies 50, 50, 100 -> 66.67%.
    result = score(data_root, "pope", predictions)
    assert result["score"] == pytest.approx(700 / 9)
    assert result["accuracy"] == pytest.approx(200 / 3)
    assert result["splits"]["adversarial"]["yes_ratio"] == pytest.approx(100.0)
    assert result["splits"]["random"]["f1"] == pytest.approx(100.0)
    assert result["n"] == 6
    # Lenient reading: adversarial "Not really" -> no (TN), "NO" -> no (FN): no TP, F1 0; popular's "There is a
    # dog." has no yes/no word -> wrong (FP): F1 2/3; random 1: mean (0 + 2/3 + 1) / 3 = 55.56%.
    assert score(data_root, "pope", predictions, rules="lenient")["score"] == pytest.approx(500 / 9)


def test_mme_score(data_root):
    predictions = {
        "existence/000000006040.jpg:1": "Yes", "existence/000000006040.jpg:2": "No",
        "existence/000000044279.jpg:1": "Yes, there is",  # first 4 chars "yes," -> yes: right
        "existence/000000044279.jpg:2": "Yeah",  # "yeah" holds neither "yes" nor "no": other, wrong (label No)
        "artwork/10002.jpg:1": "No",  # label Yes: wrong
        "artwork/10002.jpg:2": "no",
        "code_reasoning/0020.png:1": "Nope",  # "nope" holds "no": right (label No)
        "code_reasoning/0020.png:2": "yes",
    }
    # existence: acc 3/4 = 75, acc+ 1/2 images = 50 -> 125; artwork: acc 50, acc+ 0 -> 50; perception 175.
    # code_reasoning: 100 + 100 = 200 = cognition.  total 375.
    result = score(data_root, "mme", predictions)
    assert result["subtasks"]["existence"]["acc"] == pytest.approx(75.0)
    assert result["subtasks"]["existence"]["acc_plus"] == pytest.approx(50.0)
    assert result["subtasks"]["artwork"]["score"] == pytest.approx(50.0)
    assert (result["perception"], result["cognition"], result["score"]) == pytest.approx((175.0, 200.0, 375.0))
    assert result["unparseable"] == 1 and result["n"] == 8


def test_mmbench_circular_score(data_root):
    predictions = {
        "0": "A",  # options cat, dog; answer A
        "1000000": "The answer is cat",  # no letter token; option text "cat" (now B) is in the answer -> B: right
        "1": "D",
        "1000001": "(C) winter",  # the "(C)" form -> C: right
        "2000001": "A dog is sitting on the mat",  # "A" with > 3 tokens may be the article: no letter, no option
        "3000001": "A",
    }
    # Question 0: both rotations right. Question 1: rotation 2 unread -> wrong. Circular 1/2 = 50%.
    # Vanilla (rows 0 and 1 only): 2/2 = 100%. Per category: attribute_recognition 100, scene 0.
    result = score(data_root, "mmbench", predictions)
    assert result["score"] == pytest.approx(50.0)
    assert result["vanilla_accuracy"] == pytest.approx(100.0)
    assert result["categories"] == {"attribute_recognition": pytest.approx(100.0), "scene": pytest.approx(0.0)}
    assert result["l2_categories"]["coarse_perception"] == pytest.approx(0.0)
    assert (result["unparseable"], result["n_questions"], result["n"]) == (1, 2, 6)


def test_vqav2_val_score(data_root):
    # 262148000 "Yes" -> "yes", ten "yes": 1.
    # 262148001 "Two." -> "2"; answers two "2" and eight "3": leaving out a "2" leaves 1 -> 1/3, a "3" leaves 2 ->
    #   2/3: (2/3 + 8 * 2/3) / 10 = 0.6.
    # 393225000 "black/white" -> "/" becomes a space: "black white" != "black and white": 0.
    result = score(data_root, "vqav2", {"262148000": "Yes", "262148001": "Two.", "393225000": "black/white"})
    assert result["score"] == pytest.approx(160 / 3)
    assert result["answer_types"] == {"number": pytest.approx(60.0), "other": pytest.approx(0.0),
                                      "yes/no": pytest.approx(100.0)}


def test_vizwiz_val_score(data_root):
    # "Unanswerable" -> 7 of 10: 1.  "Coca-Cola" -> "coca cola" ("-" to a space), 5 of 10: 1.
    # "yes" with two "yes" of 10: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.   mean 2.6 / 3 = 86.67%
    result = score(data_root, "vizwiz", {"VizWiz_val_00000000.jpg": "Unanswerable",
                                         "VizWiz_val_00000001.jpg": "Coca-Cola", "VizWiz_val_00000002.jpg": "yes"})
    assert result["score"] == pytest.approx(260 / 3)
    assert result["answer_types"]["yes/no"] == pytest.approx(60.0)


def test_gqa_score(data_root):
    # convert_gqa_for_eval.py: rstrip('.') and lower: "yes" right, "t shirt" != "t-shirt" wrong, "no" right.
    result = score(data_root, "gqa", {"20968156": "Yes.", "20968157": "T shirt", "201307251": "No"})
    assert result["score"] == pytest.approx(200 / 3)
    assert (result["binary"], result["open"]) == pytest.approx((100.0, 0.0))


def test_scienceqa_score_and_answer_reading(data_root):
    # "4" (3 choices, answer B) "B": right.  "5" (2 choices, answer A) "C. tiger" reads C, beyond the choices:
    # wrong.  "9" (text only, answer C) "The answer is C.": right.  All 2/3; with an image 1/2 -> score 50%.
    result = score(data_root, "scienceqa", {"4": "B", "5": "C. tiger", "9": "The answer is C."})
    assert result["score"] == pytest.approx(50.0)
    assert result["accuracy"] == pytest.approx(200 / 3)
    assert (result["n_img"], result["failed"]) == (2, 0)
    assert [scienceqa_answer_letter(t) for t in ("B", "B. slippery", "The answer is B.", "(B)", "b",
                                                 "The answer is B. The answer is C.")] == ["B", "B", "B", None,
                                                                                           None, None]


def test_missing_prediction_is_an_error(data_root):
    benchmark, samples = load(data_root, "gqa")
    with pytest.raises(ValueError, match="'201307251'"):
        benchmark.score({"20968156": "yes", "20968157": "no"}, samples)


# -- no public answers: submission files -------------------------------------------------------------------------

def test_vqav2_test_dev_submission(data_root, tmp_path):
    benchmark, samples = load(data_root, "vqav2", split="test-dev")
    predictions = {"4195880": "Running.", "4195881": "Yes"}
    assert benchmark.score(predictions, samples)["score"] is None
    assert "no public answers" in benchmark.score(predictions, samples)["note"]
    path = benchmark.write_submission(predictions, samples, tmp_path / "vqav2.json")
    # Every test2015 question of llava_vqav2_mscoco_test2015.jsonl, EvalAI-processed, "" where unanswered.
    assert json.loads(path.read_text()) == [{"question_id": 4195880, "answer": "running"},
                                            {"question_id": 4195881, "answer": "yes"},
                                            {"question_id": 5810320, "answer": ""}]
    val, val_samples = load(data_root, "vqav2", split="val")
    assert val.write_submission({}, val_samples, tmp_path / "none.json") is None


def test_vizwiz_test_submission(data_root, tmp_path):
    benchmark, samples = load(data_root, "vizwiz", split="test")
    path = benchmark.write_submission({"0": "Blue shirt, I think?", "1": "Unanswerable"}, samples,
                                      tmp_path / "vizwiz.json")
    assert json.loads(path.read_text()) == [{"image": "VizWiz_test_00000000.jpg", "answer": "blue shirt i think"},
                                            {"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"}]


def read_xlsx(path: Path) -> list[list[str]]:
    namespace = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    sheet = ElementTree.fromstring(zipfile.ZipFile(path).read("xl/worksheets/sheet1.xml"))
    rows = []
    for row in sheet.iterfind(".//m:row", namespace):
        cells = {}
        for cell in row.iterfind("m:c", namespace):
            column = "".join(ch for ch in cell.get("r") if ch.isalpha())
            text = cell.find(".//m:t", namespace)
            cells[column] = text.text if text is not None else cell.find("m:v", namespace).text
        rows.append([cells.get(column) for column in "ABCDEFGH"])
    return rows


def test_mmbench_test_submission_is_llavas_xlsx(data_root, tmp_path):
    benchmark, samples = load(data_root, "mmbench", split="test")
    assert not benchmark.has_public_answers and all(s.reference is None for s in samples)
    assert benchmark.score({"5": "B", "6": "A"}, samples)["score"] is None
    path = benchmark.write_submission({"5": "B"}, samples, tmp_path / "submission.json")
    assert path.suffix == ".xlsx"
    # convert_mmbench_for_submission.py: hint, category, source, image, comment, l2-category dropped,
    # "prediction" inserted as the 7th column; missing options and an unanswered row are empty cells.
    assert read_xlsx(path) == [["index", "question", "A", "B", "C", "D", "prediction", "split"],
                               ["5", "What colour is the square?", "red", "blue", "green", None, "B", "test"],
                               ["6", "How many squares are there?", "1", "2", None, None, None, "test"]]


# -- missing and malformed files ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "split", "remove", "expected"), [
    ("textvqa", None, "textvqa/TextVQA_0.5.1_val.json", "TextVQA_0.5.1_val.json"),
    ("textvqa", None, "textvqa/llava_textvqa_val_v051_ocr.jsonl", "llava_textvqa_val_v051_ocr.jsonl"),
    ("pope", None, "pope/coco", "coco_pope_random.json"),
    ("mme", None, "MME", "MME_Benchmark_release_version"),
    ("mmbench", None, "mmbench/mmbench_dev_20230712.tsv", "mmbench_dev_20230712.tsv"),
    ("vqav2", "val", "vqav2/v2_mscoco_val2014_annotations.json", "v2_mscoco_val2014_annotations.json"),
    ("vizwiz", "val", "vizwiz/val.json", "val.json"),
    ("gqa", None, "gqa/data/testdev_balanced_questions.json", "testdev_balanced_questions.json"),
    ("scienceqa", None, "scienceqa/problems.json", "problems.json"),
    ("scienceqa", None, "scienceqa/images/test/4/image.png", "record 0 (id 4): image file"),
])
def test_missing_file_is_named(fresh_root, name, split, remove, expected):
    write_benchmark_fixture(name, fresh_root)
    target = fresh_root / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(BenchmarkDataError, match="(Missing|does not exist)") as error:
        load(fresh_root, name, split=split)
    assert expected in str(error.value)


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def corrupt_mmbench_image(path: Path) -> None:
    write_mmbench_tsv(path, MMBENCH_DEV[:2], image_references=False)
    row = path.read_text().splitlines()[2]
    assert "\tiVBOR" in row  # a base64 PNG starts so
    replace_line(path, 3, row.replace("\tiVBOR", "\t!!!!"))


def swap_first_pope_questions(root: Path) -> None:
    records = pope_llava_questions()
    records[0], records[1] = records[1], records[0]
    write_jsonl(root / "pope/llava_pope_test.jsonl", records)


MALFORMED = {
    "textvqa-json": ("textvqa", lambda root: replace_line(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl", 2,
                                                          '{"question_id": 1,'),
                     ["llava_textvqa_val_v051_ocr.jsonl, line 2", "not valid JSON"]),
    "textvqa-unknown-question": ("textvqa", lambda root: replace_line(
        root / "textvqa/llava_textvqa_val_v051_ocr.jsonl", 3,
        json.dumps({"question_id": "00a1b2c3d4e5f607", "image": "00a1b2c3d4e5f607.jpg",
                    "text": f"is this a door?\n{SHORT}"})),
        ["llava_textvqa_val_v051_ocr.jsonl, line 3", "'is this a door?'", "TextVQA_0.5.1_val.json"]),
    "pope-label": ("pope", lambda root: replace_line(root / "pope/coco/coco_pope_random.json", 2, json.dumps(
        {"question_id": 2, "image": "COCO_val2014_000000016631.jpg", "text": "Is there a knife?", "label": "maybe"})),
        ["coco_pope_random.json, line 2", "label", "'maybe'"]),
    "pope-order": ("pope", swap_first_pope_questions,
                   ["llava_pope_test.jsonl, line 1", "coco_pope_adversarial.json line 1"]),
    "pope-count": ("pope", lambda root: write_jsonl(root / "pope/llava_pope_test.jsonl", pope_llava_questions()[1:]),
                   ["llava_pope_test.jsonl: 1 questions of category 'adversarial'",
                    "coco_pope_adversarial.json has 2"]),
    "mme-line": ("mme", lambda root: (root / "MME/MME_Benchmark_release_version/existence/000000044279.txt")
                 .write_text("Is there a cat in this image? Yes\n"),
                 ["000000044279.txt, line 1", "<question>\\t<Yes|No>"]),
    "mmbench-image": ("mmbench", lambda root: corrupt_mmbench_image(root / "mmbench/mmbench_dev_20230712.tsv"),
                      ["mmbench_dev_20230712.tsv, line 3 (index 1000000)", "base64"]),
    "mmbench-answer": ("mmbench", lambda root: write_mmbench_tsv(
        root / "mmbench/mmbench_dev_20230712.tsv",
        [(0, "What animal is shown?", None, ["cat", "dog"], "C", "attribute_recognition", "l2")]),
        ["mmbench_dev_20230712.tsv, line 2 (index 0)", "A, B", "'C'"]),
    "vqav2-answers": ("vqav2", lambda root: edit_json(root / "vqav2/v2_mscoco_val2014_annotations.json",
                                                      lambda data: data["annotations"][1].pop("answers")),
                      ["v2_mscoco_val2014_annotations.json, annotations[1]", "'answers'"]),
    "vizwiz-question": ("vizwiz", lambda root: edit_json(root / "vizwiz/val.json", lambda data: data[1].pop(
        "question")), ["val.json, record 1 (VizWiz_val_00000001.jpg)", "'question'"]),
    "gqa-id": ("gqa", lambda root: replace_line(root / "gqa/llava_gqa_testdev_balanced.jsonl", 3, json.dumps(
        {"question_id": "999", "image": "n235859.jpg", "text": "q"})),
        ["llava_gqa_testdev_balanced.jsonl, line 3", "'999'", "testdev_balanced_questions.json"]),
    "scienceqa-id": ("scienceqa", lambda root: edit_json(root / "scienceqa/llava_test_CQM-A.json",
                                                         lambda data: data[2].update(id="77")),
                     ["llava_test_CQM-A.json, record 2 (id 77)", "problems.json"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_is_named(fresh_root, case):
    name, corrupt, expected = MALFORMED[case]
    write_benchmark_fixture(name, fresh_root)
    corrupt(fresh_root)
    with pytest.raises(BenchmarkDataError) as error:
        load(fresh_root, name, split="val" if name in ("vqav2", "vizwiz") else None)
    for part in expected:
        assert part in str(error.value), (part, str(error.value))


def test_fixture_api_refuses_unknown_names(fresh_root):
    with pytest.raises(ValueError, match="textvqa"):
        write_benchmark_fixture("coco", fresh_root)
