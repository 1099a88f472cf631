"""ReplayGenerator: recorded traces by question id, with clear errors for a bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orpo_distill.config import GeneratorConfig
from orpo_distill.errors import UserError
from orpo_distill.generators.base import Generator, Request
from orpo_distill.generators.replay import ReplayGenerator


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def make(path: Path) -> ReplayGenerator:
    return ReplayGenerator(GeneratorConfig(kind="replay", path=str(path)))


def req(key: str, n: int) -> Request:
    return Request(key=key, messages=({"role": "user", "content": "ignored"},), n=n)


@pytest.fixture
def traces(tmp_path) -> Path:
    return write_lines(tmp_path / "traces.jsonl", [
        {"id": "q1", "text": "first"},
        {"question_id": "q2", "output": "only one"},
        "",
        {"id": "q1", "response": "second"},
        {"id": 7, "texts": ["seven a", "seven b"]},
        {"id": "q1", "texts": ["third", "fourth"], "extra_field": 1},
        {"id": "code", "text": "__import__('os').system('false')"},
    ])


def test_returns_first_n_traces_in_file_order(traces):
    gen = make(traces)
    out = gen.generate([req("q1", 3), req("7", 2), req("q2", 1), req("code", 1)])
    assert [[s.text for s in samples] for samples in out] == [
        ["first", "second", "third"], ["seven a", "seven b"], ["only one"], ["__import__('os').system('false')"],
    ]
    assert all(s.error is None for samples in out for s in samples)
    assert gen.name == "replay:traces.jsonl"
    assert isinstance(gen, Generator)
    assert gen.stats.requests == 4 and gen.stats.samples == 7
    assert "missing" not in gen.stats.extra


def test_shortfall_is_reported(traces):
    gen = make(traces)
    out = gen.generate([req("q2", 3), req("unknown", 2), req("q1", 4)])
    assert [len(s) for s in out] == [1, 0, 4]
    assert gen.stats.extra["missing"] == 4 and gen.stats.extra["short_requests"] == 2
    assert gen.stats.failed_requests == 0


def test_same_request_twice_gives_the_same_traces(traces):
    gen = make(traces)
    a = gen.generate([req("q1", 2)])
    b = gen.generate([req("q1", 2)])
    assert a == b


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"id": "a", "text": "x"}\r\n{"id": "a", "text": "y"}\r\n')
    assert [s.text for s in make(path).generate([req("a", 2)])[0]] == ["x", "y"]


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"id": "a", "text": "x"}, "", '{"id": "b", "text": '])
    with pytest.raises(UserError, match=r"bad\.jsonl:3: malformed JSON"):
        make(path)


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin\.jsonl:2: not UTF-8"):
        make(path)


@pytest.mark.parametrize(
    "line,message",
    [
        ('["a list"]', "expected a JSON object"),
        ('{"text": "no id"}', "no question id"),
        ('{"id": "a"}', "no trace"),
        ('{"id": null, "text": "x"}', "'id' must be a string or an integer"),
        ('{"id": true, "text": "x"}', "'id' must be a string or an integer"),
        ('{"id": "a", "output": 3}', "'output' must be a string"),
        ('{"id": "a", "texts": ["ok", 2]}', "'texts' must be a list of strings"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "t.jsonl", [{"id": "ok", "text": "fine"}, line])
    with pytest.raises(UserError, match=r"t\.jsonl:2: ") as err:
        make(path)
    assert message in str(err.value)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="replay file not found"):
        make(tmp_path / "nope.jsonl")
