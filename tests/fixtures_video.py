"""Tiny video-QA data in Video-LLaVA's layout and a fake OpenAI-compatible judge server, for tests.

``write_videoqa_dataset(root, "msvd_qa", RECORDS)`` writes ``root/GPT_Zero_Shot_QA/MSVD_Zero_Shot_QA/{test_q.json,
test_a.json, videos/*.mp4}`` (8-frame 16x16 clips, a few KB each). ``FakeJudgeServer`` answers
``POST /v1/chat/completions`` on 127.0.0.1 with canned replies chosen by the predicted answer in the prompt.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from divico.video import write_video_frames

#: Video-LLaVA's folders per benchmark (scripts/v1_5/eval/run_qa_{msvd,msrvtt,tgif}.sh).
LAYOUT = {
    "msvd_qa": ("MSVD_Zero_Shot_QA", "videos"),
    "msrvtt_qa": ("MSRVTT_Zero_Shot_QA", "videos/all"),
    "tgif_qa": ("TGIF_Zero_Shot_QA", "mp4"),
}
FRAMES, SIZE = 8, 16


@dataclass(frozen=True)
class QARecord:
    video_name: str
    question_id: str | int
    question: str
    answer: str
    type: int | str = 0


RECORDS = (
    QARecord("vid_red", "v_red_0", "what color is the ball?", "red", 4),
    QARecord("vid_red", "v_red_1", "what is the man doing?", "dance", 0),
    QARecord("vid_blue", "v_blue_0", "how many cats are there?", "two", 7),
    QARecord("vid_blue", "v_blue_1", "who is talking?", "woman", 5),
)


def write_clip(path: Path, seed: int) -> Path:
    """An 8-frame 16x16 clip whose frames are flat colours (frame t has red channel 30 * t)."""
    rng = np.random.default_rng(seed)
    frames = np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8)
    frames[..., 0] = (30 * np.arange(FRAMES, dtype=np.uint8))[:, None, None]
    frames[..., 1:] = rng.integers(0, 255, size=2, dtype=np.uint8)
    return write_video_frames(path, frames)


def write_videoqa_dataset(root: Path, benchmark: str, records: Sequence[QARecord] = RECORDS,
                          extension: str = ".mp4") -> Path:
    """Write ``records`` in Video-LLaVA's layout under ``root`` (its ``eval`` folder); returns the dataset folder."""
    dataset, videos = LAYOUT[benchmark]
    folder = root / "GPT_Zero_Shot_QA" / dataset
    (folder / videos).mkdir(parents=True, exist_ok=True)
    questions = [{"video_name": r.video_name, "question_id": r.question_id, "question": r.question} for r in records]
    answers = [{"answer": r.answer, "type": r.type, "question_id": r.question_id} for r in records]
    (folder / "test_q.json").write_text(json.dumps(questions))
    (folder / "test_a.json").write_text(json.dumps(answers))
    for seed, name in enumerate(sorted({r.video_name for r in records})):
        write_clip(folder / videos / f"{name}{extension}", seed)
    return folder


_PREDICTED = re.compile(r"Predicted Answer: (.*?)\n\n", re.S)


class FakeJudgeServer:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 with canned replies, in a thread.

    Parameters
    ----------
    replies
        Predicted answer -> the successive replies for it (the last one repeats). An ``int`` reply is sent as that
        HTTP status with an error body instead.
    default
        Reply for a prediction not in ``replies``.

    Attributes
    ----------
    requests
        Every request body received (parsed JSON), in order; ``headers`` the matching request headers.
    url
        ``http://127.0.0.1:<port>/v1``.
    """

    def __init__(self, replies: dict[str, Sequence[str | int]], default: str = "{'pred': 'no', 'score': 0}") -> None:
        self.replies = {key: list(value) for key, value in replies.items()}
        self.default = default
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._served: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _next_reply(self, body: dict[str, Any]) -> str | int:
        match = _PREDICTED.search(body["messages"][-1]["content"])
        prediction = match.group(1) if match else ""
        with self._lock:
            self.requests.append(body)
            queue = self.replies.get(prediction)
            if not queue:
                return self.default
            index = self._served.get(prediction, 0)
            self._served[prediction] = index + 1
            return queue[min(index, len(queue) - 1)]

    def _handler(self) -> Callable[..., BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                with server._lock:
                    server.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                reply = server._next_reply(body)
                if isinstance(reply, int):
                    return self._send(reply, {"error": {"message": "canned failure"}})
                self._send(200, {"id": "x", "object": "chat.completion", "model": body.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": reply}}]})

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        return Handler

    def __enter__(self) -> FakeJudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
