"""``orpo-distill compare``: the variants map to the paper's configurations, the teacher traces, initial
student samples and base evaluation are generated once and reused, a killed comparison resumes without
retraining what finished, and the statistics are the ones the table claims."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orpo_distill import cli, compare, pipeline
from orpo_distill.compare import (
    aggregate,
    bootstrap_mean,
    is_finished,
    load_plan,
    open_plan,
    paired_difference,
    parse_variants,
    run_comparison,
    run_dir,
    shared_config,
    shared_dir,
    table_variants,
    variant_config,
    variant_overrides,
)
from orpo_distill.config import RunConfig
from orpo_distill.errors import UserError
from orpo_distill.generators.hf import HFGenerator
from orpo_distill.generators.scripted import ScriptedTeacher
from orpo_distill.metrics import read_metrics
from conftest import write_config

FAST = {
    "dataset.train_size": 4,
    "dataset.eval_size": 4,
    "teacher.error_rate": 0.0,  # every question has a positive; teacher-negative variants are not tested here
    "student.sampling.max_tokens": 6,
    "student.sampling.samples": 2,
    "pairs.pairs_per_question": 1,
    "train.epochs": 2,
    "train.batch_size": 4,
    "train.lr": 1e-3,
    "train.precision": "fp32",
    "train.max_length": 128,
    "eval.max_tokens": 6,
    "eval.every_epoch": False,
}




# ---- variants and configurations -----------------------------------------------------------------


def test_variant_names_map_to_the_paper_configurations(tiny_config: Any, tmp_path: Path) -> None:
    base = tiny_config(**FAST, **{"train.phi": 0.4})
    cfgs = {v: variant_config(base, tmp_path, v, 0) for v in
            ["sft-single", "sft-diverse", "orpo-teacher-neg", "orpo-off", "orpo-on", "orpo-mixed", "orpo-mixed@0.25"]}
    assert (cfgs["sft-single"].train.method, cfgs["sft-single"].train.traces) == ("sft", "single")
    assert (cfgs["sft-diverse"].train.method, cfgs["sft-diverse"].train.traces) == ("sft", "all")
    assert (cfgs["orpo-teacher-neg"].train.method, cfgs["orpo-teacher-neg"].pairs.negatives) == ("orpo", "teacher")
    for name, policy in [("orpo-off", "off"), ("orpo-on", "on"), ("orpo-mixed", "mixed")]:
        c = cfgs[name]
        assert (c.train.method, c.pairs.negatives, c.train.policy) == ("orpo", "student", policy)
    assert cfgs["orpo-mixed"].train.phi == 0.4  # phi from the config
    assert cfgs["orpo-mixed@0.25"].train.phi == 0.25 and cfgs["orpo-mixed@0.25"].train.policy == "mixed"
    assert cfgs["orpo-on"].run_dir == str(tmp_path / "orpo-on" / "seed_0")


def test_variants_change_only_training_fields_so_the_shared_traces_stay_valid(tiny_config: Any, tmp_path: Path) -> None:
    """What the stores hash (generator, sampling, task) and the data must be the same for every variant of
    a seed; the seed moves the student's sampling seed, not the data or the teacher."""
    base = tiny_config(**FAST)
    for seed in (0, 3):
        shared = shared_config(base, tmp_path, seed)
        for v in compare.DEFAULT_VARIANTS + ["orpo-mixed@0.25"]:
            c = variant_config(base, tmp_path, v, seed)
            assert (c.teacher, c.student, c.task, c.dataset, c.eval, c.seed) == \
                   (shared.teacher, shared.student, shared.task, shared.dataset, shared.eval, shared.seed)
    s0, s3 = shared_config(base, tmp_path, 0), shared_config(base, tmp_path, 3)
    assert s3.seed == 3 and s3.student.sampling.seed == s0.student.sampling.seed + 3
    assert s3.teacher == s0.teacher and s3.dataset == s0.dataset


@pytest.mark.parametrize("bad", ["orpo-offf", "orpo-mixed@1.5", "orpo-mixed@x", "sft-single@0.2", "orpo-mixed+beta=1",
                                 "orpo-mixed+lambda", "orpo-mixed+lambda=-1", "sft-diverse+lr=0", "orpo-on+lr=nan",
                                 "orpo-mixed+rows=0", "orpo-mixed+rows=1.5",
                                 "orpo-mixed+rows=inf", "orpo-mixed+rows=x", "orpo-mixed+sft=-1",
                                 "orpo-mixed+sft=1.5", "orpo-mixed+span=last", "orpo-mixed+maxsim=0",
                                 "orpo-mixed+maxsim=1.2"])
def test_bad_variant_names_are_user_errors(bad: str) -> None:
    with pytest.raises(UserError, match="variant"):
        parse_variants([f"sft-single,{bad}"])


def test_variant_lists_parse_in_order_without_repeats() -> None:
    assert parse_variants(["orpo-off, sft-single", "orpo-off", "orpo-mixed@0.25"]) == \
        ["orpo-off", "sft-single", "orpo-mixed@0.25"]
    assert parse_variants([]) == compare.DEFAULT_VARIANTS
    assert variant_overrides("orpo-mixed@0.25")["train.phi"] == 0.25


def test_lambda_and_lr_modifiers_change_one_knob_and_pair_with_their_arm(tiny_config: Any, tmp_path: Path) -> None:
    """``+lambda=0`` is the control with the odds-ratio term off on the same rows; ``+lr=X`` gives any arm
    the same learning-rate sweep. The control is compared with its own arm."""
    over = variant_overrides("orpo-mixed@0.25+lambda=0+lr=5e-5")
    assert over == {**variant_overrides("orpo-mixed@0.25"), "train.lambda": 0.0, "train.lr": 5e-5}
    cfg = variant_config(tiny_config(), tmp_path / "cmp", "orpo-mixed+lambda=1.0", 0)
    assert cfg.train.lambda_or == 1.0 and cfg.train.policy == "mixed"
    pairs = compare.comparison_pairs(["sft-diverse", "orpo-off", "orpo-mixed", "orpo-mixed+lambda=0"])
    assert ("orpo-mixed", "orpo-mixed+lambda=0") in pairs
    assert ("orpo-mixed", "sft-diverse") in pairs and ("orpo-off", "sft-diverse") in pairs
    assert ("orpo-mixed+lambda=0", "orpo-off") not in pairs  # the ablation is not another policy arm
    assert ("orpo-mixed@0.25", "orpo-mixed") in compare.comparison_pairs(["orpo-mixed", "orpo-mixed@0.25"])


def test_issue_33_design_modifiers_set_their_option_and_pair_with_the_arm_without_them(tiny_config: Any,
                                                                                       tmp_path: Path) -> None:
    over = variant_overrides("orpo-mixed+sft=3+span=first_error+maxsim=0.9+protect=5")
    assert (over["train.sft_epochs"], over["pairs.rejected_span"], over["pairs.max_similarity"],
            over["train.protect_chosen"]) == (3, "first_error", 0.9, 5.0)
    cfg = variant_config(tiny_config(**{"train.epochs": 5}), tmp_path / "cmp", "orpo-mixed+sft=3+span=first_error", 0)
    assert (cfg.train.sft_epochs, cfg.pairs.rejected_span) == (3, "first_error")
    arms = ["sft-diverse", "orpo-mixed", "orpo-mixed+sft=3", "orpo-mixed+sft=3+span=first_error"]
    pairs = compare.comparison_pairs(arms)
    assert {("orpo-mixed+sft=3", "orpo-mixed"), ("orpo-mixed+sft=3+span=first_error", "orpo-mixed+sft=3"),
            ("orpo-mixed+sft=3+span=first_error", "sft-diverse")} <= set(pairs)
    assert ("orpo-mixed+sft=3+span=first_error", "orpo-mixed") not in pairs  # two designs apart: not a control


def test_rows_modifier_gives_one_pair_a_row_and_pairs_with_the_grouped_arm(tiny_config: Any, tmp_path: Path) -> None:
    """``+rows=1``: SFT's batching with ORPO's rows (train.pairs_per_row), compared with the same arm grouped."""
    assert variant_overrides("orpo-mixed+lambda=0+rows=1") == {**variant_overrides("orpo-mixed+lambda=0"),
                                                               "train.pairs_per_row": 1}
    cfg = variant_config(tiny_config(), tmp_path / "cmp", "orpo-mixed+lambda=0+rows=1", 0)
    assert cfg.train.pairs_per_row == 1 and cfg.train.lambda_or == 0.0
    pairs = compare.comparison_pairs(["sft-diverse", "orpo-mixed+lambda=0", "orpo-mixed+lambda=0+rows=1"])
    assert ("orpo-mixed+lambda=0", "orpo-mixed+lambda=0+rows=1") in pairs
    assert ("orpo-mixed+lambda=0+rows=1", "sft-diverse") in pairs
    assert ("orpo-mixed", "orpo-mixed+lambda=0+rows=1") not in compare.comparison_pairs(
        ["orpo-mixed", "orpo-mixed+lambda=0", "orpo-mixed+lambda=0+rows=1"])  # two knobs apart: not a control


def test_a_folder_refuses_another_configuration_but_grows_with_new_variants(tiny_config: Any, tmp_path: Path) -> None:
    base = tiny_config(**FAST)
    open_plan(tmp_path / "c", base, ["sft-single"], [0])
    plan = open_plan(tmp_path / "c", base, ["orpo-off", "sft-single"], [1])
    assert plan.variants == ["sft-single", "orpo-off"] and plan.seeds == [0, 1]
    assert load_plan(tmp_path / "c").variants == plan.variants
    with pytest.raises(UserError, match="train.lr"):
        open_plan(tmp_path / "c", tiny_config(**{**FAST, "train.lr": 0.5}), ["sft-single"], [0])


def test_a_plan_written_before_a_config_field_existed_is_still_this_configuration(tiny_config: Any, tmp_path: Path) -> None:
    """A newer version adds a field with a default: the folder's comparison goes on (it did not differ)."""
    import json

    base = tiny_config(**FAST)
    open_plan(tmp_path / "c", base, ["sft-single"], [0])
    path = tmp_path / "c" / "plan.json"
    plan = json.loads(path.read_text())
    del plan["base_config"]["student"]["trust_remote_code"]  # as written by a version without the field
    path.write_text(json.dumps(plan))
    assert open_plan(tmp_path / "c", base, ["sft-single"], [1]).seeds == [0, 1]
    plan = json.loads(path.read_text())
    plan["base_config"]["student"]["trust_remote_code"] = True  # a real difference is still one
    plan["base_config"]["student"]["no_such_field"] = 1  # and a field this version does not know
    path.write_text(json.dumps(plan))
    with pytest.raises(UserError, match="student.trust_remote_code|student.no_such_field"):
        open_plan(tmp_path / "c", base, ["sft-single"], [0])


# ---- statistics ------------------------------------------------------------------------------------


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_questions() -> None:
    rng = np.random.default_rng(1)
    small = (rng.random((1, 50)) < 0.4).astype(float)
    large = (rng.random((1, 2000)) < 0.4).astype(float)
    m1, lo1, hi1 = bootstrap_mean(small)
    m2, lo2, hi2 = bootstrap_mean(large)
    assert lo1 < m1 < hi1 and lo2 < m2 < hi2
    assert (hi2 - lo2) < (hi1 - lo1) / 3  # ~ 1/sqrt(40) as wide
    assert abs(m2 - 0.4) < 0.04
    assert bootstrap_mean(np.ones((3, 10))) == (1.0, 1.0, 1.0)
    assert bootstrap_mean(small) == bootstrap_mean(small)  # deterministic


def test_bootstrap_carries_the_seed_to_seed_spread() -> None:
    """Two seeds that disagree completely: resampling questions alone would give a narrow interval; the
    seed level widens it to cover both seeds' accuracies."""
    m = np.vstack([np.ones(400), np.zeros(400)])
    mean, lo, hi = bootstrap_mean(m)
    assert mean == 0.5 and lo <= 0.05 and hi >= 0.95


def test_paired_difference_uses_the_common_questions_and_seeds() -> None:
    a = {0: {"q1": True, "q2": True, "q3": False}, 1: {"q1": True, "q2": True, "q3": True}}
    b = {0: {"q1": False, "q2": True, "q3": False, "q9": True}}
    d = paired_difference(a, b)
    assert d is not None and d["seeds"] == 1 and d["questions"] == 3
    assert d["diff"] == pytest.approx(1 / 3)
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    same = paired_difference(a, a)
    assert same is not None and same["diff"] == 0 and same["ci95"] == [0.0, 0.0]


# ---- running: sharing and reuse -------------------------------------------------------------------------


class Calls:
    """Counts generator construction and generation calls, by generator."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.built: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        real_build = pipeline.build_generator
        real_scripted, real_hf = ScriptedTeacher.generate, HFGenerator.generate
        calls = self

        def build(cfg: Any, *a: Any, **k: Any) -> Any:
            calls.built[cfg.kind] += 1
            return real_build(cfg, *a, **k)

        def scripted(self: Any, requests: Any) -> Any:
            calls.requests["teacher"] += len(requests)
            return real_scripted(self, requests)

        def hf(self: Any, requests: Any) -> Any:
            calls.requests[self.name] += len(requests)
            return real_hf(self, requests)

        monkeypatch.setattr(pipeline, "build_generator", build)
        monkeypatch.setattr(ScriptedTeacher, "generate", scripted)
        monkeypatch.setattr(HFGenerator, "generate", hf)


@pytest.mark.slow
def test_comparison_generates_shared_traces_once_and_reuses_them(tiny_config: Any, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = Calls(monkeypatch)
    base = tiny_config(**FAST)
    out = tmp_path / "cmp"
    variants, seeds = ["sft-single", "orpo-mixed"], [0, 1]
    result = run_comparison(base, variants, seeds, out, progress=False, log=lambda _: None)

    # the teacher: built once and asked once per training question, for the whole comparison
    assert calls.built["scripted"] == 1 and calls.requests["teacher"] == 4
    # the initial student: built once per seed (its samples are per seed), never per variant
    assert calls.built["hf"] == 2
    # the base model: evaluated once (greedy decoding does not depend on the seed)
    assert calls.requests["hf:student@epoch_0"] == 4
    # what the variants generate themselves: the refresh of orpo-mixed (round(0.5 * 4) questions per seed)
    # and the final evaluations of every run
    assert calls.requests["hf:student@epoch_1"] == 2 * 2
    assert calls.requests["hf:student@epoch_2"] == 4 * len(variants) * len(seeds)

    teacher = (shared_dir(out, 0) / "teacher" / "traces.jsonl").read_bytes()
    assert (shared_dir(out, 1) / "teacher" / "traces.jsonl").read_bytes() == teacher
    student = {s: (shared_dir(out, s) / "student" / "epoch_1.jsonl").read_bytes() for s in seeds}
    assert student[0] != student[1], "the seeds should draw their own initial student samples"
    for v in variants:
        for s in seeds:
            d = run_dir(out, v, s)
            assert (d / "teacher" / "traces.jsonl").read_bytes() == teacher
            assert (d / "eval" / "eval_epoch_0.jsonl").read_bytes() == \
                (shared_dir(out, 0) / "eval" / "eval_epoch_0.jsonl").read_bytes()
            # finished: no checkpoints, and the weights replaced by a note (the settings stay)
            assert not (d / "checkpoints").exists() and not (d / "model" / "config.json").exists()
            assert "model.safetensors" in json.loads((d / "model" / "removed.json").read_text())["files"]
            assert sorted(p.name for p in (d / "model").iterdir()) == ["removed.json", "training_settings.json"]
            events = [e["event"] for e in read_metrics(d / "metrics.jsonl")]
            assert "sampling" not in events or v == "orpo-mixed"  # only the refresh samples in a variant dir
    assert (run_dir(out, "orpo-mixed", 1) / "student" / "epoch_1.jsonl").read_bytes() == student[1]
    assert not (run_dir(out, "sft-single", 0) / "student").exists()

    # the table: every variant with both seeds, the base row, the paired comparisons
    saved = json.loads((out / "comparison.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["missing"] == [] and list(saved["variants"]) == variants
    for v in variants:
        row = saved["variants"][v]
        assert row["seeds"] == seeds and len(row["accuracy_per_seed"]) == 2 and row["questions"] == 4
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        assert row["train_minutes"] > 0 and 0 <= row["parse_failure_rate"] <= 1 and row["mean_length"] > 0
        # what the arm trained on, from its pairs events: sft-single one target per question
        assert row["trained_on"]["questions"] == 4 and row["trained_on"]["positive_tokens"] > 0
    assert saved["variants"]["sft-single"]["trained_on"]["positives"] == 4
    assert "What each arm trained on" in (out / "comparison.md").read_text()
    # how each arm was computed, from its epoch events: one precision, this CPU, this code
    from orpo_distill.models import cpu_name
    from orpo_distill.provenance import code_version
    for v in variants:
        (line,) = saved["variants"][v]["computed_with"]
        assert line.endswith(f" on {cpu_name()}, code {code_version()}") and line.split(" on ")[0] in ("fp32", "bf16")
    assert "How each arm was computed" in (out / "comparison.md").read_text()
    assert saved["base"]["questions"] == 4
    pairs = {(p["variant"], p["reference"]) for p in saved["paired"]}
    assert {("orpo-mixed", "sft-single"), ("orpo-mixed", "base"), ("sft-single", "base")} <= pairs
    md = (out / "comparison.md").read_text()
    assert "| sft-single |" in md and "| orpo-mixed |" in md and "base model (epoch 0)" in md
    # the header names the loader and the task (dataset `synthetic` alone read as the mcq task)
    assert saved["config"]["task"] == "mcq" and "dataset `synthetic`, task `mcq` (" in md
    # a comparison.json written before the task was recorded (`orpo-distill report` rereads it) still renders
    from orpo_distill.report import comparison_blocks
    older = {**saved, "config": {k: v for k, v in saved["config"].items() if k != "task"}}
    assert "dataset `synthetic` (4 training" in comparison_blocks(older)[1].text
    # the paper's claims the comparison's arms can speak to: claim 3 against the one SFT baseline it ran
    assert [c["claim"] for c in saved["claims"]] == ["3. ORPO > SFT on CoT"]
    (only,) = saved["claims"][0]["differences"]
    assert (only["variant"], only["reference"]) == ("orpo-mixed", "sft-single") and only["ci95"] is not None
    assert saved["claims"][0]["reading"] in ("held", "not held", "inconclusive")
    assert "The paper's claims" in md and "orpo-mixed - sft-single" in md
    assert (out / "report.md").is_file() and (out / "report.html").is_file()

    # --table-only --seeds 1: the table of the plan's first seed alone (the plan itself unchanged)
    config = write_config(base, tmp_path / "cmp.yaml")
    assert cli.main(["compare", str(config), "--out", str(out), "--table-only", "--seeds", "1"]) == 0
    first = json.loads((out / "comparison.json").read_text())
    assert first["seeds"] == [0] and first["missing"] == []
    assert all(v["seeds"] == [0] for v in first["variants"].values())
    assert all(p["seeds"] == 1 for p in first["paired"])
    assert load_plan(out).seeds == [0, 1]
    # --table-only --variants: those of the plan's variants alone (a folder that also holds ablations);
    # a variant the plan does not hold is an error, not an empty row
    assert cli.main(["compare", str(config), "--out", str(out), "--table-only", "--variants", "sft-single"]) == 0
    one = json.loads((out / "comparison.json").read_text())
    assert list(one["variants"]) == ["sft-single"] and one["missing"] == [] and one["seeds"] == [0, 1]
    assert "orpo-mixed" not in (out / "comparison.md").read_text()
    assert load_plan(out).variants == variants
    with pytest.raises(UserError, match="orpo-off not in the comparison"):
        table_variants(load_plan(out), ["sft-single,orpo-off"])
    assert cli.main(["compare", str(config), "--out", str(out), "--table-only", "--variants", "orpo-off"]) == 2

    # a rerun generates and trains nothing
    before = {p: p.read_bytes() for p in out.glob("*/seed_*/metrics.jsonl")}
    calls.built.clear()
    calls.requests.clear()
    run_comparison(base, variants, seeds, out, progress=False, log=lambda _: None)
    assert not calls.built and not calls.requests
    assert {p: p.read_bytes() for p in out.glob("*/seed_*/metrics.jsonl")} == before


def test_incomplete_shared_traces_stop_the_comparison(tiny_config: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher request that fails leaves a gap; variants must not fill it with draws of their own."""
    from orpo_distill.generators.base import Sample

    real = ScriptedTeacher.generate

    def flaky(self: Any, requests: Any) -> Any:
        out = real(self, requests)
        out[0] = [Sample(text="", error="boom")]
        self.stats.failed_requests += 1
        return out

    monkeypatch.setattr(ScriptedTeacher, "generate", flaky)
    with pytest.raises(UserError, match="teacher traces are missing"):
        run_comparison(tiny_config(**FAST), ["sft-single"], [0], tmp_path / "cmp", progress=False, log=lambda _: None)
    assert not run_dir(tmp_path / "cmp", "sft-single", 0).exists()


@pytest.mark.slow
def test_an_archive_holds_no_weights_tabulates_the_same_and_resumes_only_what_did_not_finish(
        tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """``compare --archive DIR``: plan, shared runs and finished runs without weights; the table read
    from it is the table of the folder; `compare --out DIR` on it trains only the runs not finished."""
    base = tiny_config(**FAST)
    config = write_config(base, tmp_path / "cmp.yaml")
    out, arch = tmp_path / "cmp", tmp_path / "archive"
    assert cli.main(["compare", str(config), "--variants", "sft-single,orpo-off", "--seeds", "1", "--out", str(out),
                     "--no-progress", "--keep-models"]) == 0
    assert (run_dir(out, "sft-single", 0) / "model" / "config.json").is_file()  # kept on request
    open_plan(out, base, ["orpo-mixed"], [0])  # planned, not run: not finished
    capsys.readouterr()

    assert cli.main(["compare", str(config), "--out", str(out), "--archive", str(arch)]) == 0
    said = capsys.readouterr().out
    assert "archived 2 finished runs" in said and "left out, not finished: orpo-mixed/seed_0" in said
    files = {p.relative_to(arch).as_posix() for p in arch.rglob("*") if p.is_file()}
    assert not any(f.endswith(".safetensors") or "/checkpoints/" in f for f in files)
    assert not any(f.startswith("orpo-mixed/") for f in files)
    assert {"plan.json", "shared/seed_0/teacher/traces.jsonl", "shared/seed_0/student/epoch_1.jsonl",
            "shared/seed_0/eval/summary.json", "sft-single/seed_0/metrics.jsonl", "sft-single/seed_0/eval/summary.json",
            "sft-single/seed_0/model/removed.json", "sft-single/seed_0/model/training_settings.json"} <= files
    note = json.loads((arch / "sft-single/seed_0/model/removed.json").read_text())
    assert "model.safetensors" in note["files"] and str(run_dir(out, "sft-single", 0)) in note["why"]
    assert (run_dir(out, "sft-single", 0) / "model" / "config.json").is_file()  # the source is left as it was
    # the same table from the archive as from the folder
    assert {**aggregate(load_plan(arch)), "dir": None} == {**aggregate(load_plan(out)), "dir": None}
    # a finished run without its weights refuses to train again (it would overwrite what was counted)
    with pytest.raises(UserError, match="removed its weights"):
        pipeline.Run(variant_config(base, arch, "sft-single", 0), progress=False).train()

    calls = Calls(monkeypatch)  # resumed from the archive: only orpo-mixed trains, on the archived samples
    before = {p: p.read_bytes() for p in arch.glob("*/seed_0/metrics.jsonl")}
    result = run_comparison(base, ["orpo-mixed"], [0], arch, progress=False, log=lambda _: None)
    assert result["missing"] == [] and set(result["variants"]) == {"sft-single", "orpo-off", "orpo-mixed"}
    assert {p: p.read_bytes() for p in before} == before
    assert calls.requests["teacher"] == 0 and calls.requests["hf:student@epoch_0"] == 0  # shared work reused
    # orpo-mixed's refresh (round(0.5 * 4) questions) and its final evaluation, nothing else
    assert dict(calls.requests) == {"hf:student@epoch_1": 2, "hf:student@epoch_2": 4}
    # a folder that holds other files and is not an archive is refused
    assert cli.main(["compare", str(config), "--out", str(out), "--archive", str(tmp_path)]) == 2
    assert "no plan.json" in capsys.readouterr().err


# ---- kill and resume ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_before_its_model_export_is_completed_without_training(tiny_config: Any, tmp_path: Path) -> None:
    """With eval.every_epoch the last evaluation comes before the export of model/: a run killed between
    the two is not finished, and its rerun exports the model from the last checkpoint (not retraining)."""
    cfg = tiny_config(**{**FAST, "train.epochs": 1, "eval.every_epoch": True})
    out = tmp_path / "cmp"
    run_comparison(cfg, ["sft-single"], [0], out, progress=False, keep_checkpoints=True, log=lambda _: None)
    d = run_dir(out, "sft-single", 0)
    assert (d / "checkpoints" / "epoch_1").is_dir()  # kept on request
    shutil.rmtree(d / "model")
    assert not is_finished(d, variant_config(cfg, out, "sft-single", 0))
    trained = [e for e in read_metrics(d / "metrics.jsonl") if e["event"] in ("train", "epoch")]

    run_comparison(cfg, ["sft-single"], [0], out, progress=False, log=lambda _: None)
    # exported from the checkpoint, then removed as every finished run's weights are (the note lists them)
    assert "model.safetensors" in json.loads((d / "model" / "removed.json").read_text())["files"]
    assert [e for e in read_metrics(d / "metrics.jsonl") if e["event"] in ("train", "epoch")] == trained
    assert not (d / "checkpoints").exists()  # removed once the run is finished


def orpo_distill_command() -> list[str]:
    script = Path(sys.executable).parent / "orpo-distill"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "orpo_distill.cli"]


@pytest.mark.slow
def test_compare_killed_after_the_first_run_resumes_without_retraining_it(tiny_config: Any, tmp_path: Path) -> None:
    """A real `orpo-distill compare` process, SIGKILLed once its first run has finished, then the same
    command again: the finished run is left alone and the comparison completes."""
    cfg = tiny_config(**FAST)
    config = write_config(cfg, tmp_path / "cmp.yaml")
    out = tmp_path / "cmp"
    args = ["compare", str(config), "--variants", "sft-single,orpo-off", "--seeds", "1", "--out", str(out),
            "--no-progress"]
    first = run_dir(out, "sft-single", 0)
    first_cfg = variant_config(cfg, out, "sft-single", 0)
    log = (tmp_path / "killed.stderr").open("wb")
    proc = subprocess.Popen([*orpo_distill_command(), *args], stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    try:
        deadline = time.monotonic() + 300
        while not is_finished(first, first_cfg):
            assert proc.poll() is None, (tmp_path / "killed.stderr").read_text()[-2000:]
            assert time.monotonic() < deadline, "the first run did not finish within 300 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "comparison.json").exists(), "the comparison finished before the kill; the test proves nothing"
    time.sleep(0.05)  # so that a rewrite would show in the modification times
    files = [first / "metrics.jsonl", first / "eval" / "summary.json", first / "config.yaml",
             first / "model" / "training_settings.json"]
    kept = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}

    assert cli.main([*args, "--table-only"]) == 0  # the table of what finished, nothing run
    partial = json.loads((out / "comparison.json").read_text())
    assert partial["missing"] == ["orpo-off/seed_0"] and list(partial["variants"]) == ["sft-single"]
    assert not is_finished(run_dir(out, "orpo-off", 0), variant_config(cfg, out, "orpo-off", 0))

    assert cli.main(args) == 0  # the same command again

    for p, (data, mtime) in kept.items():
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, f"{p} was rewritten: the run was redone"
    result = json.loads((out / "comparison.json").read_text())
    assert result["missing"] == []
    assert {v: r["seeds"] for v, r in result["variants"].items()} == {"sft-single": [0], "orpo-off": [0]}
    teacher = (shared_dir(out, 0) / "teacher" / "traces.jsonl").read_bytes()
    for v in ("sft-single", "orpo-off"):
        assert (run_dir(out, v, 0) / "teacher" / "traces.jsonl").read_bytes() == teacher
        epochs = [e["epoch"] for e in read_metrics(run_dir(out, v, 0) / "metrics.jsonl") if e["event"] == "epoch"]
        assert sorted(set(epochs)) == [1, 2]
    assert aggregate(load_plan(out)) == result


def test_compare_cli_rejects_bad_arguments(tiny_config: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = write_config(tiny_config(**FAST), tmp_path / "cmp.yaml")
    assert cli.main(["compare", str(config), "--variants", "orpo-sideways"]) == 2
    assert "unknown variant 'orpo-sideways'" in capsys.readouterr().err
    assert cli.main(["compare", str(config), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_quick_size_caps_the_config_and_uses_its_own_folder(tiny_config: Any) -> None:
    big = tiny_config(**{**FAST, "dataset.train_size": 500, "dataset.eval_size": None, "train.epochs": 5})
    q = compare.quick_config(big)
    assert q.dataset.train_size == compare.QUICK_SIZES["dataset.train_size"]
    assert q.dataset.eval_size == compare.QUICK_SIZES["dataset.eval_size"]
    assert q.train.epochs == compare.QUICK_SIZES["train.epochs"]
    assert q.run_dir == big.run_dir + "-quick"
    small = tiny_config(**FAST)
    assert compare.quick_config(small).dataset.train_size == 4  # never grows a config


def test_orpo_mixed_keeps_the_configs_phi_and_refuses_one_that_is_not_mixed(tmp_path: Path) -> None:
    ramp = RunConfig.model_validate({"train": {"phi": {"linear": [0.1, 0.5]}}})
    assert variant_config(ramp, tmp_path, "orpo-mixed", 0).train.phi == ramp.train.phi
    assert variant_config(ramp, tmp_path, "orpo-off", 0).train.phi == 0.0
    assert variant_config(ramp, tmp_path, "orpo-on", 0).train.phi == 1.0
    off = RunConfig.model_validate({"train": {"phi": 0}})
    assert variant_config(off, tmp_path, "orpo-mixed@0.25", 0).train.phi == 0.25
    with pytest.raises(UserError, match=r"orpo-mixed\+lambda=0 keeps the config's train.phi, which is 0.0"):
        variant_config(off, tmp_path, "orpo-mixed+lambda=0", 0)


def test_the_claims_are_read_from_their_paired_intervals_by_one_rule() -> None:
    from orpo_distill.compare.claims import read_claims, reading

    assert reading([[0.01, 0.05], [0.02, 0.10]]) == "held"
    assert reading([[0.01, 0.05], [-0.02, 0.10]]) == "inconclusive"
    assert reading([[0.01, 0.05], [-0.10, -0.02]]) == "not held"
    assert reading([[0.01, 0.05], None]) == "incomplete"
    assert reading([None, [-0.10, -0.01]]) == "not held"  # a contradiction needs no other figure

    def row(a: str, b: str, lo: float, hi: float) -> dict:
        return {"variant": a, "reference": b, "diff": (lo + hi) / 2, "ci95": [lo, hi], "seeds": 3, "questions": 200}

    six = ["sft-single", "sft-diverse", "orpo-teacher-neg", "orpo-off", "orpo-on", "orpo-mixed"]
    paired = [row("orpo-mixed", "orpo-off", 0.01, 0.04), row("orpo-off", "orpo-on", -0.03, 0.05),
              row("orpo-mixed", "orpo-teacher-neg", 0.05, 0.2), row("orpo-off", "orpo-teacher-neg", 0.04, 0.1),
              row("orpo-on", "orpo-teacher-neg", 0.01, 0.09), row("orpo-mixed", "sft-single", -0.02, 0.02),
              row("orpo-mixed", "sft-diverse", -0.25, -0.08), row("orpo-mixed", "base", 0.3, 0.4)]
    claims = {c["claim"][:2]: c for c in read_claims(paired, six)}
    assert {k: c["reading"] for k, c in claims.items()} == {"1.": "inconclusive", "2.": "held", "3.": "not held"}
    assert [(d["variant"], d["reference"], d["ci95"]) for d in claims["1."]["differences"]] == [
        ("orpo-mixed", "orpo-off", [0.01, 0.04]), ("orpo-off", "orpo-on", [-0.03, 0.05])]
    # a comparison still running: the arms are planned, a difference not measured yet
    partial = read_claims(paired[:1], six)
    assert partial[0]["reading"] == "incomplete" and partial[0]["differences"][1]["ci95"] is None
    # claim 1 needs all three policies; claims 2 and 3 read the arms the comparison has
    assert [c["claim"][:2] for c in read_claims(paired, ["sft-diverse", "orpo-off", "orpo-mixed"])] == ["3."]
    assert [c["claim"][:2] for c in read_claims(paired, ["orpo-teacher-neg", "orpo-on"])] == ["2."]
    assert ("orpo-off", "orpo-on") in compare.comparison_pairs(six)


@pytest.mark.slow
def test_arms_that_differ_only_in_their_refresh_share_their_first_epoch_exactly(tiny_config: Any,
                                                                                 tmp_path: Path) -> None:
    """orpo-off, orpo-mixed and orpo-on train the same epoch 1 (the refresh first runs before epoch 2): with
    sharing, the first trains it and the others start from its epoch-1 checkpoint, and every arm ends with
    the weights, evaluation and training curve it has when each trains whole (fp32: to the bit)."""
    from safetensors.torch import load_file

    from orpo_distill.metrics import read_metrics

    base = tiny_config(**{**FAST, "train.precision": "fp32", "student.dtype": "float32", "train.phi": 0.5})
    variants = ["orpo-off", "orpo-mixed", "orpo-on"]
    outs = {share: tmp_path / f"share-{share}" for share in (True, False)}
    for share, out in outs.items():
        run_comparison(base, variants, [0], out, progress=False, log=lambda _: None, keep_models=True,
                       share_first_epoch=share)
    shared = {v: read_metrics(run_dir(outs[True], v, 0) / "metrics.jsonl") for v in variants}
    assert not any("shared_from" in e for e in shared["orpo-off"])  # the first arm trains epoch 1 itself
    for v in ("orpo-mixed", "orpo-on"):
        copied = [e for e in shared[v] if "shared_from" in e]
        assert {e["event"] for e in copied} == {"pairs", "train", "epoch"} and {e["epoch"] for e in copied} == {1}
        assert [e["epoch"] for e in shared[v] if e["event"] == "resume"] == [1]
    assert not (outs[True] / "first-epoch" / "seed_0").exists() or not any((outs[True] / "first-epoch" / "seed_0").iterdir())
    for v in variants:
        a, b = (run_dir(outs[s], v, 0) for s in (True, False))
        wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), v
        assert (a / "eval" / "eval_epoch_2.jsonl").read_bytes() == (b / "eval" / "eval_epoch_2.jsonl").read_bytes()
        losses = {s: [(e["step"], e["loss"]) for e in read_metrics(run_dir(outs[s], v, 0) / "metrics.jsonl")
                      if e["event"] == "train"] for s in (True, False)}
        assert losses[True] == losses[False] and len(losses[True]) >= 2, v
    # the arms part at epoch 2: orpo-on pairs with negatives its epoch-1 weights drew, orpo-off with the initial ones
    def rejected_epochs(v: str) -> set[int]:
        rows = (run_dir(outs[True], v, 0) / "pairs" / "epoch_2.jsonl").read_text().splitlines()
        return {json.loads(r)["rejected_epoch"] for r in rows}

    assert rejected_epochs("orpo-off") == {1} and rejected_epochs("orpo-on") == {2}


def test_a_shared_first_epoch_is_given_once_even_when_a_kill_interrupts_it(tiny_config: Any, tmp_path: Path) -> None:
    """Starting from the shared epoch 1 renames the checkpoint in last; a rerun after a kill before that
    gives it again without logging the copied events twice, and a run with a checkpoint of its own is left alone."""
    from orpo_distill.compare.first_epoch import start_from_first_epoch
    from orpo_distill.layout import RunLayout
    from orpo_distill.metrics import read_metrics

    cfg = tiny_config(**FAST)
    cache = tmp_path / "cache"
    (cache / "checkpoint").mkdir(parents=True)
    (cache / "checkpoint" / "state.json").write_text(json.dumps({"epoch": 1, "global_step": 2, "settings_hash": "x"}))
    (cache / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    (cache / "pairs_epoch_1.jsonl").write_text('{"id": "q"}\n')
    (cache / "events.jsonl").write_text(json.dumps({"event": "epoch", "epoch": 1, "seconds": 3.0}) + "\n")
    run = RunLayout(tmp_path / "run")
    run.root.mkdir()
    assert start_from_first_epoch(cache, run, cfg)
    run.checkpoint(1).rename(run.checkpoints / ".epoch_1.tmp")  # as if killed before the rename
    assert start_from_first_epoch(cache, run, cfg)
    assert [e["event"] for e in read_metrics(run.metrics)] == ["epoch"]
    state = json.loads((run.checkpoint(1) / "state.json").read_text())
    assert state["epoch"] == 1 and state["settings_hash"] != "x"  # the run's own settings
    assert json.loads((cache / "checkpoint" / "state.json").read_text())["settings_hash"] == "x"  # cache untouched
    assert (run.checkpoint(1) / "model.safetensors").read_bytes() == b"weights"
    assert not start_from_first_epoch(cache, run, cfg)  # it has a checkpoint now
