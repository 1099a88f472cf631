"""The trace store: append-only, one line per key, torn tails repaired, settings guarded, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orpo_distill.errors import UserError
from orpo_distill.store import (
    TraceStore,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    read_jsonl,
    settings_hash,
)


def row(qid: str, i: int, text: str = "t") -> dict:
    return {"id": qid, "sample": i, "text": f"{text}{qid}/{i}", "answer": "A", "correct": True}


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_append_skips_duplicate_keys_and_persists(tmp_path):
    path = tmp_path / "t" / "traces.jsonl"
    store = TraceStore(path, "h1")
    assert store.append([row("q1", 0), row("q1", 1)]) == 2
    # the same keys again, one of them with different text, plus one new key: only the new one lands
    assert store.append([row("q1", 0, "other"), row("q1", 1), row("q2", 0)]) == 1
    assert store.append([]) == 0
    assert len(store) == 3 and ("q2", 0) in store and ("q2", 1) not in store
    stored = lines(path)
    assert [(r["id"], r["sample"]) for r in stored] == [("q1", 0), ("q1", 1), ("q2", 0)]
    assert stored[0]["text"] == "tq1/0"  # the first text wins
    assert all(r["settings"] == "h1" for r in stored)

    reopened = TraceStore(path, "h1")
    assert reopened.count("q1") == 2 and reopened.count("q2") == 1 and reopened.count("q3") == 0
    assert [r["sample"] for r in reopened.for_question("q1")] == [0, 1]
    assert reopened.append([row("q1", 1), row("q1", 2)]) == 1  # duplicates skipped across reopen too
    assert len(lines(path)) == 4


def test_count_stops_at_the_first_gap(tmp_path):
    store = TraceStore(tmp_path / "s.jsonl", "h")
    store.append([row("q", 0), row("q", 2)])
    assert store.count("q") == 1
    assert [r["sample"] for r in store.for_question("q")] == [0]


def test_torn_last_line_is_cut_and_the_rest_kept(tmp_path):
    path = tmp_path / "traces.jsonl"
    store = TraceStore(path, "h")
    store.append([row("q1", 0), row("q1", 1), row("q2", 0)])
    whole = path.read_bytes()
    torn = json.dumps({**row("q2", 1), "settings": "h"}).encode()[:17]  # half a line, no newline
    path.write_bytes(whole + torn)

    reopened = TraceStore(path, "h")
    assert path.read_bytes() == whole  # the torn bytes are gone, nothing else touched
    assert len(reopened) == 3 and ("q2", 1) not in reopened
    assert reopened.append([row("q2", 1)]) == 1
    assert [(r["id"], r["sample"]) for r in read_jsonl(path)] == [("q1", 0), ("q1", 1), ("q2", 0), ("q2", 1)]


def test_torn_only_line_and_torn_non_utf8_tail(tmp_path):
    only = tmp_path / "only.jsonl"
    only.write_bytes(b'{"id": "q1", "sam')
    assert len(TraceStore(only, "h")) == 0 and only.read_bytes() == b""

    # a kill in the middle of a multi-byte character leaves bytes that are not UTF-8
    path = tmp_path / "utf8.jsonl"
    TraceStore(path, "h").append([row("q1", 0, "é")])
    good = path.read_bytes()
    path.write_bytes(good + '{"id": "q1", "sample": 1, "text": "é'.encode()[:-1])
    assert len(TraceStore(path, "h")) == 1 and path.read_bytes() == good


def test_long_torn_tail_is_cut_past_the_read_chunk(tmp_path):
    """The repair scans backwards in chunks; a torn line longer than a chunk must still be cut whole."""
    path = tmp_path / "long.jsonl"
    TraceStore(path, "h").append([row("q1", 0)])
    good = path.read_bytes()
    path.write_bytes(good + b'{"id": "q1", "sample": 1, "text": "' + b"x" * 10_000)
    assert len(TraceStore(path, "h")) == 1 and path.read_bytes() == good


def test_other_settings_refused_with_overwrite_hint(tmp_path):
    path = tmp_path / "traces.jsonl"
    TraceStore(path, settings_hash({"temperature": 0.8})).append([row("q1", 0)])
    before = path.read_bytes()
    with pytest.raises(UserError) as e:
        TraceStore(path, settings_hash({"temperature": 0.7}))
    msg = str(e.value)
    assert "--overwrite" in msg and str(path) in msg
    assert path.read_bytes() == before  # refusing touches nothing


def test_overwrite_sets_the_old_file_aside(tmp_path):
    path = tmp_path / "traces.jsonl"
    TraceStore(path, "old").append([row("q1", 0), row("q1", 1)])
    before = path.read_bytes()

    store = TraceStore(path, "new", overwrite=True)
    assert len(store) == 0
    old = tmp_path / "traces.jsonl.old"
    assert old.read_bytes() == before
    assert not path.exists() or path.read_bytes() == b""
    store.append([row("q1", 0)])
    assert [r["settings"] for r in read_jsonl(path)] == ["new"]
    # same settings with --overwrite keeps the store as it is
    assert len(TraceStore(path, "new", overwrite=True)) == 1 and old.read_bytes() == before


def test_settings_hash_is_stable_and_order_free():
    a = settings_hash({"temperature": 0.8, "task": {"kind": "mcq", "system": None}})
    b = settings_hash({"task": {"system": None, "kind": "mcq"}, "temperature": 0.8})
    assert a == b and len(a) == 16
    assert a != settings_hash({"temperature": 0.9, "task": {"kind": "mcq", "system": None}})


def test_atomic_writes_leave_no_temp_files(tmp_path):
    d = tmp_path / "sub" / "dir"
    atomic_write_text(d / "a.txt", "hello\n")
    atomic_write_json(d / "b.json", {"x": [1, 2], "name": "é"})
    atomic_write_jsonl(d / "c.jsonl", [{"i": 1}, {"i": 2}])
    atomic_write_text(d / "a.txt", "again\n")  # replacing an existing file
    assert sorted(p.name for p in d.iterdir()) == ["a.txt", "b.json", "c.jsonl"]
    assert (d / "a.txt").read_text() == "again\n"
    assert json.loads((d / "b.json").read_text(encoding="utf-8")) == {"x": [1, 2], "name": "é"}
    assert [r["i"] for r in read_jsonl(d / "c.jsonl")] == [1, 2]


def test_atomic_write_that_fails_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})  # not serialisable: fails before any file is touched
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # type: ignore[arg-type]  # fails while writing the temp file
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_read_jsonl_names_file_and_line_for_malformed_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"{path}:4: malformed JSON"):
        list(read_jsonl(path))


def test_read_jsonl_names_file_and_line_for_non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"{path}:2: not UTF-8"):
        list(read_jsonl(path))


def test_read_jsonl_rejects_non_objects(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"{path}:2: expected a JSON object"):
        list(read_jsonl(path))


def test_corrupt_line_before_the_tail_is_refused_not_dropped(tmp_path):
    """Only the last line can be torn by a kill; damage elsewhere is reported, never silently cut."""
    path = tmp_path / "traces.jsonl"
    TraceStore(path, "h").append([row("q1", 0), row("q1", 1), row("q1", 2)])
    text = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(text[0] + text[1][:10] + "\n" + text[2], encoding="utf-8")
    before = path.read_bytes()
    with pytest.raises(UserError, match=rf"{path}:2: malformed JSON"):
        TraceStore(path, "h")
    assert path.read_bytes() == before


def test_overwrite_never_destroys_an_earlier_set_aside_file(tmp_path):
    path = tmp_path / "traces.jsonl"
    for i, settings in enumerate(["a", "b", "c"]):
        store = TraceStore(path, settings, overwrite=True)
        store.append([{"id": "q", "sample": 0, "text": settings}])
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["traces.jsonl", "traces.jsonl.old", "traces.jsonl.old.1"]
    texts = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert '"a"' in texts["traces.jsonl.old"] and '"b"' in texts["traces.jsonl.old.1"]
