"""The paper's protocol as options (issue 32): ROUGE-L near-duplicate rejection, the mixed policy
anchored to the initial student, and the dev split with its per-epoch curves and best-dev test."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from orpo_distill.config import build_config
from orpo_distill.datasets import load_all_splits, load_splits
from orpo_distill.errors import UserError
from orpo_distill.evaluation import best_dev_epoch
from orpo_distill.metrics import read_metrics
from orpo_distill.pairs import Negative, NegativeBuffer, choose_refresh, without_near_duplicates
from orpo_distill.pipeline import Run
from orpo_distill.provenance import training_settings
from orpo_distill.store import read_jsonl
from orpo_distill.text_similarity import lcs_length, near_duplicates, rouge_l, rouge_tokens


# ---- ROUGE-L ---------------------------------------------------------------------------------------


def _lcs_table(a: list[str], b: list[str]) -> int:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


def test_lcs_bit_parallel_equals_the_dynamic_programme() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randrange(0, 90))]
        b = [rng.choice("abcde") for _ in range(rng.randrange(0, 90))]
        assert lcs_length(a, b) == _lcs_table(a, b)


def test_rouge_l_by_hand() -> None:
    # tokens: [the, cat, sat, 17] and [the, cat, ran, 17]; LCS 3 (the cat 17): P = R = 3/4, F = 0.75
    assert rouge_tokens("The cat sat: 17!") == ["the", "cat", "sat", "17"]
    assert rouge_l("The cat sat: 17!", "the cat ran 17") == pytest.approx(0.75)
    # LCS 2 of 2 and 4 tokens: P = 1, R = 0.5, F = 2/3
    assert rouge_l("x = 4", "so x is 4") == pytest.approx(2 / 3)
    assert rouge_l("", "anything") == 0.0 and rouge_l("same words", "Same, words.") == 1.0


def test_rouge_l_matches_the_rouge_score_package() -> None:
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")  # installed with the dev extra
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    texts = ["Tom has 12 apples. He gives 5 away, so 12 - 5 = 7. The answer is (B).",
             "Start with 12 apples; giving away 5 leaves 12 - 5 = 7 apples. The answer is (B).",
             "12 + 5 = 17, so the answer is (D).", "I think it's 7.", "", "The answer is (B)."]
    for a in texts:
        for b in texts:
            assert rouge_l(a, b) == pytest.approx(scorer.score(a, b)["rougeL"].fmeasure, abs=1e-12)


def test_near_duplicates_keeps_the_first_of_each_group() -> None:
    texts = ["a b c d e", "a b c d x", "p q r s t", "a b c d e", "p q r s"]
    # 1 vs 0: LCS 4 of 5, F 0.8 (not above 0.8: kept); 3 == 0 (dropped); 4 vs 2: 2*4/9 = 0.89 (dropped)
    assert near_duplicates(texts, 0.8) == [3, 4]
    assert near_duplicates(texts, 0.79) == [1, 3, 4]
    assert near_duplicates(texts, 1.0) == []


def test_without_near_duplicates_compares_within_each_kind() -> None:
    traces = [{"text": "x = 3 + 4 = 7. The answer is 7.", "correct": True},
              {"text": "x = 3 + 4 = 8. The answer is 8.", "correct": False},  # close to the positive: kept
              {"text": "x = 3 + 4 = 7. The answer is 7!", "correct": True},  # the same words as 0
              {"text": "x = 3 + 4 = 8, the answer is 8", "correct": False}]  # the same words as 1
    kept, dropped = without_near_duplicates(traces, 0.8)
    assert dropped == 2 and kept == [traces[0], traces[1]]
    assert without_near_duplicates(traces, None) == (traces, 0)


# ---- the anchored mixed policy ---------------------------------------------------------------------


def test_refresh_anchor_returns_the_others_to_the_initial_negatives() -> None:
    initial = {"a": [Negative("a0", "student", 1)], "b": [Negative("b0", "student", 1)],
               "c": [Negative("c0", "student", 1)]}
    buf = NegativeBuffer({"a": [Negative("a2", "student", 2)], "b": [Negative("b2", "student", 2)],
                          "c": [Negative("c2", "student", 2)]})
    traces = {"a": [{"text": "a3", "correct": False}], "b": [{"text": "right", "correct": True}]}
    result = buf.refresh(traces, epoch=3, filter="incorrect", anchor=initial)
    assert (result.refreshed, result.all_correct) == (1, 1)
    assert buf.negatives == {"a": [Negative("a3", "student", 3)],  # resampled
                             "b": initial["b"],  # resampled, all right: back to the anchor
                             "c": initial["c"]}  # not resampled: back to the anchor, not c2
    # without an anchor the others keep what they held (the previous policy)
    buf = NegativeBuffer({"c": [Negative("c2", "student", 2)]})
    buf.refresh({}, epoch=3, filter="incorrect")
    assert buf.negatives["c"] == [Negative("c2", "student", 2)]


FAST = {
    "dataset.train_size": 4, "dataset.eval_size": 2,
    "teacher.error_rate": 0.0, "student.sampling.max_tokens": 4, "student.sampling.samples": 2,
    "pairs.negatives": "student", "pairs.pairs_per_question": 1, "train.batch_size": 8,
    "train.precision": "fp32", "train.max_length": 128, "eval.every_epoch": False, "eval.before_training": False,
}


@pytest.mark.slow
@pytest.mark.parametrize("unrefreshed", ["initial", "previous"])
def test_four_epochs_of_the_mixed_policy(tiny_config: Any, unrefreshed: str) -> None:
    """phi 0.5 over 4 epochs: each epoch's rejected side comes from this refresh for the questions drawn
    now, and for the others from the initial student (initial) or from their own last refresh (previous)."""
    cfg = tiny_config(**FAST, **{"train.epochs": 4, "train.phi": 0.5, "train.unrefreshed": unrefreshed})
    run = Run(cfg, progress=False)
    run.run_all()
    qids = sorted(r.id for r in run.train_records)
    last = {q: 1 for q in qids}  # the epoch each question's negatives were last sampled before
    for epoch in (2, 3, 4):
        drawn = set(choose_refresh(qids, 0.5, cfg.seed, epoch))
        assert len(drawn) == 2
        for q in qids:
            last[q] = epoch if q in drawn else (1 if unrefreshed == "initial" else last[q])
        pairs = {r["id"]: r for r in read_jsonl(run.dir / "pairs" / f"epoch_{epoch}.jsonl")}
        assert {q: pairs[q]["rejected_epoch"] for q in qids} == last, f"epoch {epoch}"
        initial = {s["text"] for s in read_jsonl(run.dir / "student" / "epoch_1.jsonl")}
        for q in qids:
            if last[q] == 1:
                assert pairs[q]["rejected"][0]["content"] in initial
    if unrefreshed == "previous":  # the premise that tells the two apart: some question kept an older refresh
        assert any(r["rejected_epoch"] in (2, 3) for r in read_jsonl(run.dir / "pairs" / "epoch_4.jsonl"))
    events = [e for e in read_metrics(run.dir / "metrics.jsonl") if e["event"] == "refresh"]
    assert [e["unrefreshed"] for e in events] == [unrefreshed] * 3


# ---- the dev split -----------------------------------------------------------------------------------


def test_dev_split_is_carved_from_the_held_out_questions() -> None:
    cfg = build_config({"dataset": {"kind": "synthetic", "train_size": 5, "eval_size": 6, "dev_size": 3}}, "t")
    splits = load_all_splits(cfg.dataset)
    plain_train, plain_eval = load_splits(cfg.dataset.model_copy(update={"dev_size": None}))
    assert [r.id for r in splits.train] == [r.id for r in plain_train]
    assert [r.id for r in splits.eval] == [r.id for r in plain_eval]  # the test split: the same questions
    assert len(splits.dev) == 3 and not {r.id for r in splits.dev} & {r.id for r in [*splits.eval, *splits.train]}
    with pytest.raises(UserError, match="dev_size"):
        load_all_splits(cfg.dataset.model_copy(update={"eval_size": None, "dev_size": 500_000}))


def test_best_dev_epoch_is_the_earliest_best() -> None:
    summaries = {"dev_epoch_0": {"accuracy": 0.9}, "dev_epoch_1": {"accuracy": 0.4}, "dev_epoch_2": {"accuracy": 0.6},
                 "dev_epoch_3": {"accuracy": 0.6}, "eval_epoch_3": {"accuracy": 0.99}}
    assert best_dev_epoch(summaries, 3) == 2  # epoch 0 (untrained) and the test split do not count
    assert best_dev_epoch({"eval_epoch_1": {"accuracy": 1.0}}, 3) is None


@pytest.mark.slow
def test_a_run_with_a_dev_split(tiny_config: Any) -> None:
    cfg = tiny_config(**{**FAST, "dataset.dev_size": 3, "train.epochs": 3, "train.phi": 0.5,
                         "eval.every_epoch": True, "eval.before_training": True, "pairs.dedup_rouge_l": 0.8})
    run = Run(cfg, progress=False)
    run.run_all()
    summaries = run.eval_summaries()
    assert {f"dev_epoch_{e}" for e in range(4)} <= set(summaries)
    assert {"eval_epoch_0", "eval_epoch_3"} <= set(summaries)
    assert all(summaries[f"dev_epoch_{e}"]["n"] == 3 and summaries[f"eval_epoch_{e}"]["n"] == 2 for e in (0, 3))
    for e in range(4):  # the dev positives' log-probability, from one teacher trace per dev question
        assert summaries[f"dev_epoch_{e}"]["chosen_logp_n"] == 3
        assert math.isfinite(summaries[f"dev_epoch_{e}"]["chosen_logp"]) and summaries[f"dev_epoch_{e}"]["chosen_logp"] < 0
    best = best_dev_epoch(summaries, 3)
    assert f"eval_epoch_{best}" in summaries  # the test split at the epoch dev would pick
    assert len(list(read_jsonl(run.layout.teacher_dev_traces))) == 3
    dedup = [e for e in read_metrics(run.dir / "metrics.jsonl") if e["event"] == "dedup"]
    assert {e["source"] for e in dedup} == {"teacher", "student@1"}

    # a kill between epoch 2's checkpoint and the end of its evaluation: the rerun makes the evaluation from
    # the checkpoint (a hole in the curve would hide an epoch from the best-dev choice)
    import json

    (run.layout.eval_rows("dev", 2)).unlink()
    stored = json.loads(run.layout.eval_summary.read_text())
    del stored["dev_epoch_2"]
    run.layout.eval_summary.write_text(json.dumps(stored))
    again = Run(cfg, progress=False)
    again.run_all()
    remade, before = again.eval_summaries()["dev_epoch_2"], summaries["dev_epoch_2"]
    for k in ("n", "correct", "accuracy", "chosen_logp", "settings_hash"):  # the same weights, the same result
        assert remade[k] == before[k], k
    assert [e["epoch"] for e in read_metrics(run.dir / "metrics.jsonl") if e["event"] == "eval_missed"] == [2]


def test_the_new_settings_leave_older_runs_hashes_alone(tiny_config: Any) -> None:
    """At their defaults the settings added for the paper's protocol are not in the training settings,
    so runs trained before them still match their configs; away from the defaults they are."""
    plain = training_settings(tiny_config())
    assert "unrefreshed" not in plain["train"] and "dedup_rouge_l" not in plain["pairs"]
    assert "dev_size" not in plain["dataset"]
    paper = training_settings(tiny_config(**{"train.unrefreshed": "initial", "pairs.dedup_rouge_l": 0.8,
                                             "dataset.dev_size": 2}))
    assert (paper["train"]["unrefreshed"], paper["pairs"]["dedup_rouge_l"], paper["dataset"]["dev_size"]) == (
        "initial", 0.8, 2)


# ---- the comparison with a dev split -------------------------------------------------------------------


@pytest.mark.slow
def test_a_comparison_with_a_dev_split_reads_curves_and_the_best_dev_epoch(tiny_config: Any, tmp_path: Any) -> None:
    from orpo_distill.compare import run_comparison
    from orpo_distill.layout import CompareLayout

    base = tiny_config(**{**FAST, "dataset.dev_size": 3, "train.epochs": 2, "eval.every_epoch": True,
                          "eval.max_tokens": 6, "train.lr": 1e-3})
    out = tmp_path / "cmp"
    result = run_comparison(base, ["sft-diverse", "orpo-mixed"], [0, 1], out, progress=False, log=lambda _: None)
    assert result["base_dev"]["seeds"] == [0, 1] and result["base_dev"]["chosen_logp"] < 0
    for name in ("sft-diverse", "orpo-mixed"):
        v = result["variants"][name]
        assert sorted(v["per_epoch_dev"]) == ["0", "1", "2"] and v["per_epoch_dev"]["2"]["seeds"] == [0, 1]
        assert v["per_epoch_dev"]["0"]["accuracy"] == result["base_dev"]["accuracy"]  # the shared base evaluation
        # the curve is the mean of the runs' own dev evaluations
        for e in ("1", "2"):
            accs = [json_load(out / run / "eval" / "summary.json")[f"dev_epoch_{e}"]["accuracy"]
                    for run in result["runs"][name].values()]
            assert v["per_epoch_dev"][e]["accuracy"] == pytest.approx(sum(accs) / len(accs))
        # each seed's best dev epoch, and the test split evaluated there
        for seed, run in result["runs"][name].items():
            summaries = json_load(out / run / "eval" / "summary.json")
            assert v["best_dev"]["epoch_per_seed"][seed] == best_dev_epoch(summaries, 2)
    assert [(p["variant"], p["reference"]) for p in result["paired_best_dev"]] == [("orpo-mixed", "sft-diverse")]
    md = CompareLayout(out).comparison_md.read_text()
    assert "## Dev accuracy per epoch" in md and "## At the best dev epoch" in md
    assert "log-probability per epoch" in md
    assert (out / "plots" / "chosen_logp_per_epoch.png").is_file() or any(out.rglob("chosen_logp_per_epoch.png"))


def json_load(path: Any) -> Any:
    import json

    return json.loads(path.read_text())
