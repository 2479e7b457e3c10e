"""Open-ended video QA in Video-LLaVA's format (MSVD-QA, MSRVTT-QA, TGIF-QA), judged by an LLM.

Video-LLaVA's evaluation data (``TRAIN_AND_VALIDATE.md``, scripts ``scripts/v1_5/eval/run_qa_*.sh``) hold, per
dataset under ``eval/GPT_Zero_Shot_QA/``::

    MSVD_Zero_Shot_QA/   test_q.json  test_a.json  videos/
    MSRVTT_Zero_Shot_QA/ test_q.json  test_a.json  videos/all/
    TGIF_Zero_Shot_QA/   test_q.json  test_a.json  mp4/

``test_q.json`` is a list of ``{"video_name", "question_id", "question"}`` and ``test_a.json`` the list of
``{"answer", "type", "question_id"}`` in the same order (``run_inference_video_qa.py`` pairs them by position; here
their ids must agree too). The video of a question is ``<video folder>/<video_name><ext>``, the first of ``.mp4``,
``.avi``, ``.mov``, ``.mkv`` that exists.

Inference as ``run_inference_video_qa.py``: 8 frames, the question itself as the prompt after the video (no added
instruction), greedy, up to 1024 new tokens. Scoring as ``eval_video_qa.py``: an LLM judge (see
:mod:`divico.evaluation.judge`) answers yes/no and a score 0-5 per prediction; accuracy is the share of yes among
the judged questions (in %) and the mean score their average. Questions whose judge replies stayed malformed are
counted as ``failed`` and left out of both (Video-LLaVA retries those without limit).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from divico.evaluation.benchmark import (
    Benchmark,
    BenchmarkDataError,
    Sample,
    iter_records,
    read_json,
    register_benchmark,
    require_fields,
)
from divico.evaluation.judge import Judge, JudgeVerdict, judge_all
from divico.video import read_video_frames

__all__ = ["VIDEO_EXTENSIONS", "MSRVTTQA", "MSVDQA", "TGIFQA", "VideoQABenchmark"]

#: The extensions ``run_inference_video_qa.py`` tries, in its order.
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
QUESTION_FIELDS = {"video_name": str, "question_id": (str, int), "question": str}
ANSWER_FIELDS = {"answer": (str, int, float), "question_id": (str, int)}


class VideoQABenchmark(Benchmark):
    """One of Video-LLaVA's zero-shot video QA sets; subclasses name the folders.

    Parameters
    ----------
    data_root
        Video-LLaVA's ``eval`` folder, its ``eval/GPT_Zero_Shot_QA``, or the dataset's own folder.
    split
        None (one test set).
    num_frames
        Frames sampled uniformly from each video (Video-LLaVA: 8), >= 1.
    question_file, answer_file, video_dir
        Paths overriding ``test_q.json``, ``test_a.json`` and the video folder.
    skip_missing_videos
        Leave out questions whose video is missing (what ``run_inference_video_qa.py`` does silently; the count is
        in :attr:`missing_videos`) instead of raising.

    Class attributes
    ----------------
    dataset_folder
        The dataset's folder under ``GPT_Zero_Shot_QA``.
    video_folder
        The video folder under the dataset's folder.
    """

    modality: ClassVar[str] = "video"
    needs_judge: ClassVar[bool] = True
    default_max_new_tokens: ClassVar[int] = 1024
    dataset_folder: ClassVar[str]
    video_folder: ClassVar[str]
    option_defaults: ClassVar[Mapping[str, Any]] = {
        "num_frames": 8, "question_file": None, "answer_file": None, "video_dir": None,
        "skip_missing_videos": False,
    }

    def __init__(self, data_root: Path | str, split: str | None = None, **options: Any) -> None:
        super().__init__(data_root, split, **options)
        num_frames = self.options["num_frames"]
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}.")
        data_root = Path(data_root)
        candidates = [data_root / "GPT_Zero_Shot_QA" / self.dataset_folder, data_root / self.dataset_folder]
        if data_root.name == self.dataset_folder:
            candidates.append(data_root)
        # The first that exists; else the canonical place, which the missing-file error then names.
        self.root = next((folder for folder in candidates if folder.is_dir()), candidates[0])
        #: video_name of each question left out by ``skip_missing_videos`` in the last :meth:`load`.
        self.missing_videos: list[str] = []

    def files(self) -> dict[str, Path]:
        """``questions`` (test_q.json), ``answers`` (test_a.json) and ``videos`` (the folder)."""
        def chosen(option: str, default: Path) -> Path:
            value = self.options[option]
            return Path(value) if value is not None else default

        return {
            "questions": chosen("question_file", self.root / "test_q.json"),
            "answers": chosen("answer_file", self.root / "test_a.json"),
            "videos": chosen("video_dir", self.root / self.video_folder),
        }

    def load(self) -> list[Sample]:
        """One :class:`Sample` per question: the question as prompt, the video file, the answer as reference.

        Raises
        ------
        BenchmarkDataError
            If a file is missing or malformed, the two files disagree (length or ``question_id`` at a position), a
            ``question_id`` repeats, or a video is missing (unless ``skip_missing_videos``).
        """
        files = self.files()
        question_path, answer_path, video_dir = files["questions"], files["answers"], files["videos"]
        questions = read_json(question_path, "a JSON list of {video_name, question_id, question}")
        answers = read_json(answer_path, "a JSON list of {answer, type, question_id}")
        for index, record in iter_records(questions, question_path, "{video_name, question_id, question} objects"):
            require_fields(record, QUESTION_FIELDS, question_path, f"record {index}")
        for index, record in iter_records(answers, answer_path, "{answer, type, question_id} objects"):
            require_fields(record, ANSWER_FIELDS, answer_path, f"record {index}")
        if len(questions) != len(answers):
            raise BenchmarkDataError(f"{question_path} has {len(questions)} questions but {answer_path} has "
                                     f"{len(answers)} answers; expected one answer per question, in the same order.")
        if not video_dir.is_dir():
            raise BenchmarkDataError(f"Missing folder {video_dir}: expected the videos named <video_name>"
                                     f"{'|'.join(VIDEO_EXTENSIONS)} of {question_path}.")
        # One listing of the folder instead of four stat calls per question (MSRVTT has 10k videos).
        present = {entry.name for entry in os.scandir(video_dir) if entry.is_file()}
        samples: list[Sample] = []
        seen: set[str] = set()
        self.missing_videos = []
        for index, (question, answer) in enumerate(zip(questions, answers)):
            question_id = str(question["question_id"])
            if str(answer["question_id"]) != question_id:
                raise BenchmarkDataError(f"{answer_path}, record {index}: question_id {answer['question_id']!r}, but "
                                         f"{question_path} record {index} has {question['question_id']!r}; expected "
                                         f"the answers in the order of the questions.")
            if question_id in seen:
                raise BenchmarkDataError(f"{question_path}, record {index}: question_id {question_id!r} repeats; "
                                         f"expected unique ids (predictions are keyed by them).")
            seen.add(question_id)
            name = question["video_name"]
            video = next((video_dir / f"{name}{ext}" for ext in VIDEO_EXTENSIONS if f"{name}{ext}" in present), None)
            if video is None:
                self.missing_videos.append(name)
                continue
            samples.append(Sample(
                question_id=question_id,
                prompt=question["question"],
                video=video,
                reference=str(answer["answer"]),
                meta={"video_name": name, "question": question["question"], "answer_type": answer.get("type"),
                      "num_frames": self.options["num_frames"]},
            ))
        if self.missing_videos and not self.options["skip_missing_videos"]:
            shown = ", ".join(repr(name) for name in self.missing_videos[:5])
            raise BenchmarkDataError(f"{len(self.missing_videos)} of {len(questions)} questions of {question_path} "
                                     f"have no video in {video_dir} (tried {', '.join(VIDEO_EXTENSIONS)}), e.g. "
                                     f"video_name {shown}; pass skip_missing_videos=True to leave them out.")
        return samples

    def frames(self, sample: Sample) -> np.ndarray:
        """The sample's ``num_frames`` uniformly sampled RGB frames, (num_frames, height, width, 3) uint8."""
        if sample.video is None:
            raise ValueError(f"Sample {sample.question_id!r} has no video.")
        return read_video_frames(sample.video, int(sample.meta.get("num_frames", self.options["num_frames"])))

    def score(self, predictions: Mapping[str, str], samples: Sequence[Sample], *,
              judge: Judge | None = None) -> dict[str, Any]:
        """Judge every prediction with Video-LLaVA's prompt and aggregate as ``eval_video_qa.py``.

        Returns
        -------
        dict
            ``score`` and ``accuracy``: % of judged questions the judge called correct (None when none was judged);
            ``mean_score``: mean judge score in [0, 5]; ``n``/``judged``: questions with a verdict; ``failed``:
            questions whose replies stayed malformed (with ``failed_question_ids``); ``questions``: all scored
            questions; ``yes``/``no``: verdict counts; ``judge``: the judge's name; ``by_type``: the same per
            answer ``type`` of test_a.json, where the file gives one.

        Raises
        ------
        ValueError
            If ``judge`` is None, or a sample has no prediction.
        TypeError
            If ``judge`` has no ``judge(question, answer, prediction)`` method.
        divico.evaluation.judge.JudgeConnectionError
            If the judge cannot be reached (the verdicts had so far stay in its cache).
        """
        if judge is None:
            raise ValueError(f"{self.name} is scored by an LLM judge (Video-LLaVA's yes/no + 0-5 prompt): pass "
                             f"judge=make_judge(...), on the command line --judge-url URL --judge-model NAME or "
                             f"--judge-local MODEL.")
        if not isinstance(judge, Judge):
            raise TypeError(f"judge must have a name and a judge(question, answer, prediction) method, got "
                            f"{type(judge).__name__}.")
        texts = self.require_predictions(predictions, samples)
        items = [(str(s.meta.get("question", s.prompt)), str(s.reference), text) for s, text in zip(samples, texts)]
        results = judge_all(judge, items, description=f"judging {self.name}")
        scores = _aggregate(list(zip(samples, results)))
        scores["judge"] = judge.name
        types = {s.meta.get("answer_type") for s in samples} - {None}
        if types:
            scores["by_type"] = {
                str(kind): {k: v for k, v in _aggregate([(s, r) for s, r in zip(samples, results)
                                                         if s.meta.get("answer_type") == kind]).items()
                            if k != "failed_question_ids"}
                for kind in sorted(types, key=str)
            }
        return scores


def _aggregate(judged: Sequence[tuple[Sample, Any]]) -> dict[str, Any]:
    verdicts = [result for _, result in judged if isinstance(result, JudgeVerdict)]
    failed = [sample.question_id for sample, result in judged if not isinstance(result, JudgeVerdict)]
    yes = sum(verdict.pred for verdict in verdicts)
    accuracy = 100.0 * yes / len(verdicts) if verdicts else None
    return {
        "score": accuracy,
        "accuracy": accuracy,
        "mean_score": sum(verdict.score for verdict in verdicts) / len(verdicts) if verdicts else None,
        "n": len(verdicts),
        "judged": len(verdicts),
        "failed": len(failed),
        "questions": len(judged),
        "yes": yes,
        "no": len(verdicts) - yes,
        "failed_question_ids": failed,
    }


@register_benchmark("msvd_qa")
class MSVDQA(VideoQABenchmark):
    """MSVD-QA (Video-LLaVA's ``MSVD_Zero_Shot_QA``)."""

    folder: ClassVar[str] = "GPT_Zero_Shot_QA/MSVD_Zero_Shot_QA"
    dataset_folder: ClassVar[str] = "MSVD_Zero_Shot_QA"
    video_folder: ClassVar[str] = "videos"


@register_benchmark("msrvtt_qa")
class MSRVTTQA(VideoQABenchmark):
    """MSRVTT-QA (Video-LLaVA's ``MSRVTT_Zero_Shot_QA``, videos in ``videos/all``)."""

    folder: ClassVar[str] = "GPT_Zero_Shot_QA/MSRVTT_Zero_Shot_QA"
    dataset_folder: ClassVar[str] = "MSRVTT_Zero_Shot_QA"
    video_folder: ClassVar[str] = "videos/all"


@register_benchmark("tgif_qa")
class TGIFQA(VideoQABenchmark):
    """TGIF-QA (Video-LLaVA's ``TGIF_Zero_Shot_QA``, videos in ``mp4``)."""

    folder: ClassVar[str] = "GPT_Zero_Shot_QA/TGIF_Zero_Shot_QA"
    dataset_folder: ClassVar[str] = "TGIF_Zero_Shot_QA"
    video_folder: ClassVar[str] = "mp4"
