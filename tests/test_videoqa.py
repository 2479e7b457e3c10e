"""Video QA in Video-LLaVA's format (MSVD-QA, MSRVTT-QA, TGIF-QA) judged by an LLM: loading, prompts, the judge's
prompt and reply parsing, retries, failures, the resumable cache and the scores, against a fake judge server."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_video import LAYOUT, RECORDS, SIZE, FakeJudgeServer, QARecord, write_clip, write_videoqa_dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from divico.evaluation import BenchmarkDataError, get_benchmark
from divico.evaluation.judge import (
    JudgeCache,
    JudgeConnectionError,
    JudgeFailedError,
    JudgeReplyError,
    JudgeVerdict,
    OpenAIChatJudge,
    TransformersJudge,
    make_judge,
    parse_verdict,
    video_qa_messages,
)

GOOD_YES_5 = "{'pred': 'yes', 'score': 5}"
GOOD_NO_1 = "{'pred': 'no', 'score': 1}"
GOOD_YES_3 = "{'pred': 'yes', 'score': 3}"
MALFORMED = "The predicted answer matches, I think."


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib would send 127.0.0.1 through a proxy configured in the environment.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


# -- loading ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(LAYOUT))
def test_load_reads_video_llava_layout(tmp_path: Path, name: str) -> None:
    folder = write_videoqa_dataset(tmp_path / "eval", name)
    dataset, videos = LAYOUT[name]
    cls = get_benchmark(name)
    assert (cls.modality, cls.needs_judge, cls.default_max_new_tokens) == ("video", True, 1024)
    # eval/, eval/GPT_Zero_Shot_QA and the dataset folder itself all find the files.
    for root in (tmp_path / "eval", tmp_path / "eval" / "GPT_Zero_Shot_QA", folder):
        samples = cls(root).load()
        assert [s.question_id for s in samples] == [r.question_id for r in RECORDS]
        # Video-LLaVA's prompt is the bare question after the video tokens.
        assert [s.prompt for s in samples] == [r.question for r in RECORDS]
        assert [s.reference for s in samples] == [r.answer for r in RECORDS]
        assert [s.video for s in samples] == [folder / videos / f"{r.video_name}.mp4" for r in RECORDS]
        assert samples[2].meta == {"video_name": "vid_blue", "question": "how many cats are there?",
                                   "answer_type": 7, "num_frames": 8}
    bench = cls(tmp_path / "eval", num_frames=4)
    frames = bench.frames(bench.load()[0])
    assert frames.shape == (4, SIZE, SIZE, 3) and frames.dtype == np.uint8
    # The fixture's frame t has red 30 * t; 4 of 8 frames sampled uniformly are frames 1, 3, 5, 7.
    assert np.allclose(frames[..., 0].mean(axis=(1, 2)), [30, 90, 150, 210], atol=8)


def test_video_extension_order_and_integer_ids(tmp_path: Path) -> None:
    records = [QARecord("a", 1, "q1?", "x"), QARecord("b", 2, "q2?", "y")]
    videos = write_videoqa_dataset(tmp_path, "msvd_qa", records, extension=".mkv") / "videos"
    write_clip(videos / "a.avi", 0)
    write_clip(videos / "a.mp4", 0)
    write_clip(videos / "b.avi", 0)
    (videos / "b.txt").write_text("not a video")
    samples = get_benchmark("msvd_qa")(tmp_path).load()
    # run_inference_video_qa.py tries .mp4, .avi, .mov, .mkv in that order.
    assert [s.video.name for s in samples] == ["a.mp4", "b.avi"]
    assert [s.question_id for s in samples] == ["1", "2"]


def test_malformed_files_are_clear_errors(tmp_path: Path) -> None:
    folder = write_videoqa_dataset(tmp_path, "tgif_qa")
    bench = get_benchmark("tgif_qa")(tmp_path)
    answers = json.loads((folder / "test_a.json").read_text())

    (folder / "test_a.json").write_text(json.dumps(answers[::-1]))
    with pytest.raises(BenchmarkDataError, match=r"test_a.json, record 0: question_id 'v_blue_1'"):
        bench.load()
    (folder / "test_a.json").write_text(json.dumps(answers[:3]))
    with pytest.raises(BenchmarkDataError, match="has 4 questions but .* has 3 answers"):
        bench.load()
    (folder / "test_a.json").write_text(json.dumps([{k: v for k, v in a.items() if k != "answer"} for a in answers]))
    with pytest.raises(BenchmarkDataError, match=r"test_a.json, record 0: missing field 'answer'"):
        bench.load()
    (folder / "test_a.json").unlink()
    with pytest.raises(BenchmarkDataError, match=r"Missing file .*test_a.json"):
        bench.load()
    (folder / "test_a.json").write_text(json.dumps(answers))
    (folder / "mp4" / "vid_red.mp4").unlink()
    with pytest.raises(BenchmarkDataError, match=r"2 of 4 questions .* no video .* 'vid_red', 'vid_red'"):
        bench.load()
    skipping = get_benchmark("tgif_qa")(tmp_path, skip_missing_videos=True)
    assert [s.question_id for s in skipping.load()] == ["v_blue_0", "v_blue_1"]
    assert skipping.missing_videos == ["vid_red", "vid_red"]
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1, got 0"):
        get_benchmark("tgif_qa")(tmp_path, num_frames=0)


# -- the judge's prompt and its reply --------------------------------------------------------------------------------

def test_judge_messages_are_video_llava_s() -> None:
    system, user = video_qa_messages("what is he doing?", "dance", "He is dancing.")
    assert system["role"] == "system" and user["role"] == "user"
    # eval_video_qa.py joins its string fragments without separators.
    assert "accomplish the task:------##INSTRUCTIONS: - Focus on the meaningful match" in system["content"]
    assert system["content"].endswith("- Evaluate the correctness of the prediction compared to the answer.")
    assert user["content"].startswith(
        "Please evaluate the following video-based question-answer pair:\n\nQuestion: what is he doing?\n"
        "Correct Answer: dance\nPredicted Answer: He is dancing.\n\nProvide your evaluation only as a yes/no")
    assert "value of 'pred' is  a string of 'yes' or 'no'" in user["content"]
    assert "not STRING.DO NOT PROVIDE" in user["content"]
    assert user["content"].endswith("For example, your response should look like this: "
                                    "{'pred': 'yes', 'score': 4.8}.")


@pytest.mark.parametrize("reply, pred, score", [
    ("{'pred': 'yes', 'score': 4}", True, 4),
    ("{'pred': 'no', 'score': 0}", False, 0),
    ("{'pred': 'yes', 'score': 4.8}", True, 4),          # int() truncates, as eval_video_qa.py
    ("{'pred': 'Yes', 'score': '5'}", True, 5),
    ('{"pred": "no", "score": 2}', False, 2),            # JSON
    ('{"pred": "not really", "score": 1, "ok": true}', False, 1),  # JSON's true; "no" in "not really"
    ("Sure! ```python\n{'pred': 'yes', 'score': 3}\n```", True, 3),
])
def test_parse_verdict_accepts(reply: str, pred: bool, score: int) -> None:
    assert parse_verdict(reply) == JudgeVerdict(pred, score)


@pytest.mark.parametrize("reply", [
    "", "yes", "{'pred': 'yes'}", "{'score': 3}", "{'pred': 'maybe', 'score': 3}", "{'pred': 1, 'score': 3}",
    "{'pred': 'yes', 'score': 6}", "{'pred': 'yes', 'score': -1}", "{'pred': 'yes', 'score': '4.8'}",
    "{'pred': 'yes', 'score': True}", "{'pred': 'yes', 'score': None}", "['yes', 4]",
    "{'pred': 'yes', 'score': __import__('os').getpid()}", "{" * 20_000,
])
def test_parse_verdict_rejects(reply: str) -> None:
    with pytest.raises(JudgeReplyError):
        parse_verdict(reply)


# -- scoring through a fake OpenAI-compatible server -----------------------------------------------------------------

PREDICTIONS = {"v_red_0": "It is red.", "v_red_1": "He is running.", "v_blue_0": "Two cats.", "v_blue_1": "A woman."}
CANNED = {
    "It is red.": [GOOD_YES_5],
    "He is running.": [GOOD_NO_1],
    "Two cats.": [MALFORMED, GOOD_YES_3],  # retried once, then well-formed
    "A woman.": [MALFORMED],                # malformed every time: failed
}


def test_score_with_fake_judge_retries_fails_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_videoqa_dataset(tmp_path, "msrvtt_qa")
    bench = get_benchmark("msrvtt_qa")(tmp_path)
    samples = bench.load()
    monkeypatch.setenv("TEST_JUDGE_KEY", "secret-123")
    cache = tmp_path / "judge_cache.jsonl"
    with FakeJudgeServer(CANNED) as server:
        judge = OpenAIChatJudge(server.url, "judge-13b", api_key_env="TEST_JUDGE_KEY", cache=cache, max_attempts=3,
                                backoff=0.0)
        scores = bench.score(PREDICTIONS, samples, judge=judge)
        # 1 + 1 + 2 (retry) + 3 (all malformed) requests.
        assert len(server.requests) == 7 and judge.requests_sent == 7
        first = server.requests[0]
        assert first["model"] == "judge-13b"
        assert first["messages"] == video_qa_messages("what color is the ball?", "red", "It is red.")
        assert server.headers[0]["Authorization"] == "Bearer secret-123"

        # Hand-computed: verdicts yes/5, no/1, yes/3; the fourth question failed and is not scored.
        assert scores["accuracy"] == scores["score"] == pytest.approx(100 * 2 / 3)
        assert scores["mean_score"] == pytest.approx((5 + 1 + 3) / 3)
        assert (scores["n"], scores["judged"], scores["failed"], scores["questions"]) == (3, 3, 1, 4)
        assert (scores["yes"], scores["no"], scores["failed_question_ids"]) == (2, 1, ["v_blue_1"])
        assert scores["judge"] == "judge-13b"
        assert scores["by_type"]["0"]["accuracy"] == 0.0 and scores["by_type"]["4"]["mean_score"] == 5.0
        assert scores["by_type"]["5"]["judged"] == 0 and scores["by_type"]["5"]["failed"] == 1

        records = [json.loads(line) for line in cache.read_text().splitlines()]
        assert [r["status"] for r in records] == ["judged", "judged", "judged", "failed"]
        assert records[2]["attempts"] == 2 and records[3]["replies"] == [MALFORMED] * 3

        # A rerun (new judge object, same cache file) sends nothing and scores the same.
        again = OpenAIChatJudge(server.url, "judge-13b", cache=cache, backoff=0.0, max_workers=3)
        assert bench.score(PREDICTIONS, samples, judge=again) == scores
        assert len(server.requests) == 7 and again.requests_sent == 0

        # Another judge model is another key: judged afresh, 4 questions in 3 threads.
        other = OpenAIChatJudge(server.url, "other-judge", cache=cache, backoff=0.0, max_workers=3)
        other_scores = bench.score(PREDICTIONS, samples, judge=other)
        # The canned queues stay on their last reply: three good ones in one request each, the last 3 x malformed.
        assert other.requests_sent == 6 and (other_scores["judged"], other_scores["failed"]) == (3, 1)
        # retry_failed asks the failed question again (its canned reply is still malformed).
        retry = make_judge(url=server.url, model="judge-13b", cache=JudgeCache(cache, retry_failed=True))
        assert bench.score(PREDICTIONS, samples, judge=retry)["failed"] == 1 and retry.requests_sent == 3


def test_score_needs_a_judge_and_every_prediction(tmp_path: Path) -> None:
    write_videoqa_dataset(tmp_path, "msvd_qa")
    bench = get_benchmark("msvd_qa")(tmp_path)
    samples = bench.load()
    with pytest.raises(ValueError, match="scored by an LLM judge.*--judge-url URL --judge-model NAME"):
        bench.score(PREDICTIONS, samples)
    with pytest.raises(TypeError, match="judge must have a name"):
        bench.score(PREDICTIONS, samples, judge=object())
    with pytest.raises(ValueError, match="1 of 4 questions have no prediction"):
        bench.score({k: v for k, v in PREDICTIONS.items() if k != "v_red_1"}, samples,
                    judge=OpenAIChatJudge("http://127.0.0.1:9", "j"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_transport_errors_are_retried_then_raised_and_never_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    with FakeJudgeServer({"p": [503, 429, GOOD_YES_5], "denied": [401]}) as server:
        judge = OpenAIChatJudge(server.url + "/chat/completions", "j", cache=cache, max_retries=2, backoff=0.0)
        assert judge.judge("q", "a", "p") == JudgeVerdict(True, 5)
        assert len(server.requests) == 3
        with pytest.raises(JudgeConnectionError, match=r"HTTP 401.*\$OPENAI_API_KEY"):
            judge.judge("q", "a", "denied")
        assert len(server.requests) == 4  # a 401 is not retried
    unreachable = OpenAIChatJudge(f"http://127.0.0.1:{_free_port()}", "j", cache=cache, max_retries=1, backoff=0.0,
                                  timeout=5)
    with pytest.raises(JudgeConnectionError, match="failed 2 time"):
        unreachable.judge("q", "a", "other")
    assert [json.loads(line)["prediction"] for line in cache.read_text().splitlines()] == ["p"]


def test_cache_survives_a_cut_off_line_and_rejects_a_corrupt_one(tmp_path: Path) -> None:
    cache_path = tmp_path / "cache.jsonl"
    key = JudgeCache.key("j", "q", "a", "p")
    good = {"key": key, "status": "judged", "pred": "yes", "score": 4, "reply": GOOD_YES_5}
    cache_path.write_text(json.dumps(good) + "\n" + '{"key": "abc", "sta')  # a kill mid-write
    cache = JudgeCache(cache_path)
    assert len(cache) == 1 and cache.get(key)["score"] == 4
    cache.put({"key": "k2", "status": "failed", "replies": ["x"]})
    # The cut-off remains are gone: two complete records.
    assert [json.loads(line)["key"] for line in cache_path.read_text().splitlines()] == [key, "k2"]
    assert JudgeCache(cache_path).get("k2")["status"] == "failed"
    assert JudgeCache(cache_path, retry_failed=True).get("k2") is None
    # A complete last record without its newline is kept, and the next one starts on its own line.
    cache_path.write_text(json.dumps(good))
    JudgeCache(cache_path).put({"key": "k3", "status": "failed", "replies": []})
    assert [json.loads(line)["key"] for line in cache_path.read_text().splitlines()] == [key, "k3"]
    cache_path.write_text("not json\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="cache.jsonl, line 1: not a JSON object"):
        JudgeCache(cache_path)
    cache_path.write_text(json.dumps({**good, "score": "4"}) + "\n")
    with pytest.raises(ValueError, match="line 1: a judged record needs 'pred'"):
        JudgeCache(cache_path)


def test_make_judge_choices(tmp_path: Path) -> None:
    assert make_judge() is None
    judge = make_judge(url="http://localhost:8000", model="m", cache=tmp_path / "c.jsonl")
    assert isinstance(judge, OpenAIChatJudge) and judge.endpoint == "http://localhost:8000/v1/chat/completions"
    assert judge.max_attempts == 3 and judge.cache.path == tmp_path / "c.jsonl"
    with pytest.raises(ValueError, match="needs both --judge-url and --judge-model"):
        make_judge(url="http://localhost:8000")
    with pytest.raises(ValueError, match="Choose one judge"):
        make_judge(url="http://x", model="m", local="some/model")
    with pytest.raises(ValueError, match="must start with http"):
        make_judge(url="localhost:8000", model="m")


# -- a local transformers judge -------------------------------------------------------------------------------------

def tiny_chat_llm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random 2-layer Llama and a word-level tokenizer with a chat template: its replies are word salad."""
    words = ["<pad>", "<unk>", "<s>", "</s>", "system", "user", "assistant", "the", "a", "is", "yes", "no", "dance"]
    vocab = {word: index for index, word in enumerate(words + [f"w{i}" for i in range(64 - len(words))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = ("{% for m in messages %}{{ m['role'] + ' ' + m['content'] + ' </s> ' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant ' }}{% endif %}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="</s>", chat_template=template)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, pad_token_id=0,
                         eos_token_id=3)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_transformers_judge_unparseable_reply_counts_as_failed(tmp_path: Path) -> None:
    model, tokenizer = tiny_chat_llm()
    judge = TransformersJudge((model, tokenizer), name="tiny-llama", max_new_tokens=6, cache=tmp_path / "c.jsonl")
    reply = judge.complete(video_qa_messages("q", "a", "p"))
    words = reply.split()
    assert 1 <= len(words) <= 6 and "{" not in reply and set(words) <= set(tokenizer.get_vocab())
    write_videoqa_dataset(tmp_path, "msvd_qa", RECORDS[:2])
    bench = get_benchmark("msvd_qa")(tmp_path)
    samples = bench.load()
    scores = bench.score({"v_red_0": "red", "v_red_1": "dance"}, samples, judge=judge)
    assert (scores["judged"], scores["failed"], scores["accuracy"], scores["mean_score"]) == (0, 2, None, None)
    assert judge.requests_sent == 2  # one greedy attempt per question (the direct complete() is not counted)
    # Cached failures: a rerun generates nothing.
    rerun = TransformersJudge((model, tokenizer), name="tiny-llama", cache=tmp_path / "c.jsonl")
    with pytest.raises(JudgeFailedError) as failure:
        rerun.judge("what color is the ball?", "red", "red")
    assert failure.value.cached and rerun.requests_sent == 0
