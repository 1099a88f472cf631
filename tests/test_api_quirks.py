"""Hosted-API quirks and servers that cannot be reached (issue 13), against the fake server on real sockets.

- an API that refuses ``n > 1`` (400 naming ``n``): one sample per request from then on, said once,
  remembered for the run; the top-up path collects the K samples with seed + samples held;
- ``teacher.token_param: max_completion_tokens``, and the switch on a 400 that refuses the field sent
  (OpenAI's "Unsupported parameter: 'max_tokens' ... Use 'max_completion_tokens' instead");
- fail fast: a port where nothing listens, or a server answering 404 to everything (``/v1`` missing from
  ``base_url``), stops the stage within seconds, exit 2 and one line naming the URL and the fix, with no
  traces.jsonl; a server that answered once keeps the per-request retries;
- a stage that ends with failed requests fails unless ``teacher.max_failed_share`` allows them.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fake_openai_server import (
    MAX_TOKENS_REFUSAL,
    MAX_TOKENS_TOO_LARGE,
    N_REFUSALS,
    FakeOpenAIServer,
    Good,
    Received,
    Status,
    free_port,
    refusing,
)
from orpo_distill.config import generator_config, build_config
from orpo_distill.errors import UserError
from orpo_distill.generators.base import Request
from orpo_distill.generators.openai import (
    FAIL_FAST_ATTEMPTS,
    OpenAIGenerator,
    ServerUnreachable,
    build_payload,
    rejected_parameter,
)
from orpo_distill.pipeline import Run
from orpo_distill.store import read_jsonl


def make_gen(base_url, sleeps: list[float] | None = None, **kw) -> OpenAIGenerator:
    opts = dict(kind="openai", model="teacher-x", base_url=base_url, max_concurrency=1, timeout=2.0, max_retries=3,
                backoff_base=0.001, backoff_max=0.01)
    opts.update(kw)
    extra = {"sleep": sleeps.append} if sleeps is not None else {}
    return OpenAIGenerator(generator_config(**opts), rng=random.Random(0), **extra)


def req(key="q1", n=1, content="What is 2+2?", **kw) -> Request:
    return Request(key=key, messages=({"role": "user", "content": content},), n=n, **kw)


def ok(samples, n) -> None:
    assert len(samples) == n and all(s.error is None for s in samples), [s.error for s in samples]
    assert len({s.text for s in samples}) == n


# ---------------------------------------------------------------------------------------------
# n > 1 refused


@pytest.mark.parametrize("wording", sorted(N_REFUSALS))
def test_n_refused_falls_back_to_one_sample_per_request_with_offset_seeds(wording, caplog):
    with FakeOpenAIServer(refusing(n_body=N_REFUSALS[wording])) as server:
        gen = make_gen(server.base_url, [])
        with caplog.at_level(logging.WARNING, logger="orpo_distill"):
            out = gen.generate([req(n=3, seed=7)])
        ok(out[0], 3)
        assert [r.body["n"] for r in server.received] == [3, 1, 1, 1]
        assert [r.body["seed"] for r in server.received] == [7, 7, 8, 9]  # seed + samples already held
        assert [r.action.code if isinstance(r.action, Status) else 200 for r in server.received] == [400, 200, 200, 200]
    assert gen.one_sample_per_call
    s = gen.stats
    assert (s.samples, s.failed_requests, s.retries) == (3, 0, 0)  # the switch is no retry
    said = [r for r in caplog.records if "n > 1" in r.getMessage()]
    assert len(said) == 1 and server.base_url in said[0].getMessage()


def test_n_fallback_is_said_once_and_remembered_for_the_run(caplog):
    with FakeOpenAIServer(refusing(n_body=N_REFUSALS["openai"])) as server:
        gen = make_gen(server.base_url, [], max_concurrency=4)
        with caplog.at_level(logging.WARNING, logger="orpo_distill"):
            first = gen.generate([req(key=f"a{i}", n=2, content=f"a{i}", seed=10 * i) for i in range(6)])
            refused = sum(1 for r in server.received if isinstance(r.action, Status))
            asked = len(server.received)
            second = gen.generate([req(key=f"b{i}", n=2, content=f"b{i}") for i in range(3)])
        for samples in first + second:
            ok(samples, 2)
        assert 1 <= refused <= 4  # only calls already in flight when the first 400 came back met it
        later = server.received[asked:]
        assert len(later) == 6 and all(r.body["n"] == 1 for r in later)  # the next batch asks one at a time at once
        assert not any(isinstance(r.action, Status) for r in later)
    assert len([r for r in caplog.records if "n > 1" in r.getMessage()]) == 1
    assert gen.stats.failed_requests == 0 and gen.stats.samples == 18


def test_a_400_naming_n_when_n_was_1_is_the_callers_error():
    with FakeOpenAIServer(lambda rec: Status(400, body=N_REFUSALS["openai"])) as server:
        gen = make_gen(server.base_url, [])
        out = gen.generate([req(n=1)])
        assert len(server.received) == 1  # nothing left to change: not sent again
    assert out[0][0].failed and "HTTP 400" in out[0][0].error
    assert gen.stats.failed_requests == 1 and not gen.one_sample_per_call


# ---------------------------------------------------------------------------------------------
# the token-limit field


def test_max_tokens_refused_switches_to_max_completion_tokens_once(caplog):
    with FakeOpenAIServer(refusing(max_tokens_body=MAX_TOKENS_REFUSAL)) as server:
        gen = make_gen(server.base_url, [])
        with caplog.at_level(logging.WARNING, logger="orpo_distill"):
            out = gen.generate([req(key="a", n=2, max_tokens=64), req(key="b", n=2, content="x", max_tokens=64)])
        ok(out[0], 2)
        ok(out[1], 2)
        bodies = [r.body for r in server.received]
    assert len(bodies) == 3  # one refused call, then one call per request
    assert bodies[0]["max_tokens"] == 64 and "max_completion_tokens" not in bodies[0]
    assert all(b["max_completion_tokens"] == 64 and "max_tokens" not in b for b in bodies[1:])
    assert gen.token_param == "max_completion_tokens"
    assert gen.stats.failed_requests == 0 and gen.stats.retries == 0
    assert len([r for r in caplog.records if "max_completion_tokens from now on" in r.getMessage()]) == 1


def test_token_param_option_sends_max_completion_tokens():
    with FakeOpenAIServer() as server:
        gen = make_gen(server.base_url, token_param="max_completion_tokens")
        ok(gen.generate([req(n=2, max_tokens=33)])[0], 2)
        (rec,) = server.received
    assert rec.body["max_completion_tokens"] == 33 and "max_tokens" not in rec.body
    payload = build_payload(req(max_tokens=9), "m", "chat", 1, None, None)
    assert payload["max_tokens"] == 9 and "max_completion_tokens" not in payload  # the default is unchanged


def test_an_api_without_max_completion_tokens_gets_max_tokens_back():
    # an older deployment that does not know the new field (the wording of an Azure OpenAI API version before it)
    body = json.dumps({"error": {"message": "Unrecognized request argument supplied: max_completion_tokens",
                                 "type": "invalid_request_error", "param": None, "code": None}})
    with FakeOpenAIServer(lambda rec: Status(400, body=body) if "max_completion_tokens" in rec.body else Good()) as server:
        gen = make_gen(server.base_url, [], token_param="max_completion_tokens")
        ok(gen.generate([req(n=2)])[0], 2)
        assert [("max_tokens" in r.body) for r in server.received] == [False, True]
    assert gen.token_param == "max_tokens"


def test_a_limit_past_the_context_is_no_switch():
    """vLLM's 400 for max_tokens past the context names the field but does not refuse it: one call, failed."""
    with FakeOpenAIServer(lambda rec: Status(400, body=MAX_TOKENS_TOO_LARGE)) as server:
        gen = make_gen(server.base_url, [])
        out = gen.generate([req(n=2, max_tokens=4000)])
        assert len(server.received) == 1
    assert all(s.failed and "too large" in s.error for s in out[0])
    assert gen.token_param == "max_tokens"


def test_a_server_refusing_both_n_and_max_tokens():
    with FakeOpenAIServer(refusing(n_body=N_REFUSALS["openai"], max_tokens_body=MAX_TOKENS_REFUSAL)) as server:
        gen = make_gen(server.base_url, [])
        ok(gen.generate([req(n=2, seed=1)])[0], 2)
        sent = [(r.body["n"], "max_tokens" in r.body) for r in server.received]
    assert sent == [(2, True), (1, True), (1, False), (1, False)]
    assert gen.one_sample_per_call and gen.token_param == "max_completion_tokens"


def test_both_token_fields_refused_is_a_failure_not_a_loop():
    with FakeOpenAIServer(lambda rec: Status(400, body=MAX_TOKENS_REFUSAL.replace("'max_tokens'", "'max_completion_tokens'")
                                             if "max_completion_tokens" in rec.body else MAX_TOKENS_REFUSAL)) as server:
        gen = make_gen(server.base_url, [])
        out = gen.generate([req()])
        assert len(server.received) == 2  # max_tokens, then max_completion_tokens once
    assert out[0][0].failed and gen.stats.failed_requests == 1


@pytest.mark.parametrize("body,name,expected", [
    (MAX_TOKENS_REFUSAL, "max_tokens", True),
    (MAX_TOKENS_REFUSAL, "n", False),
    (MAX_TOKENS_TOO_LARGE, "max_tokens", False),
    (N_REFUSALS["openai"], "n", True),
    (N_REFUSALS["gateway"], "n", True),
    (N_REFUSALS["message-only"], "n", True),
    (N_REFUSALS["flat"], "n", True),
    ("n: Unsupported value", "n", True),
    ('{"error": {"message": "Unsupported parameter: \'logprobs\' is not supported with this model."}}', "n", False),
    ('{"error": {"message": "This model\'s maximum context length is 2048 tokens.\\nPlease reduce"}}', "n", False),
    ('{"error": "unknown model"}', "n", False),
])
def test_rejected_parameter(body, name, expected):
    assert rejected_parameter(body, name) is expected


# ---------------------------------------------------------------------------------------------
# fail fast


def test_a_port_where_nothing_listens_stops_after_a_few_calls():
    dead = f"http://127.0.0.1:{free_port()}/v1"
    sleeps: list[float] = []
    gen = make_gen(dead, sleeps, max_retries=6)
    with pytest.raises(ServerUnreachable) as e:
        gen.generate([req(key=str(i), content=str(i)) for i in range(20)])
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in msg
    assert dead in msg and "refused" in msg and "is the server started" in msg and "port" in msg
    assert gen.stats.extra["http_calls"] == FAIL_FAST_ATTEMPTS  # decided on the first calls, not 20 x 7
    assert len(sleeps) == FAIL_FAST_ATTEMPTS - 1


def test_a_single_request_batch_that_cannot_connect_stops_too():
    gen = make_gen(f"http://127.0.0.1:{free_port()}/v1", [], max_retries=0)
    with pytest.raises(ServerUnreachable):
        gen.generate([req()])
    assert gen.stats.extra["http_calls"] == 1


def test_404_for_every_request_without_v1_names_the_fix():
    with FakeOpenAIServer(api_root="/v1") as server:
        root = f"http://127.0.0.1:{server.port}"
        gen = make_gen(root, [], max_concurrency=2)
        with pytest.raises(ServerUnreachable) as e:
            gen.generate([req(key=str(i), content=str(i)) for i in range(30)])
        calls = len(server.received)
    msg = str(e.value)
    assert f"{root}/chat/completions answered HTTP 404" in msg and f"{root}/v1" in msg
    assert FAIL_FAST_ATTEMPTS <= calls <= FAIL_FAST_ATTEMPTS + 2  # the calls in flight, no more


def test_404_with_v1_points_at_the_model():
    body = json.dumps({"error": {"message": "The model `teacher-y` does not exist.", "type": "NotFoundError",
                                 "param": "model", "code": 404}})
    with FakeOpenAIServer(lambda rec: Status(404, body=body)) as server:
        gen = make_gen(server.base_url, [], model="teacher-y")
        with pytest.raises(ServerUnreachable) as e:
            gen.generate([req(key=str(i)) for i in range(5)])
    msg = str(e.value)
    assert "does not exist" in msg and "generator.model ('teacher-y'" in msg and f"{server.base_url}/models" in msg


def test_several_servers_all_dead_are_each_named():
    a, b = (f"http://127.0.0.1:{free_port()}/v1" for _ in range(2))
    gen = make_gen([a, b], [], max_retries=10)
    with pytest.raises(ServerUnreachable) as e:
        gen.generate([req(key=str(i)) for i in range(4)])
    assert a in str(e.value) and b in str(e.value)
    # each refused FAIL_FAST_ATTEMPTS times (one may be tried once more while the other cools down)
    assert 2 * FAIL_FAST_ATTEMPTS <= gen.stats.extra["http_calls"] <= 2 * FAIL_FAST_ATTEMPTS + 2


def test_a_server_that_answered_keeps_per_request_retries_when_it_fails_later():
    """Good first, then 404s and a dead port: requests fail one by one as before; nothing stops the stage."""
    with FakeOpenAIServer() as server:
        server.push(Good())
        server.responder = lambda rec: Status(404, body='{"detail":"Not Found"}')
        gen = make_gen(server.base_url, [], max_retries=2)
        out = gen.generate([req(key=str(i), content=str(i)) for i in range(6)])
        assert out[0][0].error is None and all(s[0].failed and "404" in s[0].error for s in out[1:])
        assert len(server.received) == 6  # a 404 is still not retried
    # the server is gone now: connection refused on every call, retried per request up to max_retries
    sleeps: list[float] = []
    gen._sleep = sleeps.append
    out = gen.generate([req(key="late", content="late")])
    assert out[0][0].failed and "gave up after 3 attempts" in out[0][0].error
    assert gen.stats.retries == 2 and len(sleeps) == 2


def test_a_healthy_server_is_never_taken_for_a_dead_one_when_one_of_two_is_down():
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with FakeOpenAIServer() as server:
        gen = make_gen([dead, server.base_url], [], max_concurrency=1, max_retries=3)
        out = gen.generate([req(key=str(i), content=str(i)) for i in range(8)])
    assert all(s[0].error is None for s in out)


# ---------------------------------------------------------------------------------------------
# the stage: exit status, message, nothing written


def teacher_config(tmp: Path, base_url: str, questions: int = 4, **teacher) -> Path:
    data = {
        "run_dir": str(tmp / "run"),
        "dataset": {"kind": "synthetic", "train_size": questions, "eval_size": 2},
        "teacher": {"kind": "openai", "base_url": base_url, "model": "teacher-x", "max_concurrency": 1,
                    "sampling": {"samples": 2}, **teacher},
        "student": {"kind": "hf", "model": "builtin:smollm2-135m-instruct"},  # not loaded by the teacher stage
    }
    path = tmp / "teacher.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def orpo_distill(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    script = Path(sys.executable).parent / "orpo-distill"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "orpo_distill.cli"]
    start = time.monotonic()
    proc = subprocess.run([*cmd, *args, "--no-progress"], capture_output=True, text=True, timeout=120)
    return proc, time.monotonic() - start


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.startswith("orpo-distill: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_teacher_stage_against_a_dead_port_exits_2_within_seconds_and_writes_no_traces(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    # the default backoff (1 s, doubling): what a new user gets
    proc, seconds = orpo_distill("teacher", str(teacher_config(tmp_path, url, questions=100)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert line.startswith("orpo-distill: error: teacher.base_url: no server answered")
    assert url in line and "is the server started" in line and "Rerun the same command" in line
    assert seconds < 30, seconds  # the process start included; the calls themselves take about 3 s
    teacher = tmp_path / "run" / "teacher"
    assert not (teacher / "traces.jsonl").exists() and not (teacher / "traces.failures.jsonl").exists()
    assert "teacher traces (" not in proc.stdout  # no summary naming a file that was never written


@pytest.mark.slow
def test_teacher_stage_with_base_url_missing_v1_exits_2_and_says_add_v1(tmp_path):
    with FakeOpenAIServer(api_root="/v1") as server:
        root = f"http://127.0.0.1:{server.port}"
        proc, _ = orpo_distill("teacher", str(teacher_config(tmp_path, root)))
        assert {r.path for r in server.received} == {"/chat/completions"}
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = one_error_line(proc)
    assert "answered HTTP 404" in line and f"base_url is the API root with its version: {root}/v1" in line
    assert not (tmp_path / "run" / "teacher" / "traces.jsonl").exists()


def run_for(tmp_path: Path, server: FakeOpenAIServer, **teacher) -> Run:
    cfg = build_config({
        "run_dir": str(tmp_path / "run"),
        "dataset": {"kind": "synthetic", "train_size": 4, "eval_size": 2},
        "teacher": {"kind": "openai", "base_url": server.base_url, "model": "teacher-x", "max_concurrency": 1,
                    "max_retries": 1, "backoff_base": 0.001, "backoff_max": 0.01, "sampling": {"samples": 2},
                    **teacher},
    })
    return Run(cfg, progress=False)


def dead_first(rec: Received, seen: dict[str, str]):
    seen.setdefault("prompt", rec.prompt)  # one call at a time: the first prompt is the first question's
    return Status(503) if rec.prompt == seen["prompt"] else Good()


def test_failed_requests_fail_the_stage_and_say_how_to_retry(tmp_path):
    seen: dict[str, str] = {}
    with FakeOpenAIServer(lambda rec: dead_first(rec, seen)) as server:
        run = run_for(tmp_path, server)
        with pytest.raises(UserError) as e:
            run.teacher()
    msg = str(e.value)
    assert msg.startswith("teacher: 1 of 4 requests failed for good, so 2 teacher traces are missing (6 stored)")
    assert "HTTP 503" in msg and "traces.failures.jsonl" in msg and "Rerun the same command" in msg
    assert "teacher.max_failed_share (now 0)" in msg
    store = tmp_path / "run" / "teacher" / "traces.jsonl"
    assert len(list(read_jsonl(store))) == 6  # what arrived is stored
    (event,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                if json.loads(x)["event"] == "sampling"]
    assert (event["failed_requests"], event["requests"], event["missing"]) == (1, 4, 2)


def test_max_failed_share_lets_a_share_of_requests_fail(tmp_path):
    seen: dict[str, str] = {}
    with FakeOpenAIServer(lambda rec: dead_first(rec, seen)) as server:
        summary = run_for(tmp_path / "a", server, max_failed_share=0.25).teacher()  # 1 of 4: allowed
    assert summary.failed_requests == 1 and summary.missing == 2 and summary.samples == 6
    assert ("missing samples", "2") in summary.rows()
    seen.clear()
    with FakeOpenAIServer(lambda rec: dead_first(rec, seen)) as server:
        with pytest.raises(UserError, match="now 0.2"):
            run_for(tmp_path / "b", server, max_failed_share=0.2).teacher()  # 1 of 4 is more than 0.2


def test_max_failed_share_is_validated():
    with pytest.raises(UserError, match="max_failed_share"):
        build_config({"teacher": {"max_failed_share": 1.5}})


def test_student_stage_against_a_dead_port_names_the_student_section(tmp_path):
    """The same fail-fast stop for a remote student: the one line names student.base_url, not teacher's
    or the generators' own ``generator.`` wording."""
    url = f"http://127.0.0.1:{free_port()}/v1"
    data = yaml.safe_load(teacher_config(tmp_path, url).read_text())
    data["teacher"] = {"kind": "scripted"}
    data["student"] = {"kind": "openai", "base_url": url, "model": "student-x", "max_concurrency": 1,
                       "backoff_base": 0.01, "sampling": {"samples": 2}}
    run = Run(build_config(data, "test"), progress=False)
    with pytest.raises(UserError) as err:
        run.student(epoch=1)
    assert str(err.value).startswith("student.base_url: no server answered"), str(err.value)
    assert url in str(err.value) and not (tmp_path / "run" / "student" / "epoch_1.jsonl").exists()
