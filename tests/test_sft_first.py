"""SFT first, then the odds-ratio term (``train.sft_epochs``, issue 33 design 1): the settings, and a
real run whose first epochs train on every correct teacher trace, whose term's negatives come from the
SFT'd student, and whose refreshes and anchor count from there. The kill-and-resume check of the two
stages is in test_resume.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from orpo_distill.config import TrainConfig
from orpo_distill.epoch_rows import chosen_texts
from orpo_distill.metrics import read_metrics
from orpo_distill.pairs import choose_refresh, positives
from orpo_distill.pipeline import Run
from orpo_distill.provenance import training_settings, uses_initial_student
from orpo_distill.store import read_jsonl

from test_paper_protocol import FAST

pytestmark = pytest.mark.slow  # whole runs or several processes: left out of `make test-fast`


def test_the_sft_stage_leaves_the_term_at_least_one_epoch_and_is_for_orpo() -> None:
    assert TrainConfig(epochs=5, sft_epochs=3).sft_epochs == 3
    with pytest.raises(ValidationError, match="must be below train.epochs"):
        TrainConfig(epochs=3, sft_epochs=3)
    with pytest.raises(ValidationError, match="for method orpo"):
        TrainConfig(method="sft", epochs=3, sft_epochs=1)


def test_the_sft_stage_enters_the_settings_only_when_set_and_drops_the_initial_students_samples(tiny_config: Any) -> None:
    plain = tiny_config(**{"pairs.negatives": "student"})
    staged = tiny_config(**{"pairs.negatives": "student", "train.epochs": 3, "train.sft_epochs": 1})
    assert "sft_epochs" not in training_settings(plain)["train"]  # archived runs keep their hashes
    assert training_settings(staged)["train"]["sft_epochs"] == 1
    assert uses_initial_student(plain) and not uses_initial_student(staged)
    # the SFT'd student's samples are drawn with the same sampling settings: they still guard the weights
    assert training_settings(staged)["student_traces"] == training_settings(plain)["student_traces"] is not None
    assert staged.samples_student_in_training and not tiny_config(**{"train.epochs": 1}).samples_student_in_training


@pytest.mark.slow
def test_two_sft_epochs_then_the_term_on_the_sft_students_negatives(tiny_config: Any) -> None:
    cfg = tiny_config(**FAST, **{"train.epochs": 4, "train.sft_epochs": 2, "train.phi": 0.5,
                                 "train.unrefreshed": "initial", "pairs.pairing": "every_positive"})
    run = Run(cfg, progress=False)
    run.run_all()
    d = run.dir
    assert not (d / "student" / "epoch_1.jsonl").exists()  # the untrained student is never sampled
    teacher = {}
    for row in read_jsonl(d / "teacher" / "traces.jsonl"):
        teacher.setdefault(row["id"], []).append(row)
    every_positive = {q: positives(rows) for q, rows in teacher.items() if positives(rows)}
    for epoch in (1, 2):  # what sft-diverse trains on: every correct trace, as SFT targets
        rows = list(read_jsonl(d / "pairs" / f"epoch_{epoch}.jsonl"))
        assert all("completion" in r for r in rows)
        assert {q: sorted(t) for q, t in chosen_texts(rows).items()} == {q: sorted(t) for q, t in every_positive.items()}
    qids = sorted(every_positive)
    stage = {r["id"] for r in read_jsonl(d / "student" / "epoch_3.jsonl")}
    assert stage == set(qids)  # every question's negatives from the SFT'd student
    assert {r["generator"] for r in read_jsonl(d / "student" / "epoch_3.jsonl")} == {"hf:student@epoch_2"}
    third = list(read_jsonl(d / "pairs" / "epoch_3.jsonl"))
    assert third and all(r["rejected_epoch"] == 3 for r in third if r["rejected"])
    drawn = set(choose_refresh(qids, 0.5, cfg.seed, 4))
    for r in read_jsonl(d / "pairs" / "epoch_4.jsonl"):
        if r["rejected"]:  # drawn now: this refresh's; the others: back to the SFT'd student's (the anchor)
            assert r["rejected_epoch"] == (4 if r["id"] in drawn else 3), r["id"]
    events = read_metrics(d / "metrics.jsonl")
    assert [e["epoch"] for e in events if e["event"] == "stage_negatives"] == [3]
    assert [(e["epoch"], e["phi"]) for e in events if e["event"] == "refresh"] == [(4, 0.5)]
    assert (d / "model" / "model.safetensors").is_file()
