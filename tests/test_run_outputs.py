"""What a run shows its user: the prompts the student read (prompts/), the end-of-run table's title, and
counts printed as counts in the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orpo_distill import report
from orpo_distill.cli import result_title
from orpo_distill.pipeline import Run

SMOLLM_OWN_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---- prompts/ ----------------------------------------------------------------------------------------


def test_the_student_stage_writes_every_prompt_as_the_student_reads_it(tiny_config: Any) -> None:
    """The template of SmolLM (the tiny model carries its tokenizer) adds a system prompt of its own when
    task.system_prompt is unset: prompts/student.jsonl is where the user sees that."""
    cfg = tiny_config(**{"student.sampling.samples": 1, "student.sampling.max_tokens": 2})
    run = Run(cfg, progress=False)
    run.student(epoch=1)
    rows = read_rows(run.dir / "prompts" / "student.jsonl")
    train, held_out, _ = run.splits
    assert [(r["id"], r["split"]) for r in rows] == [(r.id, "train") for r in train] + [(r.id, "eval") for r in held_out]
    first = rows[0]["prompt"]
    assert first.startswith(SMOLLM_OWN_SYSTEM) and first.endswith("<|im_start|>assistant\n")
    assert run.task.messages(train[0])[0]["content"] in first
    teacher = read_rows(run.dir / "prompts" / "teacher.jsonl")
    assert teacher[0] == {"id": train[0].id, "messages": run.task.messages(train[0])}
    assert len(teacher) == len(train)


def test_a_system_prompt_replaces_the_templates_own(tiny_config: Any) -> None:
    run = Run(tiny_config(**{"task.system_prompt": "Be brief."}), progress=False)
    run.write_prompts()
    prompt = read_rows(run.dir / "prompts" / "student.jsonl")[0]["prompt"]
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "SmolLM" not in prompt


def test_the_train_stage_writes_the_prompts_before_training(tiny_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from orpo_distill import recipe

    class NoTraining:
        def __init__(self, cfg: Any, layout: Any, *args: Any, **kwargs: Any) -> None:
            self.layout = layout

        def train(self, reuse: bool = False) -> dict[str, Any]:
            assert self.layout.prompts("student").is_file()
            return {"trained": True}

    monkeypatch.setattr(recipe, "Distiller", NoTraining)
    run = Run(tiny_config(), progress=False)
    assert run.train() == {"trained": True}


def test_a_remote_student_gets_the_messages_as_sent(tiny_config: Any, tmp_path: Path) -> None:
    replay = tmp_path / "student.jsonl"
    replay.write_text('{"id": "x", "text": "The answer is (A)."}\n', encoding="utf-8")
    run = Run(tiny_config(student={"kind": "replay", "path": str(replay)}), progress=False)
    run.write_prompts()
    row = read_rows(run.dir / "prompts" / "student.jsonl")[0]
    assert row["messages"] == run.task.messages(run.splits[0][0]) and "prompt" not in row
    completions = Run(tiny_config(run_dir=str(tmp_path / "c"), teacher={
        "kind": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "endpoint": "completions"}), progress=False)
    completions.write_prompts()
    assert read_rows(completions.dir / "prompts" / "teacher.jsonl")[0]["prompt"].startswith(
        completions.splits[0][0].question)


# ---- the end-of-run table's title --------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, title",
    [
        ({"train.method": "sft", "train.traces": "single"}, "SFT result: sft-single"),
        ({"train.method": "sft", "train.traces": "all"}, "SFT result: sft-diverse"),
        ({"pairs.negatives": "teacher"}, "ORPO result: orpo-teacher-neg"),
        ({"train.policy": "off"}, "ORPO result: orpo-off"),
        ({"train.policy": "on"}, "ORPO result: orpo-on"),
        ({"train.policy": "mixed", "train.phi": 0.25}, "ORPO result: orpo-mixed, phi 0.25"),
        ({"train.policy": "mixed", "train.phi": 0.5, "train.phi_schedule": "linear", "train.phi_start": 0.1},
         "ORPO result: orpo-mixed, phi linear 0.1 to 0.5"),
        ({"train.phi": 0.0}, "ORPO result: orpo-off"),
        ({"train.phi": 1.0}, "ORPO result: orpo-on"),
        ({"train.phi": [0.2, 0.6]}, "ORPO result: orpo-mixed, phi 0.2, 0.6"),
        ({"train.phi": {"linear": [0.1, 0.5]}}, "ORPO result: orpo-mixed, phi linear 0.1 to 0.5"),
        ({"train.policy": "on", "pairs.negatives": "both"}, "ORPO result: orpo-on, student and teacher negatives"),
    ],
)
def test_the_result_table_is_titled_by_method_and_variant(tiny_config: Any, overrides: dict, title: str) -> None:
    assert result_title(tiny_config(**overrides)) == title


# ---- counts in the report ------------------------------------------------------------------------------


def test_report_counts_are_integers_and_means_keep_their_decimal() -> None:
    assert [report.fmt_count(x) for x in (80.0, 72.0, 0.0, 80.5, 2.25, None, float("nan"))] == [
        "80", "72", "0", "80.5", "2.2", "n/a", "n/a"]
    table = report.refresh_table({"run": {2: {"phi": 0.5, "selected": 80.0, "refreshed": 72.0, "all_correct": 8.0,
                                               "fell_back_to_teacher": 0.0, "questions": 160.0}}})
    assert table.rows == [["run", "2", "0.50", "80", "72", "8", "0"]]


def test_a_rerun_leaves_unchanged_prompt_files_alone(tiny_config: Any) -> None:
    run = Run(tiny_config(), progress=False)
    run.write_prompts()
    path = run.dir / "prompts" / "student.jsonl"
    stamp = path.stat().st_mtime_ns
    again = Run(tiny_config(), progress=False)
    again.write_prompts()
    assert path.stat().st_mtime_ns == stamp
    changed = Run(tiny_config(**{"task.instruction": "Answer now."}), progress=False)
    changed.write_prompts()
    assert "Answer now." in read_rows(path)[0]["prompt"]
