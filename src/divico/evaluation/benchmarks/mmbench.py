"""MMBench (English, dev / test), prompted as LLaVA's ``model_vqa_mmbench.py``, scored with circular evaluation.

Files (LLaVA-1.5's ``playground/data/eval/mmbench``)::

    mmbench/mmbench_dev_20230712.tsv    columns index, question, hint, A, B, C, D, answer, category, image (base64),
    mmbench/mmbench_test_20230712.tsv   source, l2-category, comment, split (test: no answers)

In these releases every question also appears with its options rotated, under ``index + k * 1_000_000``;
circular evaluation (MMBench's, lmms-eval's ``mmbench_evals.py``) counts a question right only if every rotation of
it (rows with the same ``index % 1_000_000``) is. A TSV without such rows (later releases) gets the rotations
generated here as LLaVA's ``--all-rounds`` does (option ``circular``). Images are decoded into ``cache_dir``
(default ``mmbench/divico_image_cache/<tsv name>/``; a temporary folder when that one cannot be written).

Prompt (LLaVA): ``[<hint>\\n]<question>\\nA. <option>\\nB. <option>...\\nAnswer with the option's letter from the
given choices directly.``; an option stops at the first missing one (pandas' missing values, "nan", "none").
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from PIL import Image, UnidentifiedImageError

from divico.evaluation.benchmark import (
    OPTION_LETTER_INSTRUCTION,
    Benchmark,
    BenchmarkDataError,
    Sample,
    register_benchmark,
    require_file,
)
from divico.metrics import mmbench_circular_accuracy, rotate_options

__all__ = ["CIRCULAR_STRIDE", "MMBench", "SUBMISSION_DROPPED_COLUMNS", "write_xlsx"]

#: Circular copies of question ``i`` have index ``i + k * CIRCULAR_STRIDE``.
CIRCULAR_STRIDE = 1_000_000
OPTION_COLUMNS = ("A", "B", "C", "D")
#: Columns LLaVA's ``convert_mmbench_for_submission.py`` drops before adding ``prediction`` as the 7th column.
SUBMISSION_DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
# pandas.read_table's default missing-value strings (LLaVA reads the TSV with pandas) plus is_none()'s.
_MISSING = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                      "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null", "none"})
_REQUIRED_COLUMNS = ("index", "question", "hint", "A", "B", "image")


def _is_missing(value: str | None) -> bool:
    return value is None or value in _MISSING or value.lower() in ("nan", "none")


@register_benchmark("mmbench")
class MMBench(Benchmark):
    """MMBench-EN; ``split`` ``"dev"`` (answers public) or ``"test"`` (submission file only).

    Options: ``tsv`` (file name under ``mmbench/``; default ``mmbench_<split>_20230712.tsv``), ``cache_dir``
    (where decoded images go), ``circular`` (generate rotations when the TSV has none; default True).

    ``score`` returns ``score`` (circular accuracy %), ``vanilla_accuracy`` (rotation 0 only), ``categories`` and
    ``l2_categories`` (circular accuracy % per category), ``unparseable``, ``n_questions`` and ``n`` (rows asked).
    """

    folder = "mmbench"
    splits = ("dev", "test")
    default_split = "dev"
    default_max_new_tokens = 1024  # model_vqa_mmbench.py generates up to 1024 tokens
    option_defaults = {**Benchmark.option_defaults, "tsv": None, "cache_dir": None, "circular": True}

    def __init__(self, data_root: Path | str, split: str | None = None, **options: Any) -> None:
        super().__init__(data_root, split, **options)
        self.has_public_answers = self.split != "test"
        self._rows: list[dict[str, str]] | None = None
        self._columns: list[str] = []

    def files(self) -> dict[str, Path]:
        name = self.options["tsv"] or f"mmbench_{self.split}_20230712.tsv"
        return {"questions": self.root / name}

    def cache_folder(self) -> Path:
        """Where the decoded images are written."""
        if self.options["cache_dir"] is not None:
            return Path(self.options["cache_dir"])
        return self.root / "divico_image_cache" / self.files()["questions"].stem

    # -- reading -------------------------------------------------------------------------------------------------

    def read_rows(self) -> tuple[list[str], list[dict[str, str]]]:
        """(columns, rows) of the TSV, every row a dict column -> text, validated.

        Raises
        ------
        BenchmarkDataError
            If the file is missing, a required column is absent, a row has another number of fields, or an index
            is not an integer or repeats.
        """
        path = require_file(self.files()["questions"], "MMBench's TSV (index, question, hint, A-D, answer, "
                                                       "category, image as base64, ...)")
        # Base64 images exceed csv's default field limit of 128 KiB.
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            try:
                columns = next(reader)
            except StopIteration:
                raise BenchmarkDataError(f"{path}: empty file; expected a header row with columns "
                                         f"{', '.join(_REQUIRED_COLUMNS)}, ...") from None
            required = _REQUIRED_COLUMNS + (("answer",) if self.has_public_answers else ())
            missing = [name for name in required if name not in columns]
            if missing:
                raise BenchmarkDataError(f"{path}: missing column(s) {', '.join(missing)}; expected at least "
                                         f"{', '.join(required)} (header: {', '.join(columns)}).")
            rows, seen = [], set()
            for number, fields in enumerate(reader, start=2):
                if not fields:
                    continue
                if len(fields) != len(columns):
                    raise BenchmarkDataError(f"{path}, line {number}: {len(fields)} fields, expected "
                                             f"{len(columns)} ({', '.join(columns)}).")
                row = dict(zip(columns, fields, strict=True))
                try:
                    index = int(row["index"])
                except ValueError:
                    raise BenchmarkDataError(f"{path}, line {number}: index should be an integer, got "
                                             f"{row['index']!r}.") from None
                if index in seen:
                    raise BenchmarkDataError(f"{path}, line {number}: index {index} appears twice.")
                seen.add(index)
                row["_line"] = str(number)
                rows.append(row)
        return columns, rows

    def load(self) -> list[Sample]:
        path = self.files()["questions"]
        columns, rows = self.read_rows()
        self._columns, self._rows = columns, rows
        images = self._decode_images(path, rows)
        has_copies = any(int(row["index"]) >= CIRCULAR_STRIDE for row in rows)
        samples = []
        for row in rows:
            where = f"line {row['_line']} (index {row['index']})"
            options = []
            for column in OPTION_COLUMNS:
                if _is_missing(row.get(column)):
                    break
                options.append(row[column])
            if len(options) < 2:
                raise BenchmarkDataError(f"{path}, {where}: expected at least options A and B, got {len(options)}.")
            answer = None
            if self.has_public_answers:
                answer = row["answer"].strip()
                if not answer or answer not in "ABCD"[: len(options)]:
                    raise BenchmarkDataError(f"{path}, {where}: answer should be one of "
                                             f"{', '.join('ABCD'[: len(options)])}, got {row['answer']!r}.")
            index = int(row["index"])
            rotations = [0] if has_copies or not self.options["circular"] or answer is None else range(len(options))
            for rotation in rotations:
                shown, correct = (rotate_options(options, answer, rotation) if rotation else (options, answer))
                samples.append(self._sample(row, index + rotation * CIRCULAR_STRIDE, shown, correct,
                                            images[index]))
        return samples

    @staticmethod
    def _sample(row: dict[str, str], index: int, options: Sequence[str], answer: str | None, image: Path) -> Sample:
        question = row["question"]
        if not _is_missing(row["hint"]):
            question = row["hint"] + "\n" + question
        for letter, option in zip("ABCD", options):
            question += f"\n{letter}. {option}"
        meta = {"index": index, "group": index % CIRCULAR_STRIDE, "rotation": index // CIRCULAR_STRIDE,
                "options": list(options), "category": row.get("category"), "l2_category": row.get("l2-category")}
        return Sample(question_id=str(index), prompt=f"{question}\n{OPTION_LETTER_INSTRUCTION}", images=(image,),
                      reference=answer, meta=meta)

    def _decode_images(self, path: Path, rows: list[dict[str, str]]) -> dict[int, Path]:
        """index -> decoded image file; a short all-digit ``image`` field refers to another row's image."""
        folder = self.cache_folder()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            # A read-only data folder: decode into a temporary folder keyed by the TSV's path.
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
            folder = Path(tempfile.gettempdir()) / f"divico-mmbench-{digest}"
            folder.mkdir(parents=True, exist_ok=True)
        images: dict[int, Path] = {}
        references = []
        for row in rows:
            index, where = int(row["index"]), f"line {row['_line']} (index {row['index']})"
            value = row["image"].strip()
            if value.isdigit() and len(value) <= 64:
                references.append((index, int(value), where))
                continue
            try:
                data = base64.b64decode(value, validate=True)
                with Image.open(io.BytesIO(data)) as image:
                    extension = (image.format or "png").lower().replace("jpeg", "jpg")
            except (binascii.Error, ValueError, UnidentifiedImageError):
                raise BenchmarkDataError(f"{path}, {where}: column image should be a base64-encoded image, got "
                                         f"{value[:40]!r}{'...' if len(value) > 40 else ''}.") from None
            target = folder / f"{index}.{extension}"
            if not target.is_file() or target.stat().st_size != len(data):
                target.write_bytes(data)
            images[index] = target
        for index, referred, where in references:
            if referred not in images:
                raise BenchmarkDataError(f"{path}, {where}: image refers to index {referred}, which has no image.")
            images[index] = images[referred]
        return images

    # -- scoring -------------------------------------------------------------------------------------------------

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Any = None) -> dict[str, Any]:
        if not self.has_public_answers:
            return self.no_public_answers(samples)
        answers = self.require_predictions(predictions, samples)
        rules = self.options["rules"]

        def circular(subset: list[int]) -> dict[str, Any]:
            return mmbench_circular_accuracy(
                [answers[i] for i in subset], [samples[i].reference for i in subset],
                [samples[i].meta["options"] for i in subset], [str(samples[i].meta["group"]) for i in subset],
                [samples[i].meta["rotation"] for i in subset], rules=rules)

        result = circular(list(range(len(samples))))
        by_category: dict[str, dict[str, list[int]]] = {"categories": defaultdict(list),
                                                         "l2_categories": defaultdict(list)}
        # A question's category is its original row's (lmms-eval reads it from the index < 1e6 row).
        for position, sample in enumerate(samples):
            by_category["categories"][str(sample.meta["category"])].append(position)
            by_category["l2_categories"][str(sample.meta["l2_category"])].append(position)
        for key, groups in by_category.items():
            result[key] = {name: circular(subset)["score"] for name, subset in sorted(groups.items())}
        return {**result, "n": len(samples)}

    def write_submission(self, predictions: Mapping[str, str], samples: Sequence[Sample],
                         path: Path) -> Path | None:
        """The evaluation server's ``.xlsx`` (LLaVA's ``convert_mmbench_for_submission.py``): the TSV's rows and
        columns less hint, category, source, image, comment and l2-category, with ``prediction`` as 7th column
        (empty for rows not answered). Written for either split; ``path``'s suffix becomes ``.xlsx``."""
        if self._rows is None:
            self._columns, self._rows = self.read_rows()
        kept = [name for name in self._columns if name not in SUBMISSION_DROPPED_COLUMNS]
        header = kept[:6] + ["prediction"] + kept[6:]
        rows = []
        for row in self._rows:
            # pandas writes its missing values (empty cells, "nan", ...) as empty cells.
            values: list[str | int | None] = [int(row["index"]) if name == "index" else
                                              None if _is_missing(row[name]) else row[name] for name in kept]
            values.insert(6, predictions.get(str(int(row["index"]))))
            rows.append(values)
        target = Path(path).with_suffix(".xlsx")
        write_xlsx(target, header, rows)
        return target


# -- a dependency-free .xlsx writer (the server wants Excel; openpyxl is not a dependency) ---------------------------

def _column_name(number: int) -> str:
    name = ""
    while number:
        number, remainder = divmod(number - 1, 26)
        name = chr(ord("A") + remainder) + name
    return name


def _xml_text(value: str) -> str:
    # XML 1.0 forbids most control characters; Excel would refuse the file.
    cleaned = "".join(ch for ch in value if ch in "\t\n\r" or ord(ch) >= 0x20)
    return escape(cleaned)


def write_xlsx(path: Path, header: Sequence[str], rows: Sequence[Sequence[str | int | float | None]]) -> Path:
    """Write one worksheet (``Sheet1``) with ``header`` and ``rows`` as an Office Open XML workbook.

    Strings are inline strings, ints/floats numbers, None an empty cell; openpyxl and pandas read it back.
    """
    lines = []
    for row_number, values in enumerate([list(header), *map(list, rows)], start=1):
        cells = []
        for column_number, value in enumerate(values, start=1):
            reference = f"{_column_name(column_number)}{row_number}"
            if value is None:
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(f'<c r="{reference}"><v>{value}</v></c>')
            else:
                cells.append(f'<c r="{reference}" t="inlineStr"><is><t xml:space="preserve">'
                             f'{_xml_text(str(value))}</t></is></c>')
        lines.append(f'<row r="{row_number}">{"".join(cells)}</row>')
    sheet = ('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
             '<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
             f'<sheetData>{"".join(lines)}</sheetData></worksheet>')
    parts = {
        "[Content_Types].xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
            '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            '</Types>'),
        "_rels/.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Target="xl/workbook.xml" '
            'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument"/>'
            '</Relationships>'),
        "xl/workbook.xml": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
            '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" '
            'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">'
            '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'),
        "xl/_rels/workbook.xml.rels": (
            '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
            '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
            '<Relationship Id="rId1" Target="worksheets/sheet1.xml" '
            'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/worksheet"/>'
            '</Relationships>'),
        "xl/worksheets/sheet1.xml": sheet,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, text in parts.items():
            archive.writestr(name, text)
    return path
