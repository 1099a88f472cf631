"""Reasoning teachers (issue 13): the reasoning a server sends apart from the answer is kept, the student
trains on what ``sampling.reasoning`` says, the answer comes from the final content, and the tokens of
every response (prompt, completion, reasoning) are counted into the samples, the rows and the summary.

Servers send the reasoning as ``message.reasoning_content`` (older vLLM, DeepSeek, SGLang),
``message.reasoning`` (newer vLLM, OpenRouter), or inside the text as ``<think>...</think>`` (llama.cpp
and any server without a reasoning parser); all three go through the fake server on real sockets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fake_openai_server import FakeOpenAIServer, Good, Received
from orpo_distill.config import generator_config, SamplingConfig, build_config
from orpo_distill.errors import UserError
from orpo_distill.generators.base import Request
from orpo_distill.generators.openai import OpenAIGenerator, parse_choices, split_think
from orpo_distill.pipeline import Run
from orpo_distill.sampling import sampling_settings, training_text
from orpo_distill.store import read_jsonl

# the reasoning considers (A) on the way; the final answer is (B): an answer read from the reasoning,
# or from the whole text, would be A
REASONING = "First guess: the answer is (A). Checking again, (A) is wrong; it must be B."
CONTENT = "The answer is (B)."


def make_gen(base_url, **kw) -> OpenAIGenerator:
    opts = dict(kind="openai", model="r1", base_url=base_url, max_concurrency=1, timeout=2.0, max_retries=1,
                backoff_base=0.001, backoff_max=0.01)
    opts.update(kw)
    return OpenAIGenerator(generator_config(**opts))


def req(n=1) -> Request:
    return Request(key="q", messages=({"role": "user", "content": "Which?"},), n=n)


# ---------------------------------------------------------------------------------------------
# reading the reasoning


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_field_is_kept_apart_from_the_content(field):
    with FakeOpenAIServer() as server:
        server.push(Good(texts=[CONTENT, "Final: (C)."], reasoning=[REASONING, "other thoughts"], reasoning_field=field,
                         tokens_per_choice=50, reasoning_tokens_per_choice=40, prompt_tokens=9))
        gen = make_gen(server.base_url)
        a, b = gen.generate([req(n=2)])[0]
    assert (a.text, a.reasoning) == (CONTENT, REASONING)
    assert (b.text, b.reasoning) == ("Final: (C).", "other thoughts")
    assert (a.num_tokens, a.reasoning_tokens, a.prompt_tokens) == (50, 40, 5)  # prompt 9 split 5 + 4
    assert b.prompt_tokens == 4
    s = gen.stats
    assert (s.completion_tokens, s.reasoning_tokens, s.prompt_tokens) == (100, 80, 9)


def test_think_tags_inside_the_content_are_split():
    with FakeOpenAIServer() as server:
        server.push(Good(texts=[f"<think>\n{REASONING}\n</think>\n\n{CONTENT}"]))
        (s,) = make_gen(server.base_url).generate([req()])[0]
    assert (s.reasoning, s.text) == (REASONING, CONTENT)


def test_think_tags_on_the_completions_endpoint_too():
    with FakeOpenAIServer() as server:
        server.push(Good(texts=[f"{REASONING}</think>{CONTENT}"]))  # the template opened the tag
        (s,) = make_gen(server.base_url, endpoint="completions").generate([req()])[0]
    assert (s.reasoning, s.text) == (REASONING, CONTENT)


@pytest.mark.parametrize("text,expected", [
    ("no tags at all", (None, "no tags at all")),
    ("<think>\nR\n</think>\n\nC", ("R", "C")),
    ("R</think>\n\nC", ("R", "C")),  # DeepSeek-R1's template puts <think> in the prompt
    ("<think>cut off while thinki", ("cut off while thinki", "")),  # max_tokens hit inside the reasoning
    ("Sure. <think>R</think> C", ("R", "Sure.  C")),
    ("<think></think>C", ("", "C")),
])
def test_split_think(text, expected):
    assert split_think(text) == expected


def test_parse_choices_reasoning_shapes_and_estimates():
    body = {"choices": [
        {"message": {"content": "answer", "reasoning_content": "<think>tagged</think>"}},  # tags left in the field
        {"message": {"content": None, "reasoning": "The answer is (C)."}},  # the answer only in the reasoning
        {"message": {"content": "plain", "reasoning_content": "", "reasoning": None}},  # empty fields: no reasoning
    ], "usage": {"prompt_tokens": 7, "completion_tokens": 30}}
    a, b, c = parse_choices(body, "chat")
    assert (a.text, a.reasoning) == ("answer", "tagged")
    assert (b.text, b.reasoning) == ("", "The answer is (C).")
    assert (c.text, c.reasoning, c.reasoning_tokens) == ("plain", None, 0)
    # no completion_tokens_details: the reasoning's share of the sample's tokens, by length
    assert a.reasoning_tokens == round(10 * 6 / (6 + 6)) and b.reasoning_tokens == 10
    assert [x.prompt_tokens for x in (a, b, c)] == [3, 2, 2]
    (d,) = parse_choices({"choices": [{"message": {"content": "x"}}]}, "chat")
    assert d.prompt_tokens is None and d.reasoning_tokens == 0  # no usage: unknown, not zero


# ---------------------------------------------------------------------------------------------
# what the student trains on


def test_training_text_formats():
    assert training_text(CONTENT, REASONING, "think") == f"<think>\n{REASONING}\n</think>\n\n{CONTENT}"
    assert training_text(CONTENT, REASONING, "plain") == f"{REASONING}\n\n{CONTENT}"
    assert training_text(CONTENT, REASONING, "drop") == CONTENT
    for mode in ("think", "plain", "drop"):
        assert training_text(" as is ", None, mode) == " as is "  # no reasoning: the text as it came
        assert training_text("", REASONING, mode) == REASONING  # the answer sits in the reasoning
    assert SamplingConfig().reasoning == "think"


def stage(tmp_path: Path, server: FakeOpenAIServer, **sampling) -> tuple[Run, list[dict]]:
    cfg = build_config({
        "run_dir": str(tmp_path / "run"),
        "dataset": {"kind": "synthetic", "train_size": 3, "eval_size": 2},
        "teacher": {"kind": "openai", "base_url": server.base_url, "model": "r1", "max_concurrency": 1,
                    "sampling": {"samples": 2, **sampling}},
    })
    run = Run(cfg, progress=False)
    run.teacher()
    return run, list(read_jsonl(tmp_path / "run" / "teacher" / "traces.jsonl"))


def gold_reasoner(run: Run):
    """A reasoning server whose reasoning names a wrong option first and whose content gives the gold one."""
    gold = {run.task.messages(r)[-1]["content"]: r.answer for r in run.train_records}

    def respond(rec: Received) -> Good:
        g = gold[rec.prompt]
        wrong = next(c for c in "ABCD" if c != g)
        n = int(rec.body["n"])
        return Good(texts=[f"The answer is ({g})."] * n, tokens_per_choice=30, reasoning_tokens_per_choice=20,
                    prompt_tokens=12, reasoning=[f"Maybe the answer is ({wrong}). No: {g} fits."])

    return respond


@pytest.mark.parametrize("mode", ["think", "plain", "drop"])
def test_teacher_rows_keep_reasoning_and_content_and_train_on_the_chosen_text(tmp_path, mode):
    with FakeOpenAIServer() as server:
        probe = Run(build_config({"run_dir": str(tmp_path / "probe"),
                                  "dataset": {"kind": "synthetic", "train_size": 3, "eval_size": 2}}), progress=False)
        server.responder = gold_reasoner(probe)
        run, rows = stage(tmp_path, server, reasoning=mode)
    assert len(rows) == 6
    for row in rows:
        gold = next(r.answer for r in run.train_records if r.id == row["id"])
        assert row["content"] == f"The answer is ({gold})."
        assert row["reasoning"].startswith("Maybe the answer is (") and row["reasoning"].endswith(f"{gold} fits.")
        assert row["answer"] == gold and row["correct"] is True  # from the content, not the reasoning's first guess
        expected = {"think": f"<think>\n{row['reasoning']}\n</think>\n\n{row['content']}",
                    "plain": f"{row['reasoning']}\n\n{row['content']}", "drop": row["content"]}[mode]
        assert row["text"] == expected
        assert (row["num_tokens"], row["reasoning_tokens"], row["prompt_tokens"]) == (30, 20, 6)


def test_null_content_with_the_answer_in_the_reasoning_still_gives_a_trace(tmp_path):
    with FakeOpenAIServer() as server:
        probe = Run(build_config({"run_dir": str(tmp_path / "probe"),
                                  "dataset": {"kind": "synthetic", "train_size": 3, "eval_size": 2}}), progress=False)
        gold = {probe.task.messages(r)[-1]["content"]: r.answer for r in probe.train_records}
        server.responder = lambda rec: Good(content_none=True, reasoning=[f"Thinking... The answer is ({gold[rec.prompt]})."],
                                            reasoning_field="reasoning")
        _, rows = stage(tmp_path, server)
    assert len(rows) == 6
    assert all(r["content"] == "" and r["text"] == r["reasoning"] and r["correct"] for r in rows)


def test_the_answer_is_read_from_the_content_never_the_reasoning_when_content_is_there(tmp_path):
    with FakeOpenAIServer() as server:
        server.responder = lambda rec: Good(texts=["I cannot decide."] * int(rec.body["n"]),
                                            reasoning=["The answer is (A). The answer is (B)."])
        _, rows = stage(tmp_path, server, reasoning="plain")
    # the text holds the reasoning's markers, but the content has no answer: a parse failure
    assert all(r["answer"] is None and "The answer is (B)." in r["text"] for r in rows)


def test_the_reasoning_choice_is_part_of_the_store_settings(tmp_path):
    def settings(mode: str) -> dict:
        return sampling_settings("openai:r1", SamplingConfig(reasoning=mode), {"kind": "mcq"})

    assert len({json.dumps(settings(m), sort_keys=True) for m in ("think", "plain", "drop")}) == 3
    # the default keeps the hash stores had before the choice existed
    assert "reasoning" not in settings("think") and settings("plain")["reasoning"] == "plain"

    with FakeOpenAIServer() as server:
        server.responder = lambda rec: Good(texts=[CONTENT], reasoning=[REASONING])
        stage(tmp_path, server, reasoning="drop")
        with pytest.raises(UserError, match="other settings"):  # a changed choice never reuses old traces
            stage(tmp_path, server, reasoning="think")


# ---------------------------------------------------------------------------------------------
# cost


def test_token_totals_reach_the_summary_and_metrics(tmp_path):
    with FakeOpenAIServer() as server:
        server.responder = lambda rec: Good(texts=[CONTENT] * int(rec.body["n"]), reasoning=[REASONING],
                                            tokens_per_choice=30, reasoning_tokens_per_choice=20, prompt_tokens=12)
        run, rows = stage(tmp_path, server)
        summary_calls = len(server.received)
    # 3 questions, K=2, one call a question: 3 x 12 prompt tokens, 6 x 30 completion of which 6 x 20 reasoning
    assert summary_calls == 3
    assert sum(r["prompt_tokens"] for r in rows) == 36
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (event,) = [e for e in events if e["event"] == "sampling"]
    assert (event["prompt_tokens"], event["completion_tokens"], event["reasoning_tokens"]) == (36, 180, 120)
    summary = run.teacher()  # a rerun finds it all on disk: nothing new, nothing spent
    assert summary.completion_tokens == 0 and summary.prompt_tokens == 0


def test_summary_rows_show_the_token_totals():
    from orpo_distill.sampling import SampleSummary

    rows = dict(SampleSummary(stage="teacher", prompt_tokens=36, completion_tokens=180, reasoning_tokens=120).rows())
    assert rows["prompt tokens (new samples)"] == "36"
    assert rows["completion tokens (new samples)"] == "180"
    assert rows["of which reasoning"] == "120"
    plain = dict(SampleSummary(stage="student/epoch_1", completion_tokens=5).rows())
    assert "prompt tokens (new samples)" not in plain and "of which reasoning" not in plain  # none reported
