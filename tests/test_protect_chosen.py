"""Chosen-side protection (``train.protect_chosen``, issue 33 design 3; DPO-Positive carried over to ORPO):
the loss checked by hand, its gradient, the reference values carried through both layouts, and a real
run that computes the references once and logs the chosen side's drop."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from orpo_distill.batching import TokenizedPair, collate_packed, collate_plain, group_pairs
from orpo_distill.chosen_logp import mean_response_logp, response_logps
from orpo_distill.losses import orpo_loss
from orpo_distill.metrics import read_metrics
from orpo_distill.pipeline import Run
from orpo_distill.store import read_jsonl

from test_paper_protocol import FAST


def _lo(l: float) -> float:
    return l - math.log(1 - math.exp(l))


def _loss(c_mean: float, r_mean: float, ref: float | None, mu: float):
    one = torch.tensor([1.0])
    c = torch.tensor([c_mean], requires_grad=True)
    out = orpo_loss(c, one, torch.tensor([r_mean]), one, -c, one, lambda_or=1.0,
                    chosen_ref=None if ref is None else torch.tensor([ref]), protect=mu)
    return out, c


def test_the_protected_logit_by_hand() -> None:
    # chosen -0.5 has fallen 0.1 below its reference -0.4: the logit loses mu * 0.1
    out, _ = _loss(-0.5, -1.0, -0.4, mu=2.0)
    logit = _lo(-0.5) - _lo(-1.0) - 2.0 * 0.1
    assert float(out.or_loss.detach()) == pytest.approx(-math.log(1 / (1 + math.exp(-logit))), rel=1e-6)
    assert float(out.chosen_drop) == pytest.approx(0.1, rel=1e-5)
    assert float(out.log_odds_ratio[0]) == pytest.approx(_lo(-0.5) - _lo(-1.0), rel=1e-6)  # logged plain
    assert out.metrics()["chosen_drop"] == pytest.approx(0.1, rel=1e-5)
    # above its reference, or mu 0, or no reference: plain ORPO
    plain = float(-F.logsigmoid(torch.tensor(_lo(-0.5) - _lo(-1.0))))
    for ref, mu in ((-0.6, 2.0), (-0.4, 0.0), (None, 2.0)):
        out, _ = _loss(-0.5, -1.0, ref, mu)
        assert float(out.or_loss.detach()) == pytest.approx(plain, rel=1e-6)
    assert "chosen_drop" not in _loss(-0.5, -1.0, None, 0.0)[0].metrics()


def test_below_its_reference_the_chosen_side_is_pulled_up_harder() -> None:
    grads = {}
    for mu in (0.0, 5.0):
        out, c = _loss(-0.5, -1.0, -0.4, mu)
        out.or_loss.backward()
        grads[mu] = float(c.grad)
    assert grads[0.0] < 0 and grads[5.0] < grads[0.0]  # descent raises c, and more so when protected


def test_a_pair_without_its_reference_is_an_error_not_a_silent_zero() -> None:
    one = torch.tensor([1.0, 1.0])
    with pytest.raises(ValueError, match="chosen_ref is missing"):
        orpo_loss(-one, one, -2 * one, one, one, one, 1.0, chosen_ref=torch.tensor([-0.4, math.nan]), protect=1.0)
    # an NLL-only row needs none: it takes no part in the term
    out = orpo_loss(-one, one, -2 * one, one, one, one, 1.0, has_rejected=torch.tensor([True, False]),
                    chosen_ref=torch.tensor([-0.4, math.nan]), protect=1.0)
    assert math.isfinite(float(out.loss))


def test_both_layouts_carry_each_pairs_reference() -> None:
    pairs = [TokenizedPair([1, 2], [3, 4], [5], chosen_ref=-0.25), TokenizedPair([1, 2], [6], [7, 8], chosen_ref=-0.5),
             TokenizedPair([9], [10], [], chosen_ref=None)]
    assert collate_plain(pairs, 0, False)["chosen_ref"][:2].tolist() == [-0.25, -0.5]
    assert math.isnan(collate_plain(pairs, 0, False)["chosen_ref"][2])
    packed = collate_packed(group_pairs(pairs), 0, False)["chosen_ref"]
    assert packed[:2].tolist() == [-0.25, -0.5] and math.isnan(packed[2])


def test_response_logps_keep_the_order_given_and_average_to_the_mean(prompt_sensitive_model, tiny_model_dir) -> None:
    from orpo_distill.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    items = [([{"role": "user", "content": "q1"}], "a much longer answer than the other one"),
             ([{"role": "user", "content": "q2"}], "short")]
    values = response_logps(prompt_sensitive_model, tok, items, 128, bf16=False)
    swapped = response_logps(prompt_sensitive_model, tok, items[::-1], 128, bf16=False)
    assert values == pytest.approx(swapped[::-1], abs=1e-6) and values[0] != pytest.approx(values[1])
    assert mean_response_logp(prompt_sensitive_model, tok, items, 128, bf16=False) == pytest.approx(sum(values) / 2)


@pytest.mark.slow
def test_a_protected_run_keeps_its_references_and_logs_the_drop(tiny_config: Any) -> None:
    cfg = tiny_config(**{**FAST, "train.epochs": 2, "train.protect_chosen": 5.0, "pairs.pairing": "every_positive"})
    run = Run(cfg, progress=False)
    run.run_all()
    refs = list(read_jsonl(run.layout.chosen_reference))
    teacher = [r for r in read_jsonl(run.layout.teacher_traces) if r["correct"]]
    assert {(r["id"], r["text"]) for r in refs} == {(r["id"], r["text"]) for r in teacher}
    assert all(r["logp"] < 0 for r in refs)
    by_key = {(r["id"], r["text"]): r["logp"] for r in refs}
    # the weights the term started from: here (no SFT stage) the initial student's
    from orpo_distill.models import load_model, load_tokenizer

    initial = load_model(cfg.student.model, dtype="float32")
    records = {r.id: r for r in run.train_records}
    items = [(run.task.messages(records[r["id"]]), r["text"]) for r in refs[:3]]
    expected = response_logps(initial, load_tokenizer(cfg.student.model), items, cfg.train.max_length, bf16=False)
    assert [r["logp"] for r in refs[:3]] == pytest.approx(expected, abs=1e-5)
    for epoch in (1, 2):  # every pair row carries its chosen side's reference, the same both epochs
        for row in read_jsonl(run.dir / "pairs" / f"epoch_{epoch}.jsonl"):
            if row["rejected"]:
                assert row["chosen_ref_logp"] == by_key[(row["id"], row["chosen"][0]["content"])]
    steps = [e for e in read_metrics(run.dir / "metrics.jsonl") if e["event"] == "train"]
    assert steps and all("chosen_drop" in e and e["chosen_drop"] >= 0 for e in steps)
    assert [e["event"] for e in read_metrics(run.dir / "metrics.jsonl")].count("chosen_reference") == 1


def test_protected_arms_do_not_share_a_first_epoch(tiny_config: Any) -> None:
    """Their references come from the weights the term started with, which a shared epoch 1 does not carry."""
    from orpo_distill.compare.first_epoch import first_epoch_key

    staged = {"pairs.negatives": "student", "train.epochs": 3}
    assert first_epoch_key(tiny_config(**staged)) is not None
    assert first_epoch_key(tiny_config(**staged, **{"train.protect_chosen": 5.0})) is None
