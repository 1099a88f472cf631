"""OpenAIGenerator against a real local HTTP server that scripts every fault a teacher server shows."""

from __future__ import annotations

import logging
import random

import pytest

from fake_openai_server import Drop, EmptyChoices, FakeOpenAIServer, Good, Malformed, Received, Slow, Status, free_port
from orpo_distill.config import OpenAIGeneratorConfig, generator_config
from orpo_distill.errors import UserError
from orpo_distill.generators.base import Generator, Request, render_plain
from orpo_distill.generators.openai import (
    OpenAIGenerator,
    ServerPool,
    backoff_delay,
    parse_choices,
    parse_retry_after,
)

KEY = "sk-test-SECRET-0123456789"


@pytest.fixture
def server():
    with FakeOpenAIServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("FAKE_TEACHER_KEY", KEY)


def make_cfg(base_url, **kw) -> OpenAIGeneratorConfig:
    opts = dict(
        kind="openai", model="teacher-x", base_url=base_url, api_key_env="FAKE_TEACHER_KEY",
        max_concurrency=1, timeout=2.0, max_retries=3, backoff_base=0.001, backoff_max=0.01,
    )
    opts.update(kw)
    return generator_config(**opts)


def make_gen(base_url, sleeps: list[float] | None = None, **kw) -> OpenAIGenerator:
    """A generator whose sleeps are recorded instead of waited (when ``sleeps`` is given)."""
    extra = {"sleep": sleeps.append} if sleeps is not None else {}
    return OpenAIGenerator(make_cfg(base_url, **kw), rng=random.Random(0), **extra)


def req(key="q1", n=1, content="What is 2+2?", **kw) -> Request:
    return Request(key=key, messages=({"role": "user", "content": content},), n=n, **kw)


def assert_good(samples, n, prompt="What is 2+2?"):
    assert len(samples) == n
    assert all(s.error is None for s in samples), [s.error for s in samples]
    assert all(s.text.startswith(prompt + "|") for s in samples)
    assert len({s.text for s in samples}) == n


# ---------------------------------------------------------------------------------------------
# the happy path


def test_chat_request_sends_settings_and_key(server):
    gen = make_gen(server.base_url, stop=["</s>"])
    out = gen.generate([req(n=3, temperature=0.7, top_p=0.9, max_tokens=64, seed=11)])
    assert_good(out[0], 3)
    assert [s.finish_reason for s in out[0]] == ["stop"] * 3
    assert [s.num_tokens for s in out[0]] == [5, 5, 5]  # usage.completion_tokens split over choices
    (rec,) = server.received
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == f"Bearer {KEY}"
    assert rec.body == {
        "model": "teacher-x", "messages": [{"role": "user", "content": "What is 2+2?"}],
        "n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 11, "stop": ["</s>"],
    }
    s = gen.stats
    assert (s.requests, s.samples, s.failed_requests, s.retries, s.completion_tokens) == (1, 3, 0, 0, 15)
    assert gen.name == "openai:teacher-x"
    assert isinstance(gen, Generator)


def test_unset_seed_and_stop_are_not_sent_and_no_key_means_no_header(server):
    gen = make_gen(server.base_url + "/", api_key_env=None)  # trailing slash tolerated
    assert_good(gen.generate([req()])[0], 1)
    (rec,) = server.received
    assert rec.path == "/v1/chat/completions"
    assert "seed" not in rec.body and "stop" not in rec.body
    assert "authorization" not in rec.headers


def test_completions_endpoint_gets_plain_prompt(server):
    gen = make_gen(server.base_url, endpoint="completions")
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"})
    out = gen.generate([Request(key="q", messages=messages, n=2)])
    (rec,) = server.received
    assert rec.path == "/v1/completions"
    assert rec.body["prompt"] == render_plain(messages) and "messages" not in rec.body
    assert len(out[0]) == 2 and all(s.text.startswith(render_plain(messages)) for s in out[0])


def test_results_keep_request_order_under_concurrency(server):
    gen = make_gen(server.base_url, max_concurrency=4)
    prompts = [f"question {i}" for i in range(10)]
    out = gen.generate([req(key=str(i), n=2, content=p) for i, p in enumerate(prompts)])
    for p, samples in zip(prompts, out):
        assert_good(samples, 2, prompt=p)
    assert gen.stats.requests == 10 and gen.stats.samples == 20
    assert gen.generate([]) == []


def test_empty_content_is_an_empty_sample_not_an_error(server):
    server.push(Good(content_none=True), Good(texts=[""]))
    out = make_gen(server.base_url).generate([req(key="a"), req(key="b")])
    assert [(s.text, s.error) for s in out[0] + out[1]] == [("", None), ("", None)]


def test_without_usage_tokens_are_estimated(server):
    server.push(Good(usage=False, texts=["x" * 40]))
    (sample,) = make_gen(server.base_url).generate([req()])[0]
    assert sample.num_tokens == 10


# ---------------------------------------------------------------------------------------------
# faults, each followed by a good answer


@pytest.mark.parametrize(
    "fault",
    [Status(500), Status(502), Status(503), Status(408), Status(429), Malformed(), Malformed("not json at all"),
     Malformed('{"choices": "nope"}'), Malformed('{"choices": [{"text": "no message"}]}'), EmptyChoices(),
     Drop(reset=True), Drop(reset=False), Slow(10.0)],
    ids=lambda f: repr(f)[:40],
)
def test_fault_is_retried_then_succeeds(server, fault):
    server.push(fault, Good())
    sleeps: list[float] = []
    gen = make_gen(server.base_url, sleeps, timeout=0.5 if isinstance(fault, Slow) else 2.0)
    out = gen.generate([req(n=2)])
    assert_good(out[0], 2)
    assert len(server.received) == 2
    assert gen.stats.retries == 1 and gen.stats.failed_requests == 0
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 0.01  # one backoff wait, within backoff_max


def test_retry_after_is_honoured_and_capped(server):
    server.push(Status(429, retry_after="0.5"), Status(503, retry_after="30"), Good())
    sleeps: list[float] = []
    gen = make_gen(server.base_url, sleeps, backoff_max=2.0)
    assert_good(gen.generate([req()])[0], 1)
    assert sleeps == [0.5, 2.0]  # the server's wait is a floor, backoff_max a ceiling
    assert gen.stats.retries == 2


def test_gives_up_after_max_retries_and_reports_it(server):
    server.responder = lambda rec: Status(503)
    gen = make_gen(server.base_url, [], max_retries=2)
    out = gen.generate([req(n=3)])
    assert len(out[0]) == 3 and all(s.failed and s.text == "" and "503" in s.error for s in out[0])
    assert len(server.received) == 3  # first try + 2 retries
    s = gen.stats
    assert (s.failed_requests, s.retries, s.samples) == (1, 2, 0)


def test_client_error_is_not_retried(server):
    server.push(Status(400, body='{"error": "unknown model"}'))
    gen = make_gen(server.base_url, [])
    out = gen.generate([req(n=2)])
    assert all(s.failed and "400" in s.error and "unknown model" in s.error for s in out[0])
    assert len(server.received) == 1
    assert gen.stats.retries == 0 and gen.stats.failed_requests == 1


def test_failing_request_does_not_stop_the_others(server):
    server.responder = lambda rec: Status(500) if "poison" in rec.prompt else Good()
    gen = make_gen(server.base_url, [], max_concurrency=3, max_retries=1)
    prompts = ["a", "b", "poison", "c", "d"]
    out = gen.generate([req(key=p, n=2, content=p) for p in prompts])
    for p, samples in zip(prompts, out):
        if p == "poison":
            assert len(samples) == 2 and all(s.failed for s in samples)
        else:
            assert_good(samples, 2, prompt=p)
    assert gen.stats.failed_requests == 1 and gen.stats.samples == 8


# ---------------------------------------------------------------------------------------------
# servers that return fewer choices than asked


def test_fewer_choices_are_topped_up_with_offset_seed(server):
    server.responder = lambda rec: Good(count=1)  # llama.cpp ignores n
    gen = make_gen(server.base_url, [], max_retries=0)  # top-ups are progress, not retries
    out = gen.generate([req(n=3, seed=7)])
    assert_good(out[0], 3)
    assert [r.body["n"] for r in server.received] == [3, 2, 1]
    assert [r.body["seed"] for r in server.received] == [7, 8, 9]
    assert gen.stats.retries == 0 and gen.stats.extra["http_calls"] == 3


def test_extra_choices_are_cut_to_n(server):
    server.push(Good(count=4))
    out = make_gen(server.base_url).generate([req(n=2)])
    assert_good(out[0], 2)


def test_empty_choice_list_counts_as_no_progress(server):
    server.push(Good(count=1), EmptyChoices(), Good(count=1), EmptyChoices(), EmptyChoices(), Good(count=1))
    gen = make_gen(server.base_url, [], max_retries=2)
    assert_good(gen.generate([req(n=3)])[0], 3)
    assert gen.stats.retries == 3 and gen.stats.failed_requests == 0


def test_no_progress_is_bounded_and_partial_samples_are_kept(server):
    server.push(Good(count=1))
    server.responder = lambda rec: EmptyChoices()
    gen = make_gen(server.base_url, [], max_retries=2)
    out = gen.generate([req(n=3)])
    assert out[0][0].error is None and out[0][0].text.startswith("What is 2+2?|")
    assert [s.failed for s in out[0]] == [False, True, True]
    assert "no choices" in out[0][1].error
    assert len(server.received) == 4 and gen.stats.failed_requests == 1 and gen.stats.samples == 1


# ---------------------------------------------------------------------------------------------
# the API key


def test_missing_key_variable_fails_before_any_request(server, monkeypatch):
    monkeypatch.delenv("FAKE_TEACHER_KEY")
    with pytest.raises(UserError, match="FAKE_TEACHER_KEY"):
        make_gen(server.base_url)
    assert server.received == []


def test_key_never_leaks_into_repr_stats_errors_or_logs(server, caplog):
    # a server that echoes the key back in its error body, as some proxies do
    server.push(Status(503), Status(401, body=f'{{"error": "invalid key {KEY}"}}'))
    gen = make_gen(server.base_url, [])
    with caplog.at_level(logging.DEBUG, logger="orpo_distill"):
        out = gen.generate([req()])
    (sample,) = out[0]
    assert sample.failed and "401" in sample.error and "invalid key ***" in sample.error
    assert server.received[-1].headers["authorization"] == f"Bearer {KEY}"
    visible = [repr(gen), str(gen), repr(gen.stats), repr(out), caplog.text]
    assert caplog.text  # something was logged, and it is key-free
    for text in visible:
        assert KEY not in text and "SECRET" not in text


def test_bad_base_url_is_a_user_error():
    with pytest.raises(UserError, match="base_url"):
        make_gen("localhost:8000/v1")


# ---------------------------------------------------------------------------------------------
# several servers


def test_requests_spread_round_robin():
    with FakeOpenAIServer() as a, FakeOpenAIServer() as b:
        gen = make_gen([a.base_url, b.base_url])
        out = gen.generate([req(key=str(i)) for i in range(4)])
        assert all(s.error is None for samples in out for s in samples)
        assert len(a.received) == 2 and len(b.received) == 2


def test_dead_server_is_skipped_and_all_requests_succeed(server):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    sleeps: list[float] = []
    gen = make_gen([dead, server.base_url], sleeps, max_concurrency=2, max_retries=2)
    prompts = [f"q{i}" for i in range(6)]
    out = gen.generate([req(key=p, content=p) for p in prompts])
    for p, samples in zip(prompts, out):
        assert_good(samples, 1, prompt=p)
    assert gen.stats.failed_requests == 0 and gen.stats.retries >= 1  # the first call went to the dead one
    assert len(server.received) == 6
    assert sleeps == []  # a healthy server took each retry at once, without a backoff wait


def test_server_pool_cool_down():
    now = [0.0]
    pool = ServerPool(["a", "b", "c"], base=1.0, cap=8.0, clock=lambda: now[0])
    assert [pool.pick() for _ in range(4)] == ["a", "b", "c", "a"]
    pool.mark_failed("b")
    assert [pool.pick() for _ in range(3)] == ["c", "a", "c"]  # b sits out 1s
    now[0] = 1.0
    assert pool.pick() == "a" and pool.pick() == "b"
    pool.mark_failed("b")
    pool.mark_failed("b")  # third consecutive failure: 4s
    now[0] = 4.9
    assert "b" not in {pool.pick() for _ in range(6)}
    now[0] = 5.0
    assert "b" in {pool.pick() for _ in range(3)}
    pool.mark_ok("b")
    pool.mark_failed("b", at_least=6.0)  # Retry-After beats the cool-down, within the cap
    pool.mark_failed("a", at_least=100.0)  # capped at 8s
    pool.mark_failed("c")
    assert not pool.any_available()
    assert pool.pick() == "c"  # all cooling: the one back first
    now[0] = 11.5
    assert {pool.pick() for _ in range(4)} == {"b", "c"}
    now[0] = 13.0
    assert pool.any_available() and "a" in {pool.pick() for _ in range(3)}


# ---------------------------------------------------------------------------------------------
# pure helpers


def test_backoff_delay_grows_with_jitter_and_caps():
    rng = random.Random(1)
    for attempt in range(6):
        d = backoff_delay(attempt, base=1.0, cap=100.0, rng=rng)
        assert 0.5 * 2**attempt <= d <= 2**attempt
    assert backoff_delay(20, base=1.0, cap=30.0, rng=rng) <= 30.0
    assert backoff_delay(0, base=0.1, cap=30.0, retry_after=7.0, rng=rng) == 7.0
    assert backoff_delay(0, base=0.1, cap=5.0, retry_after=7.0, rng=rng) == 5.0


@pytest.mark.parametrize(
    "value,expected", [("3", 3.0), (" 0.25 ", 0.25), ("0", 0.0), (None, None), ("-1", None), ("nan", None),
                       ("Wed, 21 Oct 2015 07:28:00 GMT", None)]
)
def test_parse_retry_after(value, expected):
    assert parse_retry_after(value) == expected


def test_parse_choices_shapes():
    body = {"choices": [{"message": {"content": "a"}, "finish_reason": "length"}, {"message": {"content": None}},
                        {"message": {"content": "c"}}], "usage": {"completion_tokens": 7}}
    out = parse_choices(body, "chat")
    assert [(s.text, s.num_tokens, s.finish_reason) for s in out] == [("a", 3, "length"), ("", 2, None), ("c", 2, None)]
    assert [s.text for s in parse_choices({"choices": [{"text": "t"}]}, "completions")] == ["t"]
    for bad in [[], {"choices": None}, {"choices": [1]}, {"choices": [{"message": "x"}]},
                {"choices": [{"message": {"content": 5}}]}]:
        with pytest.raises(ValueError):
            parse_choices(bad, "chat")


def test_fake_server_records_what_it_received(server):
    # guards the shared test server itself: a request's record and the action it got
    server.push(Status(418))
    make_gen(server.base_url, []).generate([req()])
    (rec,) = server.received
    assert isinstance(rec, Received) and rec.method == "POST" and rec.prompt == "What is 2+2?"
    assert isinstance(rec.action, Status) and rec.action.code == 418


def test_api_key_from_a_dotenv_file_is_stripped_and_a_bad_one_refused(monkeypatch):
    from orpo_distill.generators.openai import read_api_key

    monkeypatch.setenv("ORPO_TEST_KEY", "sk-SECRET123\n")
    assert read_api_key("ORPO_TEST_KEY") == "sk-SECRET123"
    monkeypatch.setenv("ORPO_TEST_KEY", "sk-SEC\nRET123")
    with pytest.raises(UserError) as e:
        read_api_key("ORPO_TEST_KEY")
    assert "SEC" not in str(e.value)
