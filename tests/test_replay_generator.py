"""ReplayGenerator: recorded traces by question id, with clear errors for a bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orpo_distill.config import generator_config
from orpo_distill.errors import UserError
from orpo_distill.generators.base import Generator, Request
from orpo_distill.generators.replay import ReplayGenerator


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


def make(path: Path) -> ReplayGenerator:
    return ReplayGenerator(generator_config(kind="replay", path=str(path)))


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


def test_a_folder_given_as_the_replay_file_is_named_a_directory(tmp_path):
    with pytest.raises(UserError, match=f"replay file {tmp_path} is a directory, not a file"):
        make(tmp_path)


def test_extra_fields_are_ignored_and_finish_reason_is_kept(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [
        {"id": "a", "text": "cut = <<7", "finish_reason": "length", "question": "q?", "model": "r1", "score": 0.5},
        {"id": "a", "texts": ["x", "y"]},
        {"id": "a", "text": "z", "finish_reason": None},
    ])
    out = make(path).generate([req("a", 4)])[0]
    assert [(s.text, s.finish_reason) for s in out] == [("cut = <<7", "length"), ("x", "stop"), ("y", "stop"),
                                                        ("z", "stop")]
    bad = write_lines(tmp_path / "bad.jsonl", [{"id": "a", "text": "x", "finish_reason": 3}])
    with pytest.raises(UserError, match=r"bad\.jsonl:1: field 'finish_reason' must be a string"):
        make(bad)


def test_a_request_that_says_where_to_start_gets_the_traces_from_there(traces):
    """A rerun asks for a question's missing samples only (``have`` stored, ``Request.start``): it must get
    the traces after those, not the first ones again."""
    gen = make(traces)
    out = gen.generate([Request(key="q1", messages=(), n=3, start=2), Request(key="q2", messages=(), n=1, start=1)])
    assert [[s.text for s in samples] for samples in out] == [["third", "fourth"], []]
    assert gen.stats.extra["missing"] == 2


def test_a_grown_samples_count_stores_the_next_traces_not_the_first_again(tmp_path):
    """The stage passes ``start=have``: asking for 2, then 4 samples stores t1..t4 once each."""
    from orpo_distill.config import SamplingConfig
    from orpo_distill.sampling import sample_traces
    from orpo_distill.store import TraceStore
    from orpo_distill.tasks import build_task

    records = _records("q0", "q1")
    store = TraceStore(tmp_path / "traces.jsonl", "h")
    for k in (2, 4):
        sample_traces(records, build_task("mcq"), make(short_file(tmp_path)), SamplingConfig(samples=k), store,
                      "teacher", progress=False)
    assert [r["text"] for r in store.for_question("q0")] == ["t1", "t2", "t3", "t4"]


def _records(*ids):
    from orpo_distill.records import Record

    return [Record(i, "q", "A") for i in ids]


def short_file(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "four.jsonl", [{"id": f"q{i}", "texts": ["t1", "t2", "t3", "t4"]} for i in range(4)])


def test_fewer_traces_than_samples_warns_and_counts_the_missing(tmp_path, caplog):
    """The issue's case: 4 traces per question, samples 8: 16 of 32 missing, said before anything is stored."""
    gen = ReplayGenerator(generator_config(kind="replay", path=str(short_file(tmp_path)), sampling={"samples": 8}))
    with caplog.at_level("WARNING", logger="orpo_distill.generators.replay"):
        gen.check_ids(_records("q0", "q1", "q2", "q3"))
    assert gen.shortfall == {"q0": 4, "q1": 4, "q2": 4, "q3": 4}
    text = caplog.text
    assert "fewer than the 8 traces per question" in text and "for 4 of the 4 questions (16 samples missing" in text
    assert "set sampling.samples to 4" in text and "on_missing: error" in text
    out = gen.generate([req(f"q{i}", 8) for i in range(4)])
    assert sum(len(s) for s in out) == 16 and gen.stats.extra["missing"] == 16


def test_fewer_traces_than_samples_is_refused_with_on_missing_error(tmp_path):
    cfg = generator_config(kind="replay", path=str(short_file(tmp_path)), sampling={"samples": 8}, on_missing="error")
    with pytest.raises(UserError) as e:
        ReplayGenerator(cfg).check_ids(_records("q0", "q1", "q2", "q3", "q9"))
    msg = str(e.value)
    assert msg.startswith("generator.on_missing is error: ")  # build_generator names the section instead
    assert "for 5 of the 5 questions (24 samples missing; 'q0' has 4)" in msg and "record more traces" in msg


def test_enough_traces_say_nothing(tmp_path, caplog):
    cfg = generator_config(kind="replay", path=str(short_file(tmp_path)), sampling={"samples": 4}, on_missing="error")
    gen = ReplayGenerator(cfg)
    with caplog.at_level("WARNING"):
        gen.check_ids(_records("q0", "q1"))
    assert gen.shortfall == {} and not caplog.text


def test_the_stage_names_its_section_when_it_refuses(tmp_path):
    from orpo_distill.generators import build_generator

    cfg = generator_config(kind="replay", path=str(short_file(tmp_path)), sampling={"samples": 8}, on_missing="error")
    with pytest.raises(UserError, match=r"^teacher\.on_missing is error: "):
        build_generator(cfg, _records("q0"), role="teacher")


def test_the_teacher_stage_warns_and_its_summary_and_metrics_count_the_missing(tiny_config, tmp_path, caplog):
    """End to end: a replay file with 2 traces per question for samples 4 stores 2 per question, warns
    before storing, and the stage's summary and its metrics line give the missing samples."""
    from orpo_distill.pipeline import Run

    run = Run(tiny_config(), progress=False)
    ids = [r.id for r in run.train_records]
    path = write_lines(tmp_path / "two.jsonl", [{"id": i, "texts": ["The answer is (A).", "The answer is (B)."]}
                                                for i in ids])
    run = Run(tiny_config(teacher={"kind": "replay", "path": str(path), "sampling": {"samples": 4}}), progress=False)
    with caplog.at_level("WARNING", logger="orpo_distill.generators.replay"):
        summary = run.teacher()
    assert f"for {len(ids)} of the {len(ids)} questions ({2 * len(ids)} samples missing" in caplog.text
    assert summary.samples == 2 * len(ids) and summary.missing == 2 * len(ids)
    assert ("missing samples", str(2 * len(ids))) in summary.rows()
    events = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["missing"] for e in events if e.get("event") == "sampling"] == [2 * len(ids)]
