"""The sampling stage: only missing samples are generated, failures are logged and retried, totals add up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import pytest

from orpo_distill.config import DatasetConfig, SamplingConfig
from orpo_distill.datasets import load_splits
from orpo_distill.generators.base import GenerationStats, Request, Sample
from orpo_distill.generators.scripted import ScriptedTeacher
from orpo_distill.records import Record
from orpo_distill.sampling import request_seed, sample_traces
from orpo_distill.store import TraceStore, read_jsonl
from orpo_distill.tasks import build_task


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return load_splits(DatasetConfig(train_size=6, eval_size=1))[0]


@pytest.fixture(scope="module")
def task():
    return build_task("mcq")


@dataclass
class Counting:
    """Wraps a generator and records every request it is asked for."""

    inner: object
    name: str = "counting"
    calls: list[list[Request]] = field(default_factory=list)

    @property
    def stats(self) -> GenerationStats:
        return self.inner.stats  # type: ignore[attr-defined]

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        self.calls.append(list(requests))
        return self.inner.generate(requests)  # type: ignore[attr-defined]

    @property
    def asked(self) -> list[tuple[str, int, int | None]]:
        return [(r.key, r.n, r.seed) for call in self.calls for r in call]

    @property
    def samples_asked(self) -> int:
        return sum(r.n for call in self.calls for r in call)


@dataclass
class Scripted:
    """Answers with texts a function picks per (key, sample index in the request); may fail some."""

    text: Callable[[str, int], str | None]  # None: this sample fails
    name: str = "fake"
    stats: GenerationStats = field(default_factory=GenerationStats)

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        out = []
        for r in requests:
            samples = []
            for i in range(r.n):
                t = self.text(r.key, i)
                samples.append(Sample(text="", error=f"boom {r.key}/{i}") if t is None else Sample(text=t, num_tokens=7))
            if any(s.failed for s in samples):
                self.stats.failed_requests += 1
            self.stats.completion_tokens += sum(s.num_tokens for s in samples)
            out.append(samples)
        return out


def sampling(k: int = 3, **kw) -> SamplingConfig:
    return SamplingConfig(samples=k, **kw)


def run(records, task, gen, store, k=3, chunk=2, **kw):
    return sample_traces(records, task, gen, sampling(k, **kw), store, "teacher", chunk_questions=chunk, progress=False)


def keys(store: TraceStore) -> list[tuple[str, int]]:
    return [(r["id"], r["sample"]) for r in read_jsonl(store.path)]


def test_rerun_generates_only_missing_questions(tmp_path, records, task):
    path = tmp_path / "traces.jsonl"
    gen = Counting(ScriptedTeacher(records, seed=0))
    s1 = run(records[:4], task, gen, TraceStore(path, "h"))
    assert s1.new_samples == 12 and s1.samples == 12 and s1.questions == 4
    assert len(gen.calls) == 2  # chunks of two questions, each appended before the next
    assert gen.asked == [(r.id, 3, request_seed(0, r.id, 0)) for r in records[:4]]

    gen.calls.clear()
    s2 = run(records, task, gen, TraceStore(path, "h"))
    assert [k for k, _, _ in gen.asked] == [r.id for r in records[4:]] and gen.samples_asked == 6
    assert s2.new_samples == 6 and s2.samples == 18 and s2.questions == 6

    gen.calls.clear()
    s3 = run(records, task, gen, TraceStore(path, "h"))
    assert gen.calls == [] and s3.new_samples == 0 and s3.samples == 18
    # a complete store needs no generator at all
    s4 = run(records, task, None, TraceStore(path, "h"))
    assert s4.samples == 18 and s4.correct == s3.correct
    k = keys(TraceStore(path, "h"))
    assert len(k) == len(set(k)) == 18


def test_partly_sampled_question_asks_only_for_the_rest(tmp_path, records, task):
    path = tmp_path / "traces.jsonl"
    full = tmp_path / "full.jsonl"
    run(records[:2], task, ScriptedTeacher(records), TraceStore(full, "h"))
    rows = list(read_jsonl(full))
    # as if killed after the first sample of the second question was stored
    TraceStore(path, "h").append([r for r in rows if r["id"] == records[0].id or r["sample"] == 0])

    gen = Counting(ScriptedTeacher(records))
    s = run(records[:2], task, gen, TraceStore(path, "h"))
    assert gen.asked == [(records[1].id, 2, request_seed(0, records[1].id, 1))]
    assert s.new_samples == 2
    assert sorted(keys(TraceStore(path, "h"))) == sorted((r.id, i) for r in records[:2] for i in range(3))


def test_larger_k_generates_only_the_extra_indices(tmp_path, records, task):
    path = tmp_path / "traces.jsonl"
    gen = Counting(ScriptedTeacher(records))
    run(records, task, gen, TraceStore(path, "h"), k=2)
    before = path.read_bytes()

    gen.calls.clear()
    s = run(records, task, gen, TraceStore(path, "h"), k=4)
    assert gen.asked == [(r.id, 2, request_seed(0, r.id, 2)) for r in records]
    assert s.new_samples == 12 and s.samples == 24
    after = path.read_bytes()
    assert after.startswith(before)  # the first two samples of every question are untouched
    new_keys = keys(TraceStore(path, "h"))[len(before.splitlines()):]
    assert sorted(new_keys) == sorted((r.id, i) for r in records for i in (2, 3))
    # a smaller k later is satisfied by what is stored, and the summary counts only the first k
    gen.calls.clear()
    assert run(records, task, gen, TraceStore(path, "h"), k=1).samples == 6 and gen.calls == []


def test_failures_are_logged_not_stored_and_retried(tmp_path, records, task):
    path = tmp_path / "traces.jsonl"
    rec = records[:3]
    broken = {rec[0].id}  # the whole request fails
    # rec[1]: the middle one of three samples fails; rec[2]: all fine
    flaky = Counting(Scripted(lambda key, i: None if key in broken or (key == rec[1].id and i == 1)
                              else f"try {key} {i}\nThe answer is (A)."))
    s1 = run(rec, task, flaky, TraceStore(path, "h"), chunk=8)
    assert s1.failed_requests == 2
    assert s1.new_samples == 5 and s1.samples == 5

    stored = list(read_jsonl(path))
    assert all(r["text"] for r in stored) and {r["id"] for r in stored} == {rec[1].id, rec[2].id}
    # the good samples of rec[1] are stored under dense indices, so a rerun asks only for the rest
    assert sorted(r["sample"] for r in stored if r["id"] == rec[1].id) == [0, 1]
    failures = list(read_jsonl(tmp_path / "traces.failures.jsonl"))
    assert [f["id"] for f in failures] == [rec[0].id] * 3 + [rec[1].id]
    assert failures[0]["error"] == f"boom {rec[0].id}/0"

    healthy = Counting(Scripted(lambda key, i: f"retry {key} {i}\nThe answer is (B)."))
    s2 = run(rec, task, healthy, TraceStore(path, "h"), chunk=8)
    assert healthy.asked == [(rec[0].id, 3, request_seed(0, rec[0].id, 0)), (rec[1].id, 1, request_seed(0, rec[1].id, 2))]
    assert s2.failed_requests == 0 and s2.new_samples == 4 and s2.samples == 9
    final = TraceStore(path, "h")
    assert all(final.count(r.id) == 3 for r in rec)
    assert len(list(read_jsonl(tmp_path / "traces.failures.jsonl"))) == 4  # nothing new failed


def test_summary_counts(tmp_path, records, task):
    rec = records[:4]
    gold = {r.id: r.answer for r in rec}
    wrong = {r.id: next(c for c in "ABCD" if c != r.answer) for r in rec}

    def text(key: str, i: int) -> str:
        if key == rec[0].id:  # all three right
            return f"ok\nThe answer is ({gold[key]})."
        if key == rec[1].id:  # one right, one wrong, one unparsable
            return [f"ok\nThe answer is ({gold[key]}).", f"no\nThe answer is ({wrong[key]}).", "no idea"][i]
        if key == rec[2].id:  # all wrong: no positive
            return f"no\nThe answer is ({wrong[key]})."
        return "I cannot tell."  # all unparsable: no positive either

    s = run(rec, task, Scripted(text), TraceStore(tmp_path / "t.jsonl", "h"))
    assert (s.questions, s.samples, s.new_samples) == (4, 12, 12)
    assert s.correct == 4 and s.correct_share == pytest.approx(4 / 12)
    assert s.no_positive == 2
    assert s.parse_failures == 4
    assert s.failed_requests == 0 and s.completion_tokens == 12 * 7
    d = s.as_dict()
    assert d["correct_share"] == pytest.approx(1 / 3) and d["no_positive"] == 2
    table = dict(s.rows())
    assert table["correct share"] == "33.3%" and table["questions with no positive"] == "2"
    assert table["parse failures"] == "4" and table["samples (new)"] == "12 (12)"

    stored = {(r["id"], r["sample"]): r for r in read_jsonl(tmp_path / "t.jsonl")}
    assert stored[(rec[1].id, 1)]["answer"] == wrong[rec[1].id] and stored[(rec[1].id, 1)]["correct"] is False
    assert stored[(rec[1].id, 2)]["answer"] is None
    assert stored[(rec[0].id, 0)]["source"] == "teacher" and stored[(rec[0].id, 0)]["generator"] == "fake"


def test_request_seed_depends_on_question_and_start_not_order():
    a = request_seed(0, "q1", 0)
    assert a == request_seed(0, "q1", 0)
    assert len({a, request_seed(0, "q2", 0), request_seed(1, "q1", 0)}) == 3
    assert request_seed(0, "q1", 2) == a + 2  # consecutive starts: seeds line up with per-sample offsets


def test_a_sample_cut_at_max_tokens_is_read_with_its_finish_reason(tmp_path):
    """The stage passes each sample's finish_reason to the extractor: a numeric trace cut off at the
    token limit on a bare number is a parse failure, the same text that ended on its own is an answer."""

    records = [Record(id="q0", question="?", answer="12"), Record(id="q1", question="?", answer="12")]

    class Cut(Scripted):
        def generate(self, requests):
            return [[Sample(text="so x = 12", num_tokens=4, finish_reason="length" if r.key == records[0].id else "stop")]
                    for r in requests]

    store = TraceStore(tmp_path / "traces.jsonl", "h")
    run(records, build_task("numeric"), Cut(text=lambda k, i: ""), store, k=1)
    rows = {r["id"]: r for r in read_jsonl(store.path)}
    assert rows[records[0].id]["answer"] is None and rows[records[0].id]["finish_reason"] == "length"
    assert rows[records[1].id]["answer"] == "12"


# ---- the greedy decode first (issue 33, design 4) ------------------------------------------------------


def test_the_request_plan_puts_the_greedy_decode_first() -> None:
    from orpo_distill.sampling import request_plan

    assert request_plan(0, 4, sampling(4, greedy_first=True, temperature=0.8)) == [(0, 1, 0.0), (1, 3, 0.8)]
    assert request_plan(1, 4, sampling(4, greedy_first=True, temperature=0.8)) == [(1, 3, 0.8)]  # greedy stored
    assert request_plan(0, 1, sampling(1, greedy_first=True)) == [(0, 1, 0.0)]
    assert request_plan(0, 4, sampling(4, temperature=0.8)) == [(0, 4, 0.8)]
    assert request_plan(4, 4, sampling(4, greedy_first=True)) == []


def test_greedy_first_samples_number_on_and_enter_the_store_settings(tmp_path, records, task):
    from orpo_distill.sampling import sampling_settings

    gen = Counting(Scripted(lambda key, i: f"{key} text {i}"))
    run(records[:2], task, gen, TraceStore(tmp_path / "t.jsonl", "h"), k=3, greedy_first=True, temperature=0.7)
    assert [(r.key, r.n, r.temperature, r.start) for call in gen.calls for r in call] == [
        (records[0].id, 1, 0.0, 0), (records[0].id, 2, 0.7, 1), (records[1].id, 1, 0.0, 0), (records[1].id, 2, 0.7, 1)]
    assert sorted(keys(TraceStore(tmp_path / "t.jsonl", "h"))) == sorted((r.id, i) for r in records[:2] for i in range(3))
    assert "greedy_first" not in sampling_settings("g", sampling(3), "t")  # stores from before keep their hash
    assert sampling_settings("g", sampling(3, greedy_first=True), "t")["greedy_first"] is True


@pytest.mark.slow
def test_the_hf_students_first_sample_is_its_greedy_answer(tmp_path, records, task, tiny_model_dir):
    """On a real (tiny) model: sample 0 is what a temperature-0 request decodes, the rest are samples."""
    from orpo_distill.generators.hf import HFGenerator
    from orpo_distill.models import load_model, load_tokenizer

    model, tok = load_model(str(tiny_model_dir), dtype="float32"), load_tokenizer(str(tiny_model_dir))
    gen = HFGenerator.from_model(model, tok, name="hf:tiny", batch_size=4, progress=False, bf16=False)
    store = TraceStore(tmp_path / "s.jsonl", "h")
    sample_traces(records[:2], task, gen, sampling(3, greedy_first=True, temperature=1.0, max_tokens=12), store,
                  "student", progress=False)
    greedy = gen.generate([Request(key=r.id, messages=tuple(task.messages(r)), n=1, temperature=0.0, max_tokens=12)
                           for r in records[:2]])
    rows = {(r["id"], r["sample"]): r["content"] for r in read_jsonl(store.path)}
    for record, (g,) in zip(records[:2], greedy):
        assert rows[(record.id, 0)] == g.text
        assert {rows[(record.id, 1)], rows[(record.id, 2)]} != {g.text}  # sampled at temperature 1
