"""The mixed-policy refresh, through the real Run and Distiller on the tiny student.

phi 0, 0.5 and 1 regenerate exactly 0, half and all of the questions' negatives at each refresh, and
the refreshed ones come from the current weights: the student as it is after the previous epoch,
which is what ``checkpoints/epoch_{E-1}`` holds, not the initial student.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from orpo_distill import recipe
from orpo_distill.errors import UserError
from orpo_distill.generators.hf import HFGenerator
from orpo_distill.metrics import read_metrics
from orpo_distill.pairs import Negative, NegativeBuffer
from orpo_distill.pipeline import Run
from orpo_distill.store import read_jsonl

FAST = {
    "dataset.train_size": 4,
    "dataset.eval_size": 2,
    "teacher.error_rate": 0.0,  # every question has a positive; the student negatives are what is tested
    "student.sampling.max_tokens": 4,
    "student.sampling.samples": 2,
    "pairs.negatives": "student",
    "pairs.pairs_per_question": 1,
    "train.epochs": 3,
    "train.batch_size": 8,
    "train.precision": "fp32",
    "train.lr": 1e-3,
    "train.warmup_ratio": 0.0,  # with warmup the single step of epoch 1 has lr 0 and changes nothing
    "train.max_length": 128,
    "eval.every_epoch": False,
    "eval.before_training": False,
}


class RecordingGenerator(HFGenerator):
    """The refresh's generator, recording the weights it sampled from at the moment it sampled."""

    calls: list[dict[str, Any]] = []

    def generate(self, requests: Any) -> Any:
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        out = super().generate(requests)
        RecordingGenerator.calls.append({
            "name": self.name, "model": self.model, "state": state,
            "keys": [r.key for r in requests], "texts": {r.key: [s.text for s in o] for r, o in zip(requests, out)},
        })
        return out


@pytest.mark.slow
@pytest.mark.parametrize("policy, phi, refreshed", [("off", 0.5, 0), ("mixed", 0.5, 2), ("on", 0.0, 4)])
def test_refresh_regenerates_phi_of_the_questions_from_the_current_weights(
    tiny_config: Any, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, policy: str, phi: float, refreshed: int
) -> None:
    # off ignores phi (0), on ignores it too (1): the phi passed is the "wrong" one on purpose
    RecordingGenerator.calls = []
    trained: list[Any] = []
    real_train_epoch = recipe.train_epoch

    def recording_train_epoch(model: Any, *args: Any, **kw: Any) -> Any:
        trained.append(model)
        return real_train_epoch(model, *args, **kw)

    monkeypatch.setattr(recipe, "HFGenerator", RecordingGenerator)
    monkeypatch.setattr(recipe, "train_epoch", recording_train_epoch)
    run = Run(tiny_config(**{**FAST, "train.policy": policy, "train.phi": phi}), progress=False)
    run.teacher()
    run.student(epoch=1)
    run.train()

    qids = [r.id for r in run.train_records]
    refresh_events = {e["epoch"]: e for e in read_metrics(run.dir / "metrics.jsonl") if e["event"] == "refresh"}
    assert sorted(refresh_events) == [2, 3]
    initial = load_file(str(tiny_model_dir / "model.safetensors"))
    # the buffer as the files show it: each question's student samples from its last refresh
    buffer = {q: {s["text"] for s in read_jsonl(run.dir / "student" / "epoch_1.jsonl") if s["id"] == q} for q in qids}
    epoch_1 = {r["id"]: r for r in read_jsonl(run.dir / "pairs" / "epoch_1.jsonl")}
    assert sorted(epoch_1) == sorted(qids), "premise: every question has a positive and a negative"
    assert all(r["rejected"][0]["content"] in buffer[q] for q, r in epoch_1.items())
    assert {r["rejected_epoch"] for r in read_jsonl(run.dir / "pairs" / "epoch_1.jsonl")} == {1}

    calls = iter(RecordingGenerator.calls)
    for epoch in (2, 3):
        event = refresh_events[epoch]
        assert event["questions"] == 4 and event["selected"] == refreshed
        assert event["refreshed"] == refreshed and event["all_correct"] == 0
        assert event["phi"] == {"off": 0.0, "mixed": 0.5, "on": 1.0}[policy]
        store = run.dir / "student" / f"epoch_{epoch}.jsonl"
        pairs = {r["id"]: r for r in read_jsonl(run.dir / "pairs" / f"epoch_{epoch}.jsonl")}
        assert sorted(pairs) == sorted(qids)
        fresh_ids = {q for q, r in pairs.items() if r["rejected_epoch"] == epoch}
        if refreshed == 0:
            assert not store.exists()
            assert fresh_ids == set()
        else:
            samples = list(read_jsonl(store))
            regenerated = {s["id"] for s in samples}
            assert len(regenerated) == refreshed
            assert all(sum(s["id"] == q for s in samples) == 2 for q in regenerated)
            assert {s["generator"] for s in samples} == {f"hf:student@epoch_{epoch - 1}"}
            assert fresh_ids == regenerated
            # the refreshed negatives are the samples the current student just wrote
            for q in regenerated:
                assert pairs[q]["rejected"][0]["content"] in {s["text"] for s in samples if s["id"] == q}
                buffer[q] = {s["text"] for s in samples if s["id"] == q}
            # ... and they came from the weights after epoch E-1: the model being trained, as checkpointed
            call = next(calls)
            assert sorted(call["keys"]) == sorted(regenerated)
            assert call["model"] is trained[epoch - 2], "sampled from another model object than the one trained"
            saved = load_file(str(run.dir / "checkpoints" / f"epoch_{epoch - 1}" / "model.safetensors"))
            for k, v in saved.items():
                assert torch.equal(call["state"][k], v), f"refresh before epoch {epoch}: {k} is not epoch {epoch - 1}'s"
            assert any(not torch.equal(call["state"][k], v) for k, v in initial.items()), "sampled from the initial weights"
        # the others keep the negatives they had
        for q in set(qids) - fresh_ids:
            assert pairs[q]["rejected_epoch"] < epoch
            assert pairs[q]["rejected"][0]["content"] in buffer[q]
    assert next(calls, None) is None, "the refresh generated more often than it should"


def test_a_short_phi_list_fails_before_training(tiny_config: Any) -> None:
    run = Run(tiny_config(**{**FAST, "train.phi": [0.5]}), progress=False)
    run.teacher()
    run.student(epoch=1)
    with pytest.raises(UserError, match="train.phi"):
        run.train()
    assert not (run.dir / "checkpoints").exists()


# ---- when the current student gets every sample right ------------------------------------------------


def _traces(*correct: bool) -> list[dict[str, Any]]:
    return [{"text": f"sample {i} {'right' if c else 'wrong'}", "correct": c} for i, c in enumerate(correct)]


def test_refresh_when_all_correct_keeps_the_old_negatives() -> None:
    old = {"a": [Negative("a old", "student", 1)], "b": [Negative("b old", "student", 1)], "c": [Negative("c old", "student", 1)]}
    buf = NegativeBuffer({k: list(v) for k, v in old.items()})
    result = buf.refresh({"a": _traces(True, True), "b": _traces(True, False)}, epoch=2, filter="incorrect",
                         when_all_correct="keep", teacher_negs={"a": [Negative("a teacher", "teacher")]})
    assert (result.refreshed, result.all_correct, result.fell_back_to_teacher) == (1, 1, 0)
    assert buf.negatives["a"] == old["a"]
    assert buf.negatives["b"] == [Negative("sample 1 wrong", "student", 2)]
    assert buf.negatives["c"] == old["c"]  # not selected: untouched


def test_refresh_when_all_correct_falls_back_to_teacher_negatives() -> None:
    buf = NegativeBuffer({"a": [Negative("a old", "student", 1)], "b": [Negative("b old", "student", 1)]})
    teacher = {"a": [Negative("a teacher", "teacher")], "b": []}
    result = buf.refresh({"a": _traces(True, True), "b": _traces(True)}, epoch=3, filter="incorrect",
                         when_all_correct="teacher", teacher_negs=teacher)
    assert (result.refreshed, result.all_correct, result.fell_back_to_teacher) == (0, 2, 1)
    assert buf.negatives["a"] == [Negative("a teacher", "teacher")]
    assert buf.negatives["b"] == [Negative("b old", "student", 1)]  # no teacher negative either: keep


def test_refresh_filter_any_keeps_right_samples_as_negatives() -> None:
    buf = NegativeBuffer({"a": [Negative("a old", "student", 1)]})
    result = buf.refresh({"a": _traces(True, True)}, epoch=2, filter="any")
    assert (result.refreshed, result.all_correct) == (1, 0)
    assert [n.text for n in buf.negatives["a"]] == ["sample 0 right", "sample 1 right"]


def test_initial_buffer_uses_teacher_negatives_when_configured(tiny_config: Any) -> None:
    """Before epoch 1: a question whose initial student samples are all right takes the teacher's
    negatives under ``when_all_correct: teacher`` and keeps none under ``keep``."""
    for mode, expected_source in (("keep", None), ("teacher", "teacher")):
        cfg = tiny_config(**{**FAST, "dataset.train_size": 1, "train.when_all_correct": mode,
                             "run_dir": str(Path(tiny_config().run_dir).parent / mode)})
        run = Run(cfg, progress=False)
        qid = run.train_records[0].id
        run.teacher_store().append([
            {"id": qid, "sample": 0, "text": "right", "answer": "A", "correct": True, "finish_reason": "stop"},
            {"id": qid, "sample": 1, "text": "teacher wrong", "answer": "B", "correct": False, "finish_reason": "stop"},
        ])
        run.student_store(1).append([{"id": qid, "sample": i, "text": "student right", "answer": "A", "correct": True}
                                     for i in range(2)])
        d = run.distiller()
        buf = d.initial_buffer()
        if expected_source is None:
            assert buf.negatives[qid] == []
        else:
            assert buf.negatives[qid] == [Negative("teacher wrong", "teacher")]
