"""The OpenAI-compatible teacher against a real server nobody here wrote: llama.cpp's, from the PyPI
package ``llama-cpp-python[server]``, serving the embedded SmolLM2-135M-Instruct GGUF on CPU.

The fake server (``fake_openai_server.py``) scripts every fault; this file checks that what it scripts
matches a real server, and that the teacher stage survives the real server dying mid-stage:

- the chat and the completions endpoint each fill ``teacher/traces.jsonl`` with text, extracted answer
  and correctness for every (question, sample) key;
- llama.cpp's server ignores ``n`` (one choice per call): K samples per question still arrive, by top-up
  calls, each with its own seed;
- ``stop`` sequences are honoured: the text ends right before the first stop string;
- the server SIGKILLed mid-stage and restarted on the same port: a stage with few retries counts the
  failed requests (metrics, ``failures.jsonl``) and exits 2 naming them, and its rerun asks only for what
  is missing (a server that answered once is never taken for an unreachable one); a stage
  with enough retries rides out the restart; either way every key is stored exactly once.

``make test`` installs the server (a source build of llama.cpp, minutes on two cores, then pip's wheel
cache). Where that build failed, the Makefile leaves ``.venv/llama-server-install.failed`` and every
test here is skipped with its reason; it never passes silently.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fake_openai_server import free_port
from orpo_distill import cli
from orpo_distill.config import generator_config, load_config
from orpo_distill.generators.base import Request
from orpo_distill.generators.openai import OpenAIGenerator
from orpo_distill.tasks.base import extract_answer
from orpo_distill.metrics import read_metrics

ALIAS = "smollm2-135m-local"  # what the server calls the model; teacher.model must match
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
INSTALL_FAILED = Path(sys.prefix) / "llama-server-install.failed"  # written by the Makefile's llama-server step


def _skip_reason() -> str | None:
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    if INSTALL_FAILED.is_file():
        # the Makefile writes a summary line and the log's error lines, then the log's last lines
        head = INSTALL_FAILED.read_text(errors="replace").split("--- last lines")[0].strip().splitlines()
        return f"llama-cpp-python[server] FAILED to install in `make test`: {' | '.join(x.strip() for x in head)[:800]}"
    return (f"llama-cpp-python[server] is not installed (missing {', '.join(missing)}); `make test` installs it, "
            f"or: pip install 'llama-cpp-python[server]'")


# slow: still run by `make test` (it deselects nothing), so CI runs these on every landing
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def gguf_path() -> Path:
    from orpo_distill.models import _builtin_gguf

    folder, filename = _builtin_gguf("smollm2-135m-instruct")
    return folder / filename


def server_env() -> dict[str, str]:
    """The environment without variables the server would read as settings (pydantic-settings, no
    prefix: an API_KEY, MODEL or VERBOSE exported on a CI machine would change the server under test)."""
    from llama_cpp.server.settings import Settings

    fields = set(Settings.model_fields)
    return {**{k: v for k, v in os.environ.items() if k.lower() not in fields}, "PYTHONUNBUFFERED": "1"}


class LlamaServer:
    """``python -m llama_cpp.server`` on 127.0.0.1:port, its output appended to ``log``."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> None:
        # One thread: on a shared two-core machine a second OpenMP thread that gets preempted stalls every
        # token (seen here: 2 s a token); one thread is also the server's own default on two cores.
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias", ALIAS,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "1024", "--n_threads", "1"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=server_env())
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the llama.cpp server exited with {self.proc.returncode}: {self.tail()}"
            try:
                r = httpx.get(f"{self.base_url}/models", timeout=2.0)
                if r.status_code == 200 and ALIAS in [m["id"] for m in r.json()["data"]]:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the llama.cpp server did not answer within {timeout:g} s: {self.tail()}"
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, connections reset mid-answer."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def answered(self) -> int:
        """Completion calls answered 200 so far (uvicorn's access log), over every start."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return sum(1 for line in text.splitlines() if '"POST /v1/' in line and '" 200' in line)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = LlamaServer(free_port(), tmp_path_factory.mktemp("llama-server") / "server.log")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------
# helpers


def write_questions(path: Path, count: int, offset: int = 0) -> Path:
    """Small sums ("What is 12 + 7?"): short prompts, and texts that nearly always hold a number."""
    rows = [{"id": f"sum-{i:03d}", "question": f"What is {10 + 3 * i} + {2 + i % 7}?", "answer": str(12 + 3 * i + i % 7)}
            for i in range(offset, offset + count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(tmp_path: Path, base_url: str, questions: int, samples: int, **teacher: Any) -> Path:
    data = {
        "run_dir": str(tmp_path / "run"),
        "dataset": {"kind": "jsonl", "train_path": str(write_questions(tmp_path / "train.jsonl", questions)),
                    "eval_path": str(write_questions(tmp_path / "eval.jsonl", 2, offset=questions))},
        "task": {"kind": "numeric"},
        "teacher": {
            # one call at a time: the server computes one at a time anyway, and consecutive calls for one
            # question reuse its prompt's KV cache (the top-ups cost no second prompt evaluation)
            "kind": "openai", "base_url": base_url, "model": ALIAS, "max_concurrency": 1, "timeout": 60.0,
            "max_retries": 2, "backoff_base": 0.05, "backoff_max": 0.5,
            "sampling": {"samples": samples, "temperature": 0.8, "max_tokens": 16, "seed": 0},
            **teacher,
        },
        "student": {"kind": "hf", "model": "builtin:smollm2-135m-instruct"},  # not loaded by the teacher stage
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def stored_lines(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of teacher/traces.jsonl as written (duplicates included, unlike TraceStore)."""
    path = run_dir / "teacher" / "traces.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def expected_keys(config: Path, samples: int) -> tuple[set[tuple[str, int]], Any]:
    from orpo_distill.pipeline import Run

    run = Run(load_config(str(config)), progress=False)
    return {(r.id, s) for r in run.train_records for s in range(samples)}, run


def assert_complete(config: Path, samples: int) -> list[dict[str, Any]]:
    """Every (question, sample) key stored exactly once, with a verified answer."""
    keys, run = expected_keys(config, samples)
    lines = stored_lines(run.dir)
    got = [(row["id"], row["sample"]) for row in lines]
    assert len(got) == len(set(got)), "a key is stored twice"
    assert set(got) == keys
    records = {r.id: r for r in run.train_records}
    for row in lines:
        assert isinstance(row["text"], str) and row["generator"] == f"openai:{ALIAS}"
        assert row["finish_reason"] in ("stop", "length")
        # the answer was extracted from this very text, and checked against the gold answer
        assert row["answer"] == extract_answer(run.task, row["text"], records[row["id"]], row["finish_reason"])
        assert row["correct"] is bool(run.task.check(row["answer"], records[row["id"]]))
    assert any(row["text"].strip() for row in lines), "the server returned only empty texts"
    assert any(row["answer"] is not None for row in lines), "no answer extracted from any text"
    return lines


def teacher_cmd(config: Path, *extra: str) -> list[str]:
    script = Path(sys.executable).parent / "orpo-distill"
    base = [str(script)] if script.is_file() else [sys.executable, "-m", "orpo_distill.cli"]
    return [*base, "teacher", str(config), "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------
# the two endpoints, n > 1, stop


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_teacher_stage_stores_every_key(server: LlamaServer, tmp_path: Path, endpoint: str,
                                        capsys: pytest.CaptureFixture) -> None:
    """`orpo-distill teacher` on 3 questions, K=3: the server answers one choice per call (it ignores n),
    the generator tops up, and the store holds samples 0, 1, 2 of every question."""
    config = write_config(tmp_path, server.base_url, questions=3, samples=3, endpoint=endpoint)
    before = server.answered()
    assert cli.main(["teacher", str(config), "--no-progress"]) == 0
    lines = assert_complete(config, samples=3)
    assert len(lines) == 9
    assert server.answered() - before == 9, "one HTTP call per sample: llama.cpp's server ignores n"
    assert any(r["num_tokens"] > 0 for r in lines)  # usage.completion_tokens came back
    (event,) = [e for e in read_metrics(tmp_path / "run" / "metrics.jsonl") if e["event"] == "sampling"]
    assert (event["new_samples"], event["failed_requests"]) == (9, 0)
    out = capsys.readouterr().out
    assert "failed requests" in out
    # a rerun finds everything on disk and calls nobody
    assert cli.main(["teacher", str(config), "--no-progress"]) == 0
    assert server.answered() - before == 9 and len(stored_lines(tmp_path / "run")) == 9


def generator(server: LlamaServer, **kw: Any) -> OpenAIGenerator:
    opts = dict(kind="openai", model=ALIAS, base_url=server.base_url, max_concurrency=1, timeout=60.0,
                max_retries=2, backoff_base=0.05, backoff_max=0.5)
    opts.update(kw)
    return OpenAIGenerator(generator_config(**opts))


def test_n_is_topped_up_with_distinct_seeds(server: LlamaServer) -> None:
    """n=3 per request: 3 calls each (the server sends one choice), seeds offset so the top-ups differ;
    the same seeds again give the same texts (the server honours seed)."""
    gen = generator(server)
    reqs = [Request(key=f"q{i}", messages=({"role": "user", "content": f"Tell me a fact about the number {i + 7}."},),
                    n=3, temperature=1.0, max_tokens=12, seed=100 + i) for i in range(2)]
    out = gen.generate(reqs)
    assert [len(s) for s in out] == [3, 3]
    assert all(s.error is None for samples in out for s in samples)
    assert gen.stats.extra["http_calls"] == 6 and gen.stats.samples == 6 and gen.stats.retries == 0
    for samples in out:
        assert len({s.text for s in samples}) > 1, "the top-up calls returned copies: the seed offset was lost"
    again = generator(server).generate(reqs)
    assert [[s.text for s in x] for x in again] == [[s.text for s in x] for x in out]


def test_stop_sequences_end_the_text(server: LlamaServer) -> None:
    """Greedy text without stops, then with `stop`: the text is the first one cut right before the
    earliest stop string, and finish_reason says 'stop'."""
    stops = [".", "\n"]
    req = Request(key="q", messages=({"role": "user", "content": "Write three short sentences about the sea."},),
                  n=1, temperature=0.0, max_tokens=48, seed=1)
    (full,) = generator(server).generate([req])[0]
    cuts = [full.text.find(s) for s in stops if full.text.find(s) > 0]
    assert cuts, f"the model wrote no stop string, so the test proves nothing: {full.text!r}"
    gen = generator(server, stop=stops)
    (stopped,) = gen.generate([req])[0]
    assert stopped.error is None
    assert stopped.text == full.text[: min(cuts)]
    assert not any(s in stopped.text for s in stops)
    assert stopped.finish_reason == "stop"


def test_prompt_longer_than_the_context_fails_without_retries(server: LlamaServer) -> None:
    """The server answers 400 (context_length_exceeded) for a prompt past n_ctx: the caller's fault, so
    one call, no retry, the request counted as failed with the server's message (no sample faked)."""
    gen = generator(server)
    long = Request(key="long", messages=({"role": "user", "content": "word " * 1500},), n=2, max_tokens=8, seed=1)
    short = Request(key="short", messages=({"role": "user", "content": "Say hi."},), n=1, max_tokens=4, seed=1)
    out = gen.generate([long, short])
    assert [s.error is not None for s in out[0]] == [True, True]
    assert "HTTP 400" in out[0][0].error and "context" in out[0][0].error
    assert out[1][0].error is None and out[1][0].text  # the other request is unaffected
    assert (gen.stats.failed_requests, gen.stats.retries, gen.stats.extra["http_calls"]) == (1, 0, 2)


# ---------------------------------------------------------------------------------------------
# the server dies mid-stage


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the teacher stage ended (rc {proc.returncode}) before {what}: "
                        f"{log.read_text(errors='replace')[-2000:] if log else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_server_killed_mid_stage_loses_nothing(server: LlamaServer, tmp_path: Path) -> None:
    """Run 1 (1 retry): the server is SIGKILLed after a few answers; the stage ends with the failed
    requests counted and logged. The server comes back on the same port. Run 2 (many retries): the
    server is killed again mid-stage and restarted while the stage keeps retrying; the stage asks only
    for what was missing and finishes with every key exactly once."""
    questions, k = 10, 2
    config = write_config(tmp_path, server.base_url, questions=questions, samples=k, max_retries=1)
    run_dir = tmp_path / "run"
    failures_path = run_dir / "teacher" / "traces.failures.jsonl"
    procs: list[subprocess.Popen] = []

    def start(name: str, *extra: str) -> subprocess.Popen:
        with (tmp_path / f"{name}.log").open("wb") as log:
            procs.append(subprocess.Popen(teacher_cmd(config, *extra), stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    try:
        # ---- run 1: killed server, too few retries to ride it out
        mark = server.answered()
        proc = start("run1")
        wait_for(lambda: server.answered() >= mark + 3, 120, "the server answered 3 calls", proc, tmp_path / "run1.log")
        server.kill()
        # failed requests fail the stage (teacher.max_failed_share 0), after storing what arrived
        assert proc.wait(timeout=120) == 2, (tmp_path / "run1.log").read_text(errors="replace")[-3000:]
        out1 = (tmp_path / "run1.log").read_text(errors="replace")
        first = stored_lines(run_dir)
        assert 0 < len(first) < questions * k, "the kill came too late (or too early): the test proves nothing"
        (event1,) = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "sampling"]
        assert event1["failed_requests"] > 0 and event1["new_samples"] == len(first)
        failures = [json.loads(x) for x in failures_path.read_text().splitlines()]
        missing = questions * k - len(first)
        assert len(failures) == missing  # one line per sample not delivered
        stored_ids = {}
        for row in first:
            stored_ids[row["id"]] = stored_ids.get(row["id"], 0) + 1
        assert {f["id"] for f in failures} == {r for r in expected_ids(config) if stored_ids.get(r, 0) < k}
        assert all("gave up" in f["error"] for f in failures), failures[:3]
        shown = re.search(r"teacher: (\d+) of \d+ requests failed for good", out1)
        assert shown and int(shown.group(1)) == event1["failed_requests"], out1[-2000:]

        # ---- the server comes back on the same port; run 2 is killed under too, but retries long enough
        server.start()
        mark = server.answered()
        proc = start("run2", "--set", "teacher.max_retries=60", "--set", "teacher.backoff_max=1.0")
        wait_for(lambda: server.answered() >= mark + 3, 120, "the server answered 3 calls of run 2", proc,
                 tmp_path / "run2.log")
        server.kill()
        time.sleep(1.0)  # calls in flight fail, new ones are refused, and the stage keeps retrying
        assert proc.poll() is None, "run 2 gave up while the server was down"
        server.start()
        restarted = server.answered()
        assert proc.wait(timeout=180) == 0, (tmp_path / "run2.log").read_text(errors="replace")[-3000:]
        assert server.answered() > restarted, "run 2 made no call to the restarted server: the test proves nothing"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if server.proc is None or server.proc.poll() is not None:
            server.start()  # leave the module's server running for any later test

    lines = assert_complete(config, samples=k)
    assert len(lines) == questions * k
    assert lines[: len(first)] == first, "run 2 rewrote what run 1 had stored"
    event2 = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "sampling"][-1]
    assert event2["new_samples"] == questions * k - len(first)
    assert event2["failed_requests"] == 0
    assert len(failures_path.read_text().splitlines()) == len(failures), "run 2 logged failures it then recovered"


def expected_ids(config: Path) -> list[str]:
    keys, _ = expected_keys(config, 1)
    return sorted(q for q, _ in keys)
