"""Error-localised negatives (``pairs.rejected_span: first_error``, issue 33 design 2): the first-error
locator on examples, the rows that carry it, the token position it becomes, and the odds-ratio term's
rejected side computed from there on in both layouts, checked against log-probabilities read by hand."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

from orpo_distill.batching import PairGroup, TokenizedPair, collate_packed, collate_plain, group_pairs, token_at, \
    tokenize_pair, truncate_pair
from orpo_distill.config import PairsConfig, TrainConfig
from orpo_distill.epoch_rows import epoch_rows
from orpo_distill.forward import pair_logps, pair_logps_packed
from orpo_distill.pairs import Negative
from orpo_distill.records import Record
from orpo_distill.tasks import build_task
from orpo_distill.tasks.steps import evaluate, first_arithmetic_error, first_mapping_error

from test_batching import VOCAB, tiny_model

# Greedy outputs of a trained SmolLM2-135M student that the task marked wrong (docs/results/archive/
# compare-synthetic/sft-diverse/seed_0/eval/eval_epoch_2.jsonl and compare-numeric's), with what the
# locator must point at.
REAL_ERRORS = [
    ("The bakery starts with 16 cakes. It sells 2, making it 16 - 2 = 14. Then it bakes 5 more, making it "
     "14 + 5 = 29. The bakery has 29 cakes.", "14 + 5 = 29"),
    ("Begin with 17 cookies.\n17 - 3 = 12\n12 - 1 = 11\nResult: 11.", "17 - 3 = 12"),
    ("Step 1: He gives away 10. 24 - 10 = 14.\nStep 2: He gives 7 to Lily. 14 - 7 = 6.\nStep 3: He finds 10 "
     "more. 6 + 10 = 16.\nSo Omar ends with 16 marbles.\nThe answer is 16.", "14 - 7 = 6"),
    ("Step 1: He finds 1 more. 3 + 1 = 4.\nStep 2: He buys 4 more. 4 + 4 = 8.\nStep 3: He buys 12 more. "
     "8 + 12 = 10.\nSo Leo ends with 10 shells.\nThe answer is 10.", "8 + 12 = 10"),
]


@pytest.mark.parametrize("text,wrong", REAL_ERRORS)
def test_the_locator_points_at_the_first_wrong_equation_of_real_student_errors(text: str, wrong: str) -> None:
    assert first_arithmetic_error(text) == text.index(wrong)


def test_right_traces_and_traces_without_equations_have_no_located_error() -> None:
    right = ("Let x count the stickers Ana has. At first x = 14. She finds 1 more: x = 14 + 1 = 15. She gives away "
             "3: x = 15 - 3 = 12. So x = 12.\nThe options are (A) 12, (B) 10, (C) 18, (D) 15; 12 is (A).")
    assert first_arithmetic_error(right) is None
    assert first_arithmetic_error("Ana has 14 stickers and gives some away. The answer is (B).") is None
    assert first_arithmetic_error("Natalia sold 48/2 = <<48/2=24>>24 clips, 48+24 = <<48+24=72>>72 in all.") is None
    assert first_arithmetic_error("1,200 + 300 = 1,500 and 2.5 * 4 = 10.0, 3 x 4 = 12, 10 ÷ 4 = 2.5") is None


def test_running_totals_precedence_annotations_and_division_by_zero() -> None:
    text = "x = 14 + 1 = 15 + 3 = 19"
    assert text[first_arithmetic_error(text):] == "15 + 3 = 19"  # the second link of the running total
    assert first_arithmetic_error("2 + 3 * 4 = 20") == 0  # 14, not (2 + 3) * 4
    assert first_arithmetic_error("so <<6*7=43>>43 eggs") == 5
    assert first_arithmetic_error("then 5 / 0 = 0") == 5
    assert first_arithmetic_error("it is 7 - 9 = -2, then 3 - 5 = −2") is None
    assert evaluate("2 + 3 * 4 - 6 / 3") == Fraction(12)
    # right steps never flagged: fractions and products on the right, a sign before the left, rounded decimals
    for right in ("1/2 + 1/4 = 3/4", "6 / 8 = 3/4", "4 * 5 = 2 * 10", "The change is -3 + 5 = 2", "10 / 3 = 3.33"):
        assert first_arithmetic_error(right) is None, right
    assert first_arithmetic_error("10 / 3 = 3.4") == 0  # rounded wrong
    assert first_arithmetic_error("x = 14 + 1 = 16 + 3 = 19") == 4  # the first link of a running total
    assert evaluate("7") is None and evaluate("3 / 0") is None


def test_the_mcq_task_also_checks_which_option_a_value_is_given() -> None:
    record = Record(id="q", question="How many?", answer="B", choices=["20", "18", "23", "19"])
    text = "It sells 2: 20 - 2 = 18.\nThe options are (A) 20, (B) 18, (C) 23, (D) 19; 18 is (C).\nThe answer is (C)."
    assert first_mapping_error(text, record.choices) == text.index("18 is (C)")
    task = build_task("mcq")
    assert task.first_error(text, record) == text.index("18 is (C)")
    wrong_sum = text.replace("20 - 2 = 18", "20 - 2 = 17")
    assert task.first_error(wrong_sum, record) == wrong_sum.index("20 - 2 = 17")  # the earlier error wins
    assert first_mapping_error("18 is (B).", record.choices) is None
    assert first_mapping_error("18 is (C).", ["red", "blue", "green"]) is None  # options that are not numbers
    assert build_task("numeric").first_error("18 is (C).", record) is None  # no options to map to


def test_a_custom_task_may_locate_errors_itself(tmp_path) -> None:
    from orpo_distill.config import TaskConfig

    (tmp_path / "my_task.py").write_text(
        "class T:\n"
        "    def extract(self, text):\n        return text.strip()\n"
        "    def first_error(self, text, record):\n        return text.find('BAD') if 'BAD' in text else None\n"
        "def make():\n    return T()\n")
    task = build_task(TaskConfig(kind="custom", custom=f"{tmp_path / 'my_task.py'}:make", allow_custom_code=True))
    assert task.first_error("fine, then BAD step", None) == 11
    assert task.first_error("1 + 1 = 3", None) is None  # its own locator, not the arithmetic one


# ---- rows -----------------------------------------------------------------------------------------

RECORD = Record(id="q1", question="Ana has 14 stickers. She finds 1 more. How many?", answer="15")
TEACHER = {"q1": [{"id": "q1", "sample": 0, "text": "14 + 1 = 15. The answer is 15.", "correct": True}]}


def _rows(span: str, negatives: list[str], **pairs):
    train = TrainConfig(method="orpo")
    cfg = PairsConfig(pairing="every_positive", rejected_span=span, **pairs)
    negs = {"q1": [Negative(t, "student", 1) for t in negatives]}
    task = build_task("numeric")
    return epoch_rows([RECORD], task.messages, TEACHER, negs, train, cfg, seed=0, epoch=1,
                      first_error=task.first_error)


def test_rows_carry_the_first_error_only_when_asked() -> None:
    wrong = "We add: 14 + 1 = 16. The answer is 16."
    data = _rows("first_error", [wrong])
    assert data.rows[0]["rejected_from"] == wrong.index("14 + 1 = 16") and data.localised == 1
    plain = _rows("whole", [wrong])
    assert "rejected_from" not in plain.rows[0] and plain.localised == 0
    unlocated = _rows("first_error", ["The answer is 16."])
    assert unlocated.rows[0]["rejected_from"] is None and unlocated.localised == 0
    at_start = _rows("first_error", ["14 + 1 = 16. The answer is 16."])  # wrong from its first token: the whole
    assert at_start.rows[0]["rejected_from"] == 0 and at_start.localised == 0


def test_the_similarity_filter_leaves_out_negatives_close_to_a_positive() -> None:
    close, far = "14 + 1 = 15. The answer is 16.", "I think it is sixteen stickers in all, so 16."
    data = _rows("whole", [close, far], max_similarity=0.8)
    assert [r["rejected"][0]["content"] for r in data.rows] == [far] and data.too_similar == 1
    assert _rows("whole", [close, far]).too_similar == 0


# ---- tokens ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)  # SmolLM2's tokenizer


def test_the_offset_becomes_the_token_that_holds_it(tokenizer) -> None:
    text = "We add: 14 + 1 = 16. The answer is 16."
    offset = text.index("14 + 1")
    i = token_at(tokenizer, text, offset)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:i]).strip() == "We add:"
    assert tokenizer.decode(ids[i:]).strip().startswith("14")
    pair = tokenize_pair(tokenizer, "Q: ", "14 + 1 = 15.", text, max_length=512, rejected_from=offset)
    assert pair.rejected_start == i and pair.rejected_ids[:len(ids)] == ids
    assert tokenize_pair(tokenizer, "Q: ", "a", text, 512).rejected_start == 0


def test_truncation_keeps_at_least_one_rejected_token_for_the_term() -> None:
    cut = truncate_pair(TokenizedPair([1, 2], [3, 4], [5, 6, 7, 8, 9], rejected_start=4), max_length=5)
    assert cut.rejected_ids == [5, 6, 7] and cut.rejected_start == 2


# ---- the rejected side from the first error on ------------------------------------------------------


def _by_hand(model, prompt: list[int], response: list[int], start: int) -> float:
    """Sum of log p(response[t] | prompt, response[:t]) for t >= start, from the full logits of one row."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
    return sum(float(logp[len(prompt) + t - 1, response[t]]) for t in range(start, len(response)))


def test_both_layouts_read_the_rejected_side_from_its_start_as_computed_by_hand() -> None:
    model = tiny_model()
    rng = random.Random(4)
    prompt = [rng.randrange(1, VOCAB) for _ in range(6)]
    chosen = [rng.randrange(1, VOCAB) for _ in range(5)]
    rejected = [[rng.randrange(1, VOCAB) for _ in range(7)] for _ in range(2)]
    pairs = [TokenizedPair(prompt, chosen, rejected[0], rejected_start=3),
             TokenizedPair(prompt, chosen, rejected[1], rejected_start=0)]
    with torch.no_grad():
        plain = pair_logps(model, collate_plain(pairs, pad_id=0, nll_on_prompt=False))
        packed = pair_logps_packed(model, collate_packed(group_pairs(pairs), pad_id=0, nll_on_prompt=False))
    for sums in (plain, packed):
        assert sums["rejected_tokens"].tolist() == [4.0, 7.0]
        for k, start in enumerate((3, 0)):
            assert float(sums["rejected_logp_sum"][k]) == pytest.approx(_by_hand(model, prompt, rejected[k], start),
                                                                        abs=1e-4)
        assert float(sums["chosen_logp_sum"][0]) == pytest.approx(_by_hand(model, prompt, chosen, 0), abs=1e-4)
        assert sums["chosen_tokens"].tolist() == [5.0, 5.0]


def test_a_localised_rejected_side_changes_only_the_term_not_the_nll() -> None:
    model = tiny_model(seed=2)
    prompt, chosen, rejected = [5, 6, 7], [8, 9, 10, 11], [8, 9, 12, 13, 14]
    group = PairGroup(prompt, [(chosen, rejected)], rejected_start={tuple(rejected): 2})
    with torch.no_grad():
        whole = pair_logps_packed(model, collate_packed([PairGroup(prompt, [(chosen, rejected)])], 0, False))
        local = pair_logps_packed(model, collate_packed([group], 0, False))
    assert torch.allclose(whole["nll_sum"], local["nll_sum"]) and torch.allclose(whole["chosen_logp_sum"],
                                                                                 local["chosen_logp_sum"])
    assert local["rejected_tokens"].tolist() == [3.0] and whole["rejected_tokens"].tolist() == [5.0]
    # the two shared tokens' log-probabilities are exactly what the localised side leaves out
    assert float(whole["rejected_logp_sum"] - local["rejected_logp_sum"]) == pytest.approx(
        _by_hand(model, prompt, rejected[:2], 0), abs=1e-4)


# ---- bench/error_spans.py ---------------------------------------------------------------------------


def test_the_error_span_report_counts_located_errors_and_the_tokens_the_term_reads(tiny_config, tmp_path,
                                                                                   capsys) -> None:
    import json
    import sys as _sys
    from pathlib import Path

    import yaml

    from orpo_distill.config import resolved_dict
    from orpo_distill.datasets import load_all_splits

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import error_spans

    cfg = tiny_config()
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(resolved_dict(cfg)))
    qid = load_all_splits(cfg.dataset, task_kind="mcq").eval[0].id
    rows = [{"id": qid, "text": "So 3 + 4 = 8. The answer is (B).", "correct": False},
            {"id": qid, "text": "I am not sure. The answer is (C).", "correct": False},
            {"id": qid, "text": "3 + 4 = 7. The answer is (A).", "correct": True}]
    (run / "eval" / "eval_epoch_2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert error_spans.main([str(run), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 2 | 1 (50%) |" in out  # two wrong traces, one with a located error
    assert "[So ]3 + 4 = 8. The answer is (B)." in out
