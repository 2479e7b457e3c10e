"""The benchmark base class, the sample record every loader returns, and the registry of benchmarks.

A benchmark is one file in :mod:`divico.evaluation.benchmarks` with ``@register_benchmark("name")``: it reads the
files a user has on disk (LLaVA-1.5's evaluation layout, or the official release files), turns every question into
a :class:`Sample` with LLaVA-1.5's evaluation prompt, and scores free-text predictions with the official rules in
:mod:`divico.metrics`. Where the answers are not public it writes the official submission file instead.

>>> bench = get_benchmark("pope")(Path("playground/data/eval"))
>>> samples = bench.load()
>>> scores = bench.score({s.question_id: "Yes" for s in samples}, samples)

The small readers at the end (:func:`require_file`, :func:`read_json`, :func:`read_jsonl`, :func:`require_fields`)
raise :class:`BenchmarkDataError` naming the file, the record and what was expected; every loader uses them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from divico.metrics import SCORING_RULES

__all__ = [
    "OPTION_LETTER_INSTRUCTION",
    "SHORT_ANSWER_INSTRUCTION",
    "Benchmark",
    "BenchmarkDataError",
    "Sample",
    "available_benchmarks",
    "get_benchmark",
    "iter_records",
    "read_json",
    "read_jsonl",
    "register_benchmark",
    "require_fields",
    "require_file",
    "require_image",
]

#: LLaVA-1.5's instruction for short-answer sets (docs/Evaluation.md), on its own line after the question.
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
#: LLaVA-1.5's instruction for multiple choice (MMBench, ScienceQA: ``--single-pred-prompt``).
OPTION_LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


class BenchmarkDataError(ValueError):
    """A benchmark file is missing or malformed; the message names the file, the record and what was expected."""


@dataclass(frozen=True)
class Sample:
    """One question of a benchmark, ready for generation.

    Attributes
    ----------
    question_id
        The benchmark's own id of the question, as a string (predictions are keyed by it).
    prompt
        The user text that follows the visual input: LLaVA-1.5's evaluation prompt including its instruction
        (e.g. ``"What is this?\\nAnswer the question using a single word or phrase."``).
    images
        Image files shown before the prompt, in order (MMBench: decoded from base64 into a cache folder).
    video
        Video file (video QA), or None.
    reference
        What the scorer needs (answer list, label, option letter ...); None where the answers are not public.
    meta
        Benchmark-specific facts (category, split, subtask, options, index ...), JSON-serialisable.
    max_new_tokens
        Per-sample generation budget, or None for the run's setting.
    """

    question_id: str
    prompt: str
    images: tuple[Path, ...] = ()
    video: Path | None = None
    reference: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None


class Benchmark(ABC):
    """Loader + scorer of one benchmark's files.

    Parameters
    ----------
    data_root
        The folder holding the benchmarks' folders (LLaVA-1.5's ``playground/data/eval``); the benchmark reads
        ``data_root / folder``. ``data_root`` may also be that folder itself.
    split
        One of :attr:`splits` (None: :attr:`default_split`).
    **options
        Benchmark-specific options, names and defaults in :attr:`option_defaults`.

    Class attributes
    ----------------
    name
        Registry name (set by :func:`register_benchmark`).
    folder
        The benchmark's folder under ``data_root``.
    modality
        ``"image"`` or ``"video"``.
    needs_judge
        True when :meth:`score` needs an LLM judge.
    has_public_answers
        False where the split's answers are held by an evaluation server (instances set it per split); then
        :meth:`score` reports that and :meth:`write_submission` writes the server's file.
    default_max_new_tokens
        Generation budget of LLaVA-1.5's evaluation script for this benchmark.
    splits, default_split
        The valid ``split`` values and the one used when none is given (``()`` / None: no splits).
    option_defaults
        The accepted ``**options`` and their defaults; every benchmark accepts ``rules`` (``"official"``, the
        default, or ``"lenient"``: :mod:`divico.metrics`'s scoring rules).
    """

    name: ClassVar[str]
    folder: ClassVar[str] = ""
    modality: ClassVar[str] = "image"
    needs_judge: ClassVar[bool] = False
    has_public_answers: ClassVar[bool] = True
    default_max_new_tokens: ClassVar[int] = 16
    splits: ClassVar[tuple[str, ...]] = ()
    default_split: ClassVar[str | None] = None
    option_defaults: ClassVar[Mapping[str, Any]] = {"rules": "official"}

    def __init__(self, data_root: Path | str, split: str | None = None, **options: Any) -> None:
        data_root = Path(data_root)
        self.data_root = data_root
        # Accept the benchmark's own folder as data root too (a user pointing at ``eval/pope``).
        folder = data_root / self.folder if self.folder else data_root
        if self.folder and not folder.is_dir() and data_root.name == self.folder:
            folder = data_root
        self.root = folder
        if split is None:
            split = self.default_split
        # A None split on a benchmark with splits means "all of them" or "the one on disk" (the class says which).
        if self.splits and split is not None and split not in self.splits:
            raise ValueError(f"Unknown split {split!r} for benchmark {self.name!r}; valid splits: "
                             f"{', '.join(self.splits)}.")
        if not self.splits and split is not None:
            raise ValueError(f"Benchmark {self.name!r} has no splits, got split={split!r}.")
        self.split = split
        unknown = sorted(set(options) - set(self.option_defaults))
        if unknown:
            valid = ", ".join(sorted(self.option_defaults)) or "none"
            raise ValueError(f"Unknown option(s) {', '.join(unknown)} for benchmark {self.name!r}; valid: {valid}.")
        self.options: dict[str, Any] = {**self.option_defaults, **options}
        if self.options.get("rules", "official") not in SCORING_RULES:
            raise ValueError(f"Unknown scoring rules {self.options['rules']!r}; valid: {', '.join(SCORING_RULES)}.")

    def files(self) -> dict[str, Path]:
        """The files (and folders) this benchmark reads for its split, by role (for error messages and docs)."""
        return {}

    @abstractmethod
    def load(self) -> list[Sample]:
        """Read and validate the benchmark's files.

        Raises
        ------
        BenchmarkDataError
            If a file is missing or a record malformed (the message names the file, the record and what was
            expected).
        """

    @abstractmethod
    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Any = None) -> dict[str, Any]:
        """Score raw model outputs with the benchmark's official rules.

        Parameters
        ----------
        predictions
            Raw model output per ``Sample.question_id``.
        samples
            The samples that were answered (a subset of :meth:`load`'s, e.g. with ``--limit``).
        judge
            A :class:`divico.evaluation.judge.Judge` for benchmarks that need one (``needs_judge``).

        Returns
        -------
        dict
            Always ``"score"`` (the headline number as published, or None where answers are not public) and
            ``"n"`` (questions scored); further keys documented per benchmark.
        """

    def write_submission(self, predictions: Mapping[str, str], samples: Sequence[Sample],
                         path: Path) -> Path | None:
        """Write the evaluation server's submission file where answers are not public; None otherwise.

        ``path`` is the file to write (its suffix may be adjusted to the server's format); returns the file
        written.
        """
        return None

    # -- helpers shared by the benchmarks ------------------------------------------------------------------------

    def no_public_answers(self, samples: Sequence[Sample]) -> dict[str, Any]:
        """The :meth:`score` result of a split whose answers only its evaluation server holds."""
        return {"score": None, "n": len(samples),
                "note": f"{self.name} split {self.split!r} has no public answers: submit the file written by "
                        f"write_submission to its evaluation server."}

    @staticmethod
    def require_predictions(predictions: Mapping[str, str], samples: Sequence[Sample]) -> list[str]:
        """The predictions of ``samples`` in order.

        Raises
        ------
        ValueError
            If ``samples`` is empty or a sample has no prediction (the message names the first missing ids).
        """
        if not samples:
            raise ValueError("No samples to score.")
        missing = [s.question_id for s in samples if s.question_id not in predictions]
        if missing:
            raise ValueError(f"{len(missing)} of {len(samples)} questions have no prediction, e.g. question_id "
                             f"{', '.join(map(repr, missing[:5]))}.")
        return [predictions[s.question_id] for s in samples]


# -- registry -----------------------------------------------------------------------------------------------------

_BENCHMARKS: dict[str, type[Benchmark]] = {}
B = TypeVar("B", bound=type[Benchmark])


def register_benchmark(name: str) -> Callable[[B], B]:
    """Class decorator: register a :class:`Benchmark` subclass under ``name`` (sets ``cls.name``).

    Raises
    ------
    ValueError
        If ``name`` is empty or already registered by another class.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A benchmark name must be a non-empty string, got {name!r}.")

    def decorator(cls: B) -> B:
        if name in _BENCHMARKS and _BENCHMARKS[name] is not cls:
            raise ValueError(f"Benchmark name {name!r} is already registered by {_BENCHMARKS[name].__name__}.")
        _BENCHMARKS[name] = cls
        cls.name = name
        return cls

    return decorator


def get_benchmark(name: str) -> type[Benchmark]:
    """The benchmark class registered under ``name``.

    Raises
    ------
    ValueError
        If no benchmark has that name (the message lists the registered ones).
    """
    if name not in _BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; available benchmarks: {', '.join(sorted(_BENCHMARKS))}.")
    return _BENCHMARKS[name]


def available_benchmarks() -> list[str]:
    """Names of the registered benchmarks, sorted."""
    return sorted(_BENCHMARKS)


# -- validated readers ----------------------------------------------------------------------------------------------

def require_file(path: Path, what: str) -> Path:
    """``path`` if it exists, else :class:`BenchmarkDataError` saying what the file should hold."""
    if not path.exists():
        raise BenchmarkDataError(f"Missing file {path}: expected {what}.")
    return path


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON file ``path``.

    Raises
    ------
    BenchmarkDataError
        If the file is missing or not valid JSON (naming the file, the line and ``what`` was expected).
    """
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BenchmarkDataError(f"{path}: not valid JSON at line {error.lineno} column {error.colno} "
                                 f"({error.msg}); expected {what}.") from None


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-empty line of the JSON-lines file ``path``.

    Raises
    ------
    BenchmarkDataError
        If the file is missing, a line is not JSON or not an object (naming the file and line).
    """
    require_file(path, what)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkDataError(f"{path}, line {number}: not valid JSON ({error.msg}); expected one JSON "
                                     f"object per line: {what}.") from None
        if not isinstance(record, dict):
            raise BenchmarkDataError(f"{path}, line {number}: expected a JSON object ({what}), got "
                                     f"{type(record).__name__}.")
        records.append((number, record))
    return records


def require_fields(record: Any, fields: Mapping[str, type | tuple[type, ...]], path: Path, where: str) -> None:
    """Check that ``record`` is a dict with every field of ``fields`` of the given type(s).

    Parameters
    ----------
    record
        The parsed record.
    fields
        Field name -> accepted type(s).
    path, where
        The file and the record's position (``"line 3"``, ``"record 2 (question_id 7)"``) for the message.

    Raises
    ------
    BenchmarkDataError
        Naming the file, the record, the field and the expected type.
    """
    if not isinstance(record, dict):
        raise BenchmarkDataError(f"{path}, {where}: expected an object with fields {', '.join(fields)}, got "
                                 f"{type(record).__name__}.")
    for name, types in fields.items():
        if name not in record:
            raise BenchmarkDataError(f"{path}, {where}: missing field {name!r}; expected fields "
                                     f"{', '.join(fields)}.")
        accepted = types if isinstance(types, tuple) else (types,)
        value = record[name]
        # bool is an int subclass; a bool where a number is expected is malformed.
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            names = " or ".join(t.__name__ for t in accepted)
            raise BenchmarkDataError(f"{path}, {where}: field {name!r} should be {names}, got {value!r}.")


def iter_records(records: Any, path: Path, what: str) -> Iterable[tuple[int, Any]]:
    """(index, record) of a JSON list ``records`` read from ``path``; a non-list is a :class:`BenchmarkDataError`."""
    if not isinstance(records, list):
        raise BenchmarkDataError(f"{path}: expected a JSON list of {what}, got {type(records).__name__}.")
    return enumerate(records)


def require_image(path: Path, source: Path, where: str) -> Path:
    """``path`` if that image file exists, else :class:`BenchmarkDataError` naming the record that refers to it."""
    if not path.is_file():
        raise BenchmarkDataError(f"{source}, {where}: image file {path} does not exist.")
    return path
