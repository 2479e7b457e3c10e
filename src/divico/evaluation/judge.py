"""LLM judges for open-ended video QA, with Video-LLaVA's judging prompt, retries and a resumable on-disk cache.

Video-LLaVA (``videollava/eval/video/eval_video_qa.py``) asks a chat model whether a predicted answer matches the
correct one and reads its reply, a Python dict string ``{'pred': 'yes', 'score': 4}``, with ``ast.literal_eval``;
accuracy is the share of ``'yes'`` and the score (0-5) is averaged. The paper judged with LLaVA-v1.5-13b.

Two judges ship here, both :class:`ChatJudge` subclasses (the prompt, parsing, retries and cache live there):

- :class:`OpenAIChatJudge`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (OpenAI, vLLM, SGLang,
  llama.cpp's server ...), through the standard library's ``urllib``.
- :class:`TransformersJudge`: a local transformers model, greedy, through its chat template.

Any object with a ``name`` and ``judge(question, answer, prediction) -> JudgeVerdict`` is a :class:`Judge`.

>>> judge = make_judge(url="http://localhost:8000/v1", model="llava-v1.5-13b", cache="out/judge_cache.jsonl")
>>> judge.judge("what is the man doing?", "dance", "The man is dancing.")
JudgeVerdict(pred=True, score=5, reply="{'pred': 'yes', 'score': 5}")

A reply that does not parse is asked again (``max_attempts`` in all); when every attempt is malformed the question
is recorded as failed (:class:`JudgeFailedError`) and counted apart by the scorer, never scored. Verdicts and
failures are appended to a JSON-lines cache keyed by a hash of the judge's model, the prompt, the question, the
answer and the prediction, so a rerun sends nothing already judged. An endpoint that cannot be reached raises
:class:`JudgeConnectionError` (after its own retries) and caches nothing, so the rerun asks again.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = [
    "VIDEO_QA_JUDGE_PROMPT",
    "ChatJudge",
    "Judge",
    "JudgeCache",
    "JudgeConnectionError",
    "JudgeFailedError",
    "JudgeReplyError",
    "JudgeVerdict",
    "OpenAIChatJudge",
    "TransformersJudge",
    "judge_all",
    "make_judge",
    "parse_verdict",
    "video_qa_messages",
]

#: Names the prompt in the cache key, so a changed prompt never reuses old verdicts.
VIDEO_QA_JUDGE_PROMPT = "video-llava-qa-v1"

# Video-LLaVA's system and user messages, verbatim (its fragments are joined without separators, hence the
# run-together "task:------##INSTRUCTIONS:" and the double space in "is  a string").
_SYSTEM_MESSAGE = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for "
    "question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match "
    "meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)
_USER_INSTRUCTION = (
    "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, with "
    "5 indicating the highest meaningful match. "
    "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where "
    "value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
    "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
    "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}."
)
#: Longest reply parsed: ``ast.literal_eval`` on a huge string costs memory and recursion, and no verdict is long.
_MAX_REPLY_CHARS = 10_000
MAX_SCORE = 5


class JudgeReplyError(ValueError):
    """A judge's reply is not a verdict dict (``{'pred': 'yes'|'no', 'score': 0..5}``)."""


class JudgeFailedError(RuntimeError):
    """Every attempt to get a verdict for one question gave a malformed reply; the question counts as failed.

    Attributes
    ----------
    replies
        The malformed replies, in order.
    cached
        True when the failure was read from the cache (no request sent).
    """

    def __init__(self, message: str, replies: Sequence[str] = (), cached: bool = False) -> None:
        super().__init__(message)
        self.replies = list(replies)
        self.cached = cached


class JudgeConnectionError(RuntimeError):
    """The judge's endpoint could not be reached or answered with an error, after the configured retries."""


@dataclass(frozen=True)
class JudgeVerdict:
    """One judged prediction.

    Attributes
    ----------
    pred
        The judge said the prediction matches the answer (``'yes'``).
    score
        The judge's match score, an integer in [0, 5].
    reply
        The judge's raw reply.
    """

    pred: bool
    score: int
    reply: str = field(default="", compare=False)


def video_qa_messages(question: str, answer: str, prediction: str) -> list[dict[str, str]]:
    """Video-LLaVA's judging conversation for one prediction: a system message and a user message."""
    user = (
        "Please evaluate the following video-based question-answer pair:\n\n"
        f"Question: {question}\n"
        f"Correct Answer: {answer}\n"
        f"Predicted Answer: {prediction}\n\n" + _USER_INSTRUCTION
    )
    return [{"role": "system", "content": _SYSTEM_MESSAGE}, {"role": "user", "content": user}]


def _literal(text: str) -> Any:
    """``text`` as a Python literal (Video-LLaVA's ``ast.literal_eval``, which evaluates no code) or as JSON."""
    for parse, errors in ((ast.literal_eval, (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)),
                          (json.loads, (json.JSONDecodeError, RecursionError))):  # JSON's true/false/null too
        try:
            return parse(text)
        except errors:
            continue
    return None


def _candidate_dicts(reply: str) -> list[str]:
    """The whole reply, then the text from its first "{" to its last "}" (a dict inside a sentence or code fence)."""
    text = reply.strip()
    candidates = [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end and text[start:end + 1] != text:
        candidates.append(text[start:end + 1])
    return candidates


def parse_verdict(reply: str) -> JudgeVerdict:
    """Read a judge's reply as Video-LLaVA does, safely.

    The reply (or the ``{...}`` inside it, or a fenced code block) must be a Python-literal or JSON dict with keys
    ``'pred'`` and ``'score'``. As in ``eval_video_qa.py``: ``pred`` is yes when its lower-cased text contains
    ``"yes"``, else no when it contains ``"no"``; ``score`` is ``int(score)`` (so ``4.8`` -> 4, ``"4"`` -> 4).

    Parameters
    ----------
    reply
        The judge's raw reply.

    Returns
    -------
    JudgeVerdict

    Raises
    ------
    JudgeReplyError
        If no dict with both keys is found, ``pred`` contains neither "yes" nor "no" (Video-LLaVA leaves such a
        verdict out of the accuracy but adds its score; here it is malformed), or ``score`` is not a number in
        [0, 5].
    """
    if not isinstance(reply, str):
        raise JudgeReplyError(f"The judge's reply should be text, got {type(reply).__name__}.")
    if len(reply) > _MAX_REPLY_CHARS:
        raise JudgeReplyError(f"The judge's reply is {len(reply)} characters long; a verdict dict is short "
                              f"(at most {_MAX_REPLY_CHARS} characters parsed).")
    verdict = None
    for candidate in _candidate_dicts(reply):
        value = _literal(candidate)
        if isinstance(value, dict):
            verdict = value
            break
    if verdict is None:
        raise JudgeReplyError(f"The judge's reply is not a dict like {{'pred': 'yes', 'score': 4}}: {reply[:200]!r}.")
    if "pred" not in verdict or "score" not in verdict:
        raise JudgeReplyError(f"The judge's dict needs keys 'pred' and 'score', got keys {sorted(map(str, verdict))}.")
    pred = verdict["pred"]
    if not isinstance(pred, str):
        raise JudgeReplyError(f"The judge's 'pred' should be the string 'yes' or 'no', got {pred!r}.")
    if "yes" in pred.lower():
        matched = True
    elif "no" in pred.lower():
        matched = False
    else:
        raise JudgeReplyError(f"The judge's 'pred' should be 'yes' or 'no', got {pred!r}.")
    raw_score = verdict["score"]
    # Video-LLaVA's int(): 4.8 -> 4 and "4" -> 4, but "4.8" fails.
    number_like = isinstance(raw_score, (int, str)) or (isinstance(raw_score, float) and math.isfinite(raw_score))
    try:
        if isinstance(raw_score, bool) or not number_like:
            raise TypeError
        score = int(raw_score)
    except (TypeError, ValueError):
        raise JudgeReplyError(f"The judge's 'score' should be an integer in [0, {MAX_SCORE}], got {raw_score!r}.") \
            from None
    if not 0 <= score <= MAX_SCORE:
        raise JudgeReplyError(f"The judge's 'score' should be in [0, {MAX_SCORE}], got {raw_score!r}.")
    return JudgeVerdict(pred=matched, score=score, reply=reply)


@runtime_checkable
class Judge(Protocol):
    """What the video-QA scorers need: a name (it keys the cache) and one verdict per (question, answer, prediction).

    ``judge`` raises :class:`JudgeFailedError` when no well-formed verdict could be had (the question counts as
    failed) and :class:`JudgeConnectionError` when the judge is unreachable (scoring stops; nothing is lost).
    """

    name: str

    def judge(self, question: str, answer: str, prediction: str) -> JudgeVerdict:
        ...


class JudgeCache:
    """Verdicts and failures on disk, one JSON object per line, keyed by a hash of judge, prompt and texts.

    A line is appended (and flushed) as soon as a question is judged, so a killed run loses at most the line being
    written; an incomplete last line is ignored when the file is read again, and cut off before the next write. A
    later line for the same key wins.

    Parameters
    ----------
    path
        The JSON-lines file (created with its folder on the first write).
    retry_failed
        Ask again the questions recorded as failed (default: a failure is final, and a rerun sends nothing).

    Raises
    ------
    ValueError
        If a complete line of an existing file is not a cache record (naming the file and line).
    """

    def __init__(self, path: Path | str, *, retry_failed: bool = False) -> None:
        self.path = Path(path)
        self.retry_failed = retry_failed
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        # A last line without its newline: kept and ended when complete, cut off before the next write when it is
        # the remains of a write a kill interrupted (so the file stays one record per line).
        self._needs_newline = False
        self._truncate_to: int | None = None
        if self.path.exists():
            self._read()

    @staticmethod
    def key(judge_name: str, question: str, answer: str, prediction: str) -> str:
        """SHA-256 hex digest of the judge's name, the prompt id and the three texts."""
        payload = json.dumps([judge_name, VIDEO_QA_JUDGE_PROMPT, question, answer, prediction], ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def _read(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            last = number == len(lines)  # no newline after it
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if last:  # the write was cut off by a kill
                    self._truncate_to = len(text.encode("utf-8")) - len(line.encode("utf-8"))
                    continue
                raise ValueError(f"{self.path}, line {number}: not a JSON object; expected a judge cache record "
                                 f"(delete the line or the file to judge again).") from None
            if not isinstance(record, dict) or not isinstance(record.get("key"), str) \
                    or record.get("status") not in ("judged", "failed"):
                raise ValueError(f"{self.path}, line {number}: expected a judge cache record with 'key' and "
                                 f"'status' ('judged' or 'failed'), got {line[:120]!r}.")
            if record["status"] == "judged" and (record.get("pred") not in ("yes", "no")
                                                 or isinstance(record.get("score"), bool)
                                                 or not isinstance(record.get("score"), int)):
                raise ValueError(f"{self.path}, line {number}: a judged record needs 'pred' ('yes' or 'no') and an "
                                 f"integer 'score', got {line[:120]!r}.")
            self._records[record["key"]] = record
            self._needs_newline = last

    def get(self, key: str) -> dict[str, Any] | None:
        """The record under ``key``, or None (also for a failure when ``retry_failed``)."""
        record = self._records.get(key)
        if record is not None and record["status"] == "failed" and self.retry_failed:
            return None
        return record

    def put(self, record: dict[str, Any]) -> None:
        """Append ``record`` (a dict with ``key`` and ``status``) to the file and remember it."""
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._truncate_to is not None:
                with self.path.open("r+b") as handle:
                    handle.truncate(self._truncate_to)
                self._truncate_to = None
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(("\n" if self._needs_newline else "") + line + "\n")
                handle.flush()
            self._needs_newline = False
            self._records[record["key"]] = record

    def __len__(self) -> int:
        return len(self._records)


class ChatJudge(ABC):
    """A chat model as judge: Video-LLaVA's prompt, reply parsing, retries of malformed replies and the cache.

    Subclasses implement :meth:`complete` (one reply to a list of chat messages).

    Parameters
    ----------
    name
        The judge's model name; part of the cache key.
    max_attempts
        Replies asked for one question before it is recorded as failed, >= 1.
    cache
        A :class:`JudgeCache`, a path for one, or None (no cache).
    max_workers
        Questions judged at once by :func:`judge_all` (threads), >= 1.
    """

    def __init__(self, name: str, *, max_attempts: int = 3, cache: JudgeCache | Path | str | None = None,
                 max_workers: int = 1) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"A judge needs a non-empty model name, got {name!r}.")
        _check_positive_int("max_attempts", max_attempts)
        _check_positive_int("max_workers", max_workers)
        self.name = name
        self.max_attempts = max_attempts
        self.max_workers = max_workers
        self.cache = cache if isinstance(cache, JudgeCache) or cache is None else JudgeCache(cache)
        self._counter_lock = threading.Lock()
        #: Replies requested from the model by this object (cache hits send none).
        self.requests_sent = 0

    @abstractmethod
    def complete(self, messages: list[dict[str, str]]) -> str:
        """The model's reply to ``messages`` (``[{"role": ..., "content": ...}, ...]``)."""

    def judge(self, question: str, answer: str, prediction: str) -> JudgeVerdict:
        """Video-LLaVA's verdict on ``prediction`` for ``question`` whose correct answer is ``answer``.

        Raises
        ------
        JudgeFailedError
            If all ``max_attempts`` replies were malformed (now or in the cache).
        JudgeConnectionError
            If the model could not be reached (nothing is cached).
        """
        question, answer, prediction = str(question), str(answer), str(prediction)
        key = JudgeCache.key(self.name, question, answer, prediction)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            if cached["status"] == "failed":
                replies = cached.get("replies", [])
                raise JudgeFailedError(f"Judge {self.name} gave no well-formed verdict in {len(replies)} attempt(s) "
                                       f"(cached).", replies, cached=True)
            return JudgeVerdict(pred=cached["pred"] == "yes", score=cached["score"], reply=cached.get("reply", ""))
        messages = video_qa_messages(question, answer, prediction)
        replies: list[str] = []
        verdict = None
        for _ in range(self.max_attempts):
            with self._counter_lock:
                self.requests_sent += 1
            reply = self.complete(messages)
            replies.append(reply)
            try:
                verdict = parse_verdict(reply)
                break
            except JudgeReplyError:
                continue
        record: dict[str, Any] = {"key": key, "judge": self.name, "prompt": VIDEO_QA_JUDGE_PROMPT,
                                  "question": question, "answer": answer, "prediction": prediction}
        if verdict is None:
            record.update(status="failed", replies=replies)
        else:
            record.update(status="judged", pred="yes" if verdict.pred else "no", score=verdict.score,
                          reply=verdict.reply, attempts=len(replies))
        if self.cache is not None:
            self.cache.put(record)
        if verdict is None:
            raise JudgeFailedError(f"Judge {self.name} gave no well-formed verdict in {len(replies)} attempt(s); "
                                   f"last reply {replies[-1][:200]!r}.", replies)
        return verdict


class OpenAIChatJudge(ChatJudge):
    """A judge behind an OpenAI-compatible chat-completions endpoint, called with ``urllib``.

    Parameters
    ----------
    url
        The endpoint: a base such as ``http://localhost:8000`` or ``https://api.openai.com/v1``, or the full
        ``.../v1/chat/completions`` URL.
    model
        The model name sent in each request (and the cache key).
    api_key_env
        Environment variable holding the API key, sent as ``Authorization: Bearer``; unset or empty sends none
        (local servers need none).
    timeout
        Seconds to wait for one response, > 0.
    max_retries
        Extra tries after a network error, a timeout, HTTP 408/409/429/5xx or a response without a reply, >= 0.
    backoff
        Seconds before the first retry, doubled for each further one, >= 0.
    temperature
        Sampling temperature sent, or None for the server's default (as Video-LLaVA, whose retries then differ).
    max_tokens
        Reply length limit sent, or None for the server's default.
    max_attempts, cache, max_workers
        As :class:`ChatJudge` (``max_workers`` requests in flight at once).
    """

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 5, backoff: float = 1.0, temperature: float | None = None,
                 max_tokens: int | None = None, max_attempts: int = 3, cache: JudgeCache | Path | str | None = None,
                 max_workers: int = 1) -> None:
        super().__init__(model, max_attempts=max_attempts, cache=cache, max_workers=max_workers)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"The judge URL must start with http:// or https://, got {url!r}.")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}.")
        if not backoff >= 0:
            raise ValueError(f"backoff must be >= 0 seconds, got {backoff!r}.")
        if max_tokens is not None:
            _check_positive_int("max_tokens", max_tokens)
        base = url.rstrip("/")
        if base.endswith("/chat/completions"):
            self.endpoint = base
        elif base.endswith("/v1"):
            self.endpoint = base + "/chat/completions"
        else:
            self.endpoint = base + "/v1/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.temperature = temperature
        self.max_tokens = max_tokens

    def complete(self, messages: list[dict[str, str]]) -> str:
        """One reply from the endpoint.

        Raises
        ------
        JudgeConnectionError
            After ``max_retries`` retries of transient failures, or at once on another HTTP error (401, 404 ...).
        """
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        data = json.dumps(body).encode("utf-8")
        problem = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:300]
                problem = f"HTTP {error.code} {error.reason}: {detail}"
                if error.code in (408, 409, 429) or error.code >= 500:
                    continue
                hint = f" (is ${self.api_key_env} set?)" if error.code in (401, 403) else ""
                raise JudgeConnectionError(f"Judge endpoint {self.endpoint} answered {problem}{hint}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                problem = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
                continue
            except (json.JSONDecodeError, UnicodeDecodeError):
                problem = "a response that is not JSON"
                continue
            try:
                content = payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                problem = f"a response without choices[0].message.content: {json.dumps(payload)[:300]}"
                continue
            # A refusal or a tool call has no text: a malformed verdict, which the caller retries.
            return content if isinstance(content, str) else ""
        raise JudgeConnectionError(f"Judge endpoint {self.endpoint} failed {self.max_retries + 1} time(s); last: "
                                   f"{problem}.")


class TransformersJudge(ChatJudge):
    """A local transformers model as judge: its chat template, greedy decoding.

    Greedy decoding repeats itself, so a malformed reply would be repeated too: ``max_attempts`` defaults to 1.

    Parameters
    ----------
    model
        A hub id or local folder (a causal LM, or an image-text-to-text model such as ``llava-hf/llava-1.5-13b-hf``
        used on text alone, the paper's judge), or a ``(model, tokenizer_or_processor)`` pair already loaded.
    name
        The cache key's model name (default: the id or folder, or the model's ``name_or_path``).
    device, dtype
        Where and in what precision to load a model given by name (``dtype``: ``"auto"`` or a torch dtype).
    max_new_tokens
        Reply length limit, >= 1 (a verdict dict is ~15 tokens).
    max_attempts, cache
        As :class:`ChatJudge`.

    Raises
    ------
    ValueError
        If the tokenizer or processor has no chat template.
    """

    def __init__(self, model: str | Path | tuple[PreTrainedModel, Any], *, name: str | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype = "auto",
                 max_new_tokens: int = 64, max_attempts: int = 1,
                 cache: JudgeCache | Path | str | None = None) -> None:
        _check_positive_int("max_new_tokens", max_new_tokens)
        if isinstance(model, tuple):
            if len(model) != 2:
                raise ValueError(f"Pass the judge as a model id or a (model, tokenizer) pair, got {len(model)} items.")
            self.model, self.tokenizer = model
            default_name = str(getattr(self.model, "name_or_path", "") or type(self.model).__name__)
        else:
            self.model, self.tokenizer = _load_judge_model(str(model), dtype)
            default_name = str(model)
            if device is not None:
                self.model = self.model.to(device)
        super().__init__(name or default_name, max_attempts=max_attempts, cache=cache, max_workers=1)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"The judge's tokenizer/processor ({type(self.tokenizer).__name__}) has no chat "
                             f"template; pass a chat model.")
        self.model.eval()
        self.max_new_tokens = max_new_tokens
        # A processor wants each message's content as typed parts; a tokenizer takes the text itself.
        self._typed_content = isinstance(self.tokenizer, ProcessorMixin)

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The model's greedy reply, special tokens removed, stripped."""
        if self._typed_content:
            messages = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.inference_mode():
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=pad_id)
        new_tokens = output[0, inputs["input_ids"].shape[1]:]
        return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _load_judge_model(name: str, dtype: str | torch.dtype) -> tuple[PreTrainedModel, Any]:
    config = AutoConfig.from_pretrained(name)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype), AutoTokenizer.from_pretrained(name)
    # Vision-language models (LLaVA-1.5, the paper's judge) are not causal-LM classes; they judge on text alone.
    return AutoModelForImageTextToText.from_pretrained(name, dtype=dtype), AutoProcessor.from_pretrained(name)


def judge_all(judge: Judge, items: Sequence[tuple[str, str, str]], *, max_workers: int | None = None,
              progress: bool | None = None, description: str = "judging") -> list[JudgeVerdict | JudgeFailedError]:
    """Judge many (question, answer, prediction) triples, in order.

    Parameters
    ----------
    judge
        Any :class:`Judge`.
    items
        (question, correct answer, prediction) per question.
    max_workers
        Threads judging at once (default: the judge's ``max_workers`` attribute, else 1).
    progress
        Show a progress bar (None: only on a terminal).
    description
        The progress bar's label.

    Returns
    -------
    list
        Per item, its :class:`JudgeVerdict` or the :class:`JudgeFailedError` that recorded it as failed.

    Raises
    ------
    JudgeConnectionError
        If the judge cannot be reached; the verdicts already had stay in the judge's cache.
    """
    workers = max_workers if max_workers is not None else int(getattr(judge, "max_workers", 1))
    _check_positive_int("max_workers", workers)

    def one(item: tuple[str, str, str]) -> JudgeVerdict | JudgeFailedError:
        try:
            return judge.judge(*item)
        except JudgeFailedError as failure:
            return failure

    bar = tqdm(total=len(items), desc=description, disable=None if progress is None else not progress)
    results: list[JudgeVerdict | JudgeFailedError] = []
    try:
        if workers == 1:
            for item in items:
                results.append(one(item))
                bar.update()
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(one, items):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
    return results


def make_judge(url: str | None = None, model: str | None = None, local: str | Path | None = None,
               cache: JudgeCache | Path | str | None = None, *, api_key_env: str = "OPENAI_API_KEY",
               max_attempts: int | None = None, max_workers: int = 1, timeout: float = 60.0,
               device: str | torch.device | None = None, dtype: str | torch.dtype = "auto",
               retry_failed: bool = False) -> ChatJudge | None:
    """The judge the command line asks for (``--judge-url``/``--judge-model`` or ``--judge-local``), or None.

    Parameters
    ----------
    url, model
        An OpenAI-compatible endpoint and the model name to request (:class:`OpenAIChatJudge`); both or neither.
    local
        A hub id or folder of a local chat model (:class:`TransformersJudge`); not with ``url``/``model``.
    cache
        The JSON-lines verdict cache (a path or :class:`JudgeCache`), or None for none. One file can serve every
        benchmark and run: the key covers the judge, the question, the answer and the prediction.
    api_key_env, timeout, max_workers
        For an endpoint judge (see :class:`OpenAIChatJudge`).
    max_attempts
        Replies asked per question before it counts as failed (default 3 for an endpoint, 1 for a greedy local
        model).
    device, dtype
        For a local judge.
    retry_failed
        Ask again the questions the cache records as failed.

    Raises
    ------
    ValueError
        If ``url`` comes without ``model`` (or the reverse), or with ``local``.
    """
    if local is not None and (url is not None or model is not None):
        raise ValueError("Choose one judge: --judge-local MODEL, or --judge-url URL with --judge-model NAME; "
                         f"got local={local!r}, url={url!r}, model={model!r}.")
    if (url is None) != (model is None):
        raise ValueError(f"An endpoint judge needs both --judge-url and --judge-model; got url={url!r}, "
                         f"model={model!r}.")
    if isinstance(cache, (str, Path)):
        cache = JudgeCache(cache, retry_failed=retry_failed)
    if url is not None and model is not None:
        return OpenAIChatJudge(url, model, api_key_env=api_key_env, timeout=timeout, cache=cache,
                               max_attempts=3 if max_attempts is None else max_attempts, max_workers=max_workers)
    if local is not None:
        return TransformersJudge(local, device=device, dtype=dtype, cache=cache,
                                 max_attempts=1 if max_attempts is None else max_attempts)
    return None


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")

