"""The ``orpo-distill teacher`` command against a flaky OpenAI-compatible server (tests/fake_openai_server.py,
real sockets on 127.0.0.1).

tests/test_openai_generator.py already proves, on the generator alone, that each of these faults is retried
and then succeeds: 500, 502, 503, 408, 429 without Retry-After, malformed and truncated-JSON bodies, wrong
shapes, an empty choice list, connection resets and closes, timeouts; that Retry-After is honoured and
capped, that 4xx are not retried, that a request gives up after max_retries. What it does not cover, and
this file does, through the whole command and the trace store: every fault in one run with no key lost or
doubled; 429 with a Retry-After (seconds and HTTP-date forms); a body cut short of its Content-Length; an
empty or null content and a reply with no final answer (stored as parse failures, not retried, not a crash);
and a question whose server never recovers (logged, then fetched by the rerun, and only it).
"""

from __future__ import annotations

import re
import threading
import zlib
from pathlib import Path
from typing import Any

from fake_openai_server import Drop, EmptyChoices, FakeOpenAIServer, Good, Malformed, Received, Slow, Status, Truncated
from orpo_distill import cli
from orpo_distill.store import read_jsonl

from .common import check_store, write_yaml

# faults that fail the first attempt at a question; the retry gets a good answer
TRANSIENT = [
    Status(429, retry_after="0"), Status(429, retry_after="1"), Status(429, retry_after="Wed, 21 Oct 2015 07:28:00 GMT"),
    Status(429), Status(500), Status(502), Status(503), Status(408), Slow(5.0), Drop(reset=True), Drop(reset=False),
    Malformed(), Malformed("not json at all"), Malformed('{"choices": "nope"}'), EmptyChoices(), Truncated(keep=40),
]
# answers that are final: stored as they are (parse failures), never retried
NO_ANSWER = "Let me think about the options step by step. I am not sure."
ANSWERS = [Good(content_none=True), Good(texts=[""] * 8), Good(texts=[NO_ANSWER] * 8)]
K = 2


def reply(prompt: str, seed: int) -> str:
    h = zlib.crc32(f"{prompt}|{seed}".encode())
    return f"Working {h:08x}.\nThe answer is ({'ABCD'[h % 4]})."


class FlakyTeacher:
    """Question i (in order of first arrival) meets TRANSIENT[i] on its first attempt, or gets ANSWERS[j]
    for good; the others, and every retry, get a seeded good reply. ``dead`` prompts always fail (503)."""

    def __init__(self) -> None:
        self.plan: dict[str, Any] = {}
        self.attempts: dict[str, int] = {}
        self.dead: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, rec: Received) -> Any:
        p = rec.prompt
        with self.lock:
            self.attempts[p] = self.attempts.get(p, 0) + 1
            if p not in self.plan:
                i = len(self.plan)
                self.plan[p] = (TRANSIENT + ANSWERS)[i] if i < len(TRANSIENT) + len(ANSWERS) else None
            action, first = self.plan[p], self.attempts[p] == 1
        if p in self.dead:
            return Status(503)
        if isinstance(action, Good):
            return action
        if action is not None and first:
            return action
        body = rec.body or {}
        return Good(texts=[reply(p, int(body["seed"]) + i) for i in range(int(body["n"]))])


def teacher_yaml(tmp: Path, server: FakeOpenAIServer, model: Path, questions: int, max_retries: int = 6,
                 concurrency: int = 4) -> Path:
    from conftest import tiny_config_dict

    data = tiny_config_dict(tmp / "run", model)
    data["dataset"]["train_size"] = questions
    data["teacher"] = {"kind": "openai", "base_url": server.base_url, "model": "teacher-x",
                       "max_concurrency": concurrency, "timeout": 0.5, "max_retries": max_retries,
                       "backoff_base": 0.01, "backoff_max": 0.05,
                       "sampling": {"samples": K, "temperature": 1.0, "max_tokens": 64}}
    return write_yaml(data, tmp / "teacher.yaml")


def summary_value(out: str, row: str) -> int:
    m = re.search(rf"{row}\s*│\s*(\d+)", out)
    assert m, out
    return int(m.group(1))


def test_every_server_fault_in_one_teacher_run_loses_and_doubles_nothing(
        tmp_path: Path, tiny_model_dir: Path, capsys: Any) -> None:
    questions = len(TRANSIENT) + len(ANSWERS) + 5
    with FakeOpenAIServer(FlakyTeacher()) as server:
        config = teacher_yaml(tmp_path, server, tiny_model_dir, questions)
        assert cli.main(["teacher", str(config), "--no-progress"]) == 0
        received = len(server.received)
    out = capsys.readouterr().out
    store = tmp_path / "run" / "teacher" / "traces.jsonl"
    rows = check_store(store, [(f"syn-{q:06d}", s) for q in range(questions) for s in range(K)])
    assert not store.with_name("traces.failures.jsonl").exists(), "a transient fault was logged as a failure"
    assert received == questions + len(TRANSIENT)  # one retry per transient fault, no more
    assert summary_value(out, "failed requests") == 0

    good = [r for r in rows if r["text"].startswith("Working ")]
    assert len(good) == (questions - len(ANSWERS)) * K and all(r["answer"] in "ABCD" for r in good)
    empty = [r for r in rows if r["text"] == ""]  # null content and "" content
    assert len(empty) == 2 * K and all(r["answer"] is None and not r["correct"] for r in empty)
    unanswered = [r for r in rows if r["text"] == NO_ANSWER]
    assert len(unanswered) == K and all(r["answer"] is None and not r["correct"] for r in unanswered)
    assert summary_value(out, "parse failures") == 3 * K


def test_a_server_that_never_recovers_fails_the_request_and_the_rerun_fetches_only_it(
        tmp_path: Path, tiny_model_dir: Path, capsys: Any) -> None:
    questions = 6
    dead: dict[str, str] = {}

    def first_question_dead(rec: Received) -> Any:
        dead.setdefault("prompt", rec.prompt)  # one request at a time: the first prompt is the first question's
        if rec.prompt == dead["prompt"]:
            return Status(503)
        body = rec.body or {}
        return Good(texts=[reply(rec.prompt, int(body["seed"]) + i) for i in range(int(body["n"]))])

    with FakeOpenAIServer(first_question_dead) as server:
        config = teacher_yaml(tmp_path, server, tiny_model_dir, questions, max_retries=2, concurrency=1)
        # a failed request fails the stage (teacher.max_failed_share 0), after storing what arrived
        assert cli.main(["teacher", str(config), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "teacher: 1 of 6 requests failed for good, so 2 teacher traces are missing (10 stored)" in err
        assert "Rerun the same command to ask again for the missing ones only" in err, err
        store = tmp_path / "run" / "teacher" / "traces.jsonl"
        assert len(check_store(store)) == (questions - 1) * K
        failures = list(read_jsonl(store.with_name("traces.failures.jsonl")))
        assert len(failures) == K and {f["id"] for f in failures} == {"syn-000000"}
        assert all("gave up after 3 attempts" in f["error"] and "HTTP 503" in f["error"] for f in failures)

        server.responder = None  # healthy again
        asked = len(server.received)
        assert cli.main(["teacher", str(config), "--no-progress"]) == 0
        rerun = server.received[asked:]
    assert len(rerun) == 1 and rerun[0].body["n"] == K  # only the missing question was asked for
    check_store(store, [(f"syn-{q:06d}", s) for q in range(questions) for s in range(K)])
