"""Dataset loaders: the synthetic task, GSM8K files, generic JSONL, Hugging Face datasets."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from orpo_distill.config import DatasetConfig
from orpo_distill.datasets import load_splits
from orpo_distill.datasets.synthetic import EVAL_OFFSET, mistaken_finals, run_program
from orpo_distill.errors import UserError

LETTERS = "ABCDEFGH"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def as_tuples(records):
    return [(r.id, r.question, r.answer, r.choices, r.meta) for r in records]


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_is_deterministic_and_seeded():
    cfg = DatasetConfig(train_size=30, eval_size=10)
    a, b = load_splits(cfg), load_splits(cfg)
    assert as_tuples(a[0]) == as_tuples(b[0]) and as_tuples(a[1]) == as_tuples(b[1])
    other = load_splits(DatasetConfig(train_size=30, eval_size=10, seed=1))
    assert [r.question for r in other[0]] != [r.question for r in a[0]]


def test_synthetic_splits_are_disjoint_capped_and_stable_under_growth():
    train, eval_ = load_splits(DatasetConfig(train_size=40, eval_size=15))
    assert len(train) == 40 and len(eval_) == 15
    assert not {r.id for r in train} & {r.id for r in eval_}
    assert train[0].id == "syn-000000" and train[39].id == "syn-000039"
    assert eval_[0].id == f"syn-{EVAL_OFFSET:06d}"
    bigger_train, same_eval = load_splits(DatasetConfig(train_size=80, eval_size=15))
    assert as_tuples(bigger_train[:40]) == as_tuples(train)
    assert as_tuples(same_eval) == as_tuples(eval_)


def test_synthetic_records_are_consistent_programs():
    train, eval_ = load_splits(DatasetConfig(train_size=300, eval_size=50))
    for r in train + eval_:
        m = r.meta
        assert m["task"] == "synthetic"
        assert m["values"] == run_program(m["start"], [(op, a) for op, a, _ in m["steps"]])
        assert min(m["values"]) >= 0 and m["values"][-1] == m["correct"]
        assert 2 <= m["start"] <= 20 and len(m["steps"]) == 2
        assert len(r.question.split()) < 60
        # the question states the start and every amount, each step's phrase verbatim
        assert str(m["start"]) in r.question
        for op, amount, phrase in m["steps"]:
            assert phrase in r.question and re.search(rf"\b{amount}\b", phrase)
        values = [int(c) for c in r.choices]
        assert len(values) == 4 and len(set(values)) == 4 and min(values) >= 0
        assert r.choices[LETTERS.index(r.answer)] == str(m["correct"])
        assert sorted(values) == sorted(m["distractors"] + [m["correct"]])


def test_synthetic_variety_and_plausible_distractors():
    train, _ = load_splits(DatasetConfig(train_size=300, eval_size=1))
    assert len({r.meta["frame"] for r in train}) == 3
    assert len({r.meta["unit"] for r in train}) >= 8
    assert len({r.meta["holder"] for r in train}) >= 15
    assert len({r.question for r in train}) == len(train)
    letters = Counter(r.answer for r in train)
    assert set(letters) == set("ABCD") and min(letters.values()) >= 45  # correct position is spread
    structural = near = 0
    for r in train:
        m = r.meta
        slips = set(mistaken_finals(m["start"], [(op, a) for op, a, _ in m["steps"]]))
        for d in m["distractors"]:
            assert d in slips or abs(d - m["correct"]) <= 3, (r.question, d)
            structural += d in slips
            near += abs(d - m["correct"]) <= 2
    assert structural > 200 and near > 200  # both kinds of plausible distractor occur often


def test_synthetic_config_and_task_kinds():
    cfg = DatasetConfig(train_size=20, eval_size=5, synthetic={"steps": 4, "max_value": 50, "num_choices": 6})
    train, _ = load_splits(cfg)
    assert all(len(r.meta["steps"]) == 4 and len(r.choices) == 6 for r in train)
    assert all(min(r.meta["values"]) >= 0 for r in train)
    numeric, _ = load_splits(DatasetConfig(train_size=5, eval_size=1), task_kind="numeric")
    assert all(r.choices is None and r.answer == str(r.meta["correct"]) for r in numeric)
    with pytest.raises(UserError, match="task.kind mcq or numeric"):
        load_splits(DatasetConfig(), task_kind="yesno")


# ---------------------------------------------------------------------------------------------
# gsm8k


def test_gsm8k_shipped_sample_loads():
    train, eval_ = load_splits(DatasetConfig(kind="gsm8k"), task_kind="numeric")
    assert len(train) == 200 and len(eval_) == 100
    assert train[0].id == "gsm8k-train-0" and eval_[99].id == "gsm8k-test-99"
    assert train[0].answer == "72" and "Natalia" in train[0].question
    for r in train + eval_:
        assert re.fullmatch(r"-?\d+(\.\d+)?", r.answer)
        assert "<<" not in r.meta["solution"] and "####" not in r.meta["solution"]
    capped = load_splits(DatasetConfig(kind="gsm8k", train_size=10, eval_size=3), task_kind="numeric")
    assert [r.id for r in capped[0]] == [f"gsm8k-train-{i}" for i in range(10)] and len(capped[1]) == 3


def test_gsm8k_files(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"Step <<2*3=6>>6 done.\n#### {i},000"} for i in range(10)]
    train = write_jsonl(tmp_path / "tr.jsonl", rows)
    test = write_jsonl(tmp_path / "te.jsonl", rows[:3])
    tr, ev = load_splits(DatasetConfig(kind="gsm8k", train_path=str(train), eval_path=str(test)), "numeric")
    assert [r.id for r in ev] == ["gsm8k-test-0", "gsm8k-test-1", "gsm8k-test-2"]
    assert tr[5].id == "gsm8k-train-5" and tr[5].answer == "5000" and tr[5].meta["solution"] == "Step 6 done."
    # a single file is split by eval_fraction, ids named after the file
    tr, ev = load_splits(DatasetConfig(kind="gsm8k", path=str(train), eval_fraction=0.3), "numeric")
    assert len(tr) == 7 and len(ev) == 3 and all(r.id.startswith("gsm8k-tr-") for r in tr + ev)
    with pytest.raises(UserError, match="set task.kind: numeric"):
        load_splits(DatasetConfig(kind="gsm8k"), "mcq")


def test_gsm8k_bad_rows(tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [{"question": "a?", "answer": "x\n#### 3"}, {"question": "b?", "answer": "no final"}])
    with pytest.raises(UserError, match=re.escape(f"{f}:2: the answer has no '#### N' final line")):
        load_splits(DatasetConfig(kind="gsm8k", path=str(f)), "numeric")
    f = write_jsonl(tmp_path / "h.jsonl", [{"question": "a?", "answer": "x\n#### three"}])
    with pytest.raises(UserError, match=re.escape(f"{f}:1: the value after '####' is not a number")):
        load_splits(DatasetConfig(kind="gsm8k", path=str(f)), "numeric")


# ---------------------------------------------------------------------------------------------
# jsonl


def mcq_rows(n: int = 10) -> list[dict]:
    return [{"uid": f"r{i}", "q": f"What is {i}+1?", "opts": [str(i), str(i + 1), str(i + 2)], "gold": str(i + 1)} for i in range(n)]


FIELDS = {"id": "uid", "question": "q", "choices": "opts", "answer": "gold"}


def test_jsonl_field_map_and_answer_normalisation(tmp_path):
    rows = mcq_rows(10)
    rows[1]["gold"] = "C"
    rows[2]["gold"] = "(a)"
    rows[3]["gold"] = 0  # an integer is an index into the choices
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    train, eval_ = load_splits(DatasetConfig(kind="jsonl", path=str(f), fields=FIELDS, eval_fraction=0.2))
    by_id = {r.id: r for r in train + eval_}
    assert len(train) == 8 and len(eval_) == 2 and len(by_id) == 10
    assert by_id["r0"].answer == "B" and by_id["r0"].choices == ("0", "1", "2")
    assert by_id["r1"].answer == "C" and by_id["r2"].answer == "A" and by_id["r3"].answer == "A"
    assert by_id["r0"].meta["source"] == f"{f}:1"


def test_jsonl_split_is_seeded_and_independent_of_file_order(tmp_path):
    rows = [{"id": f"k{i}", "question": f"q{i}", "answer": str(i)} for i in range(40)]
    a = write_jsonl(tmp_path / "a.jsonl", rows)
    b = write_jsonl(tmp_path / "b.jsonl", rows[::-1])

    def held(path, seed):
        return {r.id for r in load_splits(DatasetConfig(kind="jsonl", path=str(path), seed=seed), "exact")[1]}

    assert held(a, 0) == held(b, 0) and len(held(a, 0)) == 8
    assert held(a, 0) != held(a, 1)
    tr, ev = load_splits(DatasetConfig(kind="jsonl", path=str(a), train_size=5, eval_size=2), "exact")
    assert len(tr) == 5 and len(ev) == 2 and not {r.id for r in tr} & {r.id for r in ev}


def test_jsonl_missing_id_is_a_stable_hash_of_the_question(tmp_path):
    rows = [{"question": f"q{i}", "answer": "x"} for i in range(5)]
    a = load_splits(DatasetConfig(kind="jsonl", path=str(write_jsonl(tmp_path / "a.jsonl", rows))), "exact")
    b = load_splits(DatasetConfig(kind="jsonl", path=str(write_jsonl(tmp_path / "b.jsonl", rows[::-1]))), "exact")
    ids_a = {r.question: r.id for r in a[0] + a[1]}
    ids_b = {r.question: r.id for r in b[0] + b[1]}
    assert ids_a == ids_b and all(re.fullmatch(r"q-[0-9a-f]{12}", i) for i in ids_a.values())


def test_jsonl_separate_eval_file_and_shared_ids(tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", mcq_rows(6))
    ev = write_jsonl(tmp_path / "eval.jsonl", [dict(r, uid=f"e{i}") for i, r in enumerate(mcq_rows(3))])
    train, eval_ = load_splits(DatasetConfig(kind="jsonl", train_path=str(tr), eval_path=str(ev), fields=FIELDS))
    assert [r.id for r in train] == [f"r{i}" for i in range(6)] and [r.id for r in eval_] == ["e0", "e1", "e2"]
    clash = write_jsonl(tmp_path / "clash.jsonl", mcq_rows(3)[2:])
    with pytest.raises(UserError, match=re.escape("id 'r2' appears in both") + ".*" + re.escape(f"{tr}:3") + ".*" + re.escape(f"{clash}:1")):
        load_splits(DatasetConfig(kind="jsonl", train_path=str(tr), eval_path=str(clash), fields=FIELDS))


def bad(tmp_path: Path, lines: list, **cfg) -> tuple[Path, DatasetConfig]:
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    return f, DatasetConfig(kind="jsonl", path=str(f), **cfg)


def test_jsonl_duplicate_ids_name_both_lines(tmp_path):
    f, cfg = bad(tmp_path, [{"id": "a", "question": "x", "answer": "1"}, {"id": "b", "question": "y", "answer": "2"},
                            {"id": "a", "question": "z", "answer": "3"}])
    with pytest.raises(UserError, match=re.escape(f"{f}:3: duplicate id 'a', first seen at {f}:1")):
        load_splits(cfg, "exact")
    f, cfg = bad(tmp_path, [{"question": "same", "answer": "1"}, {"question": "same", "answer": "2"}])
    with pytest.raises(UserError, match=re.escape(f"{f}:2: duplicate id") + ".*" + re.escape(f"first seen at {f}:1 (the id is derived from the question text")):
        load_splits(cfg, "exact")


def test_jsonl_malformed_json(tmp_path):
    f, cfg = bad(tmp_path, [{"question": "x", "answer": "1"}, '{"question": "y", "answer": '])
    with pytest.raises(UserError, match=re.escape(f"{f}:2: malformed JSON")):
        load_splits(cfg, "exact")
    f, cfg = bad(tmp_path, ['["a list"]'])
    with pytest.raises(UserError, match=re.escape(f"{f}:1: expected a JSON object")):
        load_splits(cfg, "exact")


def test_jsonl_missing_answer_and_question(tmp_path):
    f, cfg = bad(tmp_path, [{"question": "x", "answer": "1"}, {"question": "y"}])
    with pytest.raises(UserError, match=re.escape(f"{f}:2: missing answer (field 'answer')")):
        load_splits(cfg, "exact")
    f, cfg = bad(tmp_path, [{"question": "x", "choices": ["a", "b"], "gold": ""}], fields={"answer": "gold"})
    with pytest.raises(UserError, match=re.escape(f"{f}:1: missing answer (field 'gold')")):
        load_splits(cfg, "mcq")
    f, cfg = bad(tmp_path, [{"text": "x", "answer": "1"}])
    with pytest.raises(UserError, match=re.escape(f"{f}:1: missing question (field 'question')")):
        load_splits(cfg, "exact")


def test_jsonl_non_utf8(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"question": "ok", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(UserError, match=re.escape(f"{f}:2: not UTF-8 text")):
        load_splits(DatasetConfig(kind="jsonl", path=str(f)), "exact")


def test_jsonl_mcq_answer_not_a_choice(tmp_path):
    rows = mcq_rows(3)
    rows[2]["gold"] = "7"
    f, cfg = bad(tmp_path, rows, fields=FIELDS)
    with pytest.raises(UserError, match=re.escape(f"{f}:3: answer '7' is neither a letter A-C nor the text of one of the 3 choices")):
        load_splits(cfg, "mcq")
    rows[2]["gold"] = "D"  # a letter past the last choice
    f, cfg = bad(tmp_path, rows, fields=FIELDS)
    with pytest.raises(UserError, match=re.escape(f"{f}:3: answer 'D' is neither a letter A-C")):
        load_splits(cfg, "mcq")
    rows[2]["gold"] = 5
    f, cfg = bad(tmp_path, rows, fields=FIELDS)
    with pytest.raises(UserError, match=re.escape(f"{f}:3: answer index 5 is out of range for 3 choices")):
        load_splits(cfg, "mcq")
    f, cfg = bad(tmp_path, [{"question": "Pick (A) or (B)", "answer": "maybe"}])
    with pytest.raises(UserError, match=re.escape(f"{f}:1: answer 'maybe' is not a letter")):
        load_splits(cfg, "mcq")


def test_jsonl_config_errors(tmp_path):
    with pytest.raises(UserError, match="dataset.fields: unknown name"):
        load_splits(DatasetConfig(kind="jsonl", path="x.jsonl", fields={"prompt": "q"}), "exact")
    with pytest.raises(UserError, match="dataset file not found"):
        load_splits(DatasetConfig(kind="jsonl", path=str(tmp_path / "nope.jsonl")), "exact")
    with pytest.raises(UserError, match="needs a file"):
        load_splits(DatasetConfig(kind="jsonl"), "exact")


def test_a_folder_given_as_the_dataset_file_is_named_a_directory(tmp_path):
    folder = tmp_path / "medqa"
    folder.mkdir()
    for cfg in (DatasetConfig(kind="jsonl", path=str(folder)), DatasetConfig(kind="gsm8k", path=str(folder)),
                DatasetConfig(kind="jsonl", path=str(write_jsonl(tmp_path / "t.jsonl", mcq_rows(4))),
                              eval_path=str(folder), fields=FIELDS)):
        with pytest.raises(UserError, match=re.escape(f"dataset file {folder} is a directory, not a file")):
            load_splits(cfg, "numeric" if cfg.kind == "gsm8k" else "mcq")


def test_options_that_carry_their_own_letters_are_stored_without_them(tmp_path):
    """MedQA ships its options lettered; the prompt letters them again, so the letters go (one rule for the
    jsonl and hf loaders: every option lettered in order, in one style)."""
    opts = ["A. 08:00", "B. 09:00", "C. 10:00", "D. 11:00"]
    rows = [{"id": "m0", "question": "When?", "options": opts, "answer": "B"},
            {"id": "m1", "question": "When?", "options": opts, "answer": "C. 10:00"},  # the lettered text
            {"id": "m2", "question": "When?", "options": opts, "answer": "11:00"},  # the text alone
            {"id": "m3", "question": "Which?", "options": ["E. coli", "B. subtilis"], "answer": "B. subtilis"},
            {"id": "m4", "question": "Which?", "options": {"A": "A. 7", "B": "B. 8"}, "answer": "B"}]
    f = write_jsonl(tmp_path / "medqa.jsonl", rows)
    cfg = DatasetConfig(kind="jsonl", path=str(f), eval_path=str(write_jsonl(tmp_path / "e.jsonl", [
        {**rows[0], "id": "e0"}])), fields={"choices": "options"})
    train, eval_ = load_splits(cfg, "mcq")
    by_id = {r.id: r for r in train + eval_}
    assert by_id["m0"].choices == ("08:00", "09:00", "10:00", "11:00") and by_id["m0"].answer == "B"
    assert by_id["m0"].meta["choices_unlettered"] is True
    assert by_id["m1"].answer == "C" and by_id["m2"].answer == "D"
    assert by_id["m3"].choices == ("E. coli", "B. subtilis") and by_id["m3"].answer == "B"
    assert "choices_unlettered" not in by_id["m3"].meta
    assert by_id["m4"].choices == ("7", "8") and by_id["e0"].choices == by_id["m0"].choices
    from orpo_distill.tasks import McqTask

    assert "A. 08:00\nB. 09:00" in McqTask().messages(by_id["m0"])[0]["content"]


# ---------------------------------------------------------------------------------------------
# hf (local folders only: no network)


def arc_like(n: int, offset: int = 0) -> dict:
    return {
        "qid": [f"arc{offset + i}" for i in range(n)],
        "question": [f"Which is {i}?" for i in range(n)],
        "choices": [{"label": ["1", "2", "3"], "text": [f"{i}", f"{i + 1}", f"{i + 2}"]} for i in range(n)],
        "answerKey": ["2" if i % 2 else "3" for i in range(n)],
    }


def test_hf_saved_dataset_dict_with_arc_choices(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "arc"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(arc_like(6)),
        "test": datasets.Dataset.from_dict(arc_like(3, offset=100)),
    }).save_to_disk(str(folder))
    cfg = DatasetConfig(kind="hf", path=str(folder), fields={"id": "qid", "answer": "answerKey"}, train_size=4)
    train, eval_ = load_splits(cfg)
    assert [r.id for r in train] == ["arc0", "arc1", "arc2", "arc3"] and [r.id for r in eval_] == ["arc100", "arc101", "arc102"]
    assert train[0].choices == ("0", "1", "2") and train[0].answer == "C" and train[1].answer == "B"
    with pytest.raises(UserError, match=re.escape("dataset.train_split: ") + ".*has no split 'validation'"):
        load_splits(DatasetConfig(kind="hf", path=str(folder), train_split="validation"))


def test_hf_saved_single_dataset_with_index_answers(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "mmlu"
    data = {"question": [f"q{i}" for i in range(10)], "options": [["a", "b", "c", "d"]] * 10, "label": [i % 4 for i in range(10)]}
    datasets.Dataset.from_dict(data).save_to_disk(str(folder))
    cfg = DatasetConfig(kind="hf", path=str(folder), fields={"choices": "options", "answer": "label"}, eval_fraction=0.3)
    train, eval_ = load_splits(cfg)
    by_id = {r.id: r for r in train + eval_}
    assert len(train) == 7 and len(eval_) == 3 and sorted(by_id) == sorted(f"all-{i}" for i in range(10))
    assert [by_id[f"all-{i}"].answer for i in range(5)] == ["A", "B", "C", "D", "A"]
    bad = dict(data, label=[9] * 10)
    datasets.Dataset.from_dict(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'bad'}[all] row 0: answer index 9 is out of range")):
        load_splits(DatasetConfig(kind="hf", path=str(tmp_path / "bad"), fields={"choices": "options", "answer": "label"}))


def test_hf_hub_id_goes_to_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(arc_like(4)),
                                     "validation": datasets.Dataset.from_dict(arc_like(2, offset=10))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DatasetConfig(kind="hf", path="allenai/ai2_arc", hf_config="ARC-Easy", eval_split="validation",
                        fields={"id": "qid", "answer": "answerKey"})
    train, eval_ = load_splits(cfg)
    assert calls == [("allenai/ai2_arc", "ARC-Easy")]
    assert len(train) == 4 and [r.id for r in eval_] == ["arc10", "arc11"]

    def offline(path, name=None, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=re.escape("dataset.path: could not load 'allenai/ai2_arc' (hf_config 'ARC-Easy'): ConnectionError")):
        load_splits(cfg)
