"""The Python API (``orpo_distill/__init__.py``): configs from a path, a dict or a RunConfig with overrides,
a whole run and its results, single stages, a comparison's arguments, and a cheap ``import orpo_distill``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import orpo_distill as od
from orpo_distill.config import RunConfig
from orpo_distill.errors import UserError
from orpo_distill.evaluation import EvalSummary

from conftest import TINY_RUN, tiny_config_dict

FAST = TINY_RUN


def test_load_config_from_a_path_a_dict_or_a_config_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "r"), "train": {"epochs": 3}}), encoding="utf-8")

    from_path = od.load_config(path, overrides=["train.phi=0.25", "train.lambda=0.5"])
    assert isinstance(from_path, RunConfig)
    assert (from_path.train.epochs, from_path.train.phi, from_path.train.lambda_or) == (3, 0.25, 0.5)
    from_dict = od.load_config({"run_dir": str(tmp_path / "r"), "train": {"epochs": 3}},
                               overrides={"train.phi": 0.25, "train.lambda": 0.5})
    assert from_dict == from_path
    again = od.load_config(from_dict, overrides="train.epochs=1")  # a config with one more override
    assert again.train.epochs == 1 and again.train.phi == 0.25 and from_dict.train.epochs == 3
    assert od.load_config().student.source == "builtin:smollm2-135m-instruct"  # the defaults

    with pytest.raises(UserError, match=r"train\.phii"):
        od.load_config({}, overrides={"train.phii": 0.5})
    with pytest.raises(UserError, match="config file not found"):
        od.load_config(tmp_path / "missing.yaml")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[RunConfig, od.Results]:
    cfg = od.load_config(tiny_config_dict(tmp_path_factory.mktemp("api") / "run", tiny_model_dir), overrides=FAST)
    return cfg, od.run(cfg, progress=False)


@pytest.mark.slow
def test_run_returns_the_results_of_the_whole_run(finished: tuple[RunConfig, od.Results]) -> None:
    cfg, res = finished
    run_dir = Path(cfg.run_dir)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert res.run_dir == run_dir and (res.split, res.epochs) == ("eval", 2)
    assert set(res.evaluations) == set(summary) == {"eval_epoch_0", "eval_epoch_2"}
    assert isinstance(res.before, EvalSummary) and isinstance(res.after, EvalSummary)
    assert res.before.n == res.after.n == 2
    assert res.after.accuracy == summary["eval_epoch_2"]["accuracy"]
    assert list(res.after.ci95) == summary["eval_epoch_2"]["ci95"]
    assert res.at(0) is res.before and res.at(1) is None  # no evaluation after epoch 1 (every_epoch off)
    assert res.model_dir == run_dir / "model"
    assert (res.model_dir / "config.json").is_file() and (res.model_dir / "README.md").is_file()


def test_results_read_a_run_folder(finished: tuple[RunConfig, od.Results], tmp_path: Path) -> None:
    cfg, res = finished
    assert od.results(cfg.run_dir) == res
    # without config.yaml the last evaluated epoch is the one after training
    bare = tmp_path / "bare"
    (bare / "eval").mkdir(parents=True)
    (bare / "eval" / "summary.json").write_text((Path(cfg.run_dir) / "eval" / "summary.json").read_text())
    read = od.results(bare)
    assert read.epochs is None and read.after == res.after and read.before == res.before and read.model_dir is None
    empty = od.results(tmp_path)  # a folder without evaluations: nothing known yet
    assert empty.evaluations == {} and empty.before is None and empty.after is None
    with pytest.raises(UserError, match="no such run directory"):
        od.results(tmp_path / "missing")


def test_run_stage_runs_one_stage_and_what_it_needs(finished: tuple[RunConfig, od.Results], tmp_path: Path) -> None:
    cfg, res = finished
    fresh = od.load_config(cfg, overrides={"run_dir": str(tmp_path / "fresh")})
    teacher = od.run_stage(fresh, "teacher", progress=False)
    assert teacher.questions == 4 and teacher.samples == 4 * 3
    assert (tmp_path / "fresh" / "teacher" / "traces.jsonl").is_file()
    assert not (tmp_path / "fresh" / "student").exists()

    pairs = od.run_stage(fresh, "pairs", progress=False)  # the student's samples first, then epoch 1's pairs
    assert pairs == tmp_path / "fresh" / "pairs" / "epoch_1.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows and all({"prompt", "chosen", "rejected"} <= set(r) for r in rows)
    assert (tmp_path / "fresh" / "student" / "epoch_1.jsonl").is_file()

    # eval on the finished run: its model after the last epoch (cached, the same summary)
    assert od.run_stage(cfg, "eval", progress=False) == res.after
    with pytest.raises(UserError, match="unknown stage 'distill'"):
        od.run_stage(cfg, "distill")


def test_the_student_stage_after_an_epoch_samples_that_epochs_checkpoint(finished: tuple[RunConfig, od.Results]) -> None:
    """``student`` with epoch 2: the weights after epoch 1 sample every question into student/epoch_2.jsonl, the
    store the refresh before epoch 2 fills (the CLI's ``student --epoch 2`` is the same call)."""
    cfg, _ = finished
    summary = od.run_stage(cfg, "student", epoch=2, progress=False)
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "student" / "epoch_2.jsonl").read_text().splitlines()]
    from orpo_distill.pipeline import Run

    assert summary.questions == 4 and {r["id"] for r in rows} == {r.id for r in Run(cfg, progress=False).train_records}
    assert {r["generator"] for r in rows} == {"hf:student@epoch_1"}


def test_compare_variants_hands_the_comparison_its_seeds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import orpo_distill.compare

    seen: dict[str, Any] = {}

    def fake_run_comparison(base: RunConfig, variants: list[str], seeds: list[int], compare_dir: Path | None = None,
                            **kwargs: Any) -> dict[str, Any]:
        seen.update(base=base, variants=variants, seeds=seeds, compare_dir=compare_dir, **kwargs)
        return {"variants": {v: {} for v in variants}}

    monkeypatch.setattr(orpo_distill.compare, "run_comparison", fake_run_comparison)
    cfg = od.load_config({"run_dir": str(tmp_path / "cmp"), "seed": 7})
    out = od.compare_variants(cfg, ["orpo-off", "orpo-mixed@0.25"], seeds=3, keep_models=True, progress=False)
    assert out == {"variants": {"orpo-off": {}, "orpo-mixed@0.25": {}}}
    assert seen["seeds"] == [7, 8, 9] and seen["variants"] == ["orpo-off", "orpo-mixed@0.25"]
    assert seen["base"] == cfg and seen["compare_dir"] is None
    assert seen["keep_models"] is True and seen["progress"] is False
    od.compare_variants({"run_dir": str(tmp_path / "cmp")}, seeds=[3, 5], out=tmp_path / "elsewhere")
    assert seen["seeds"] == [3, 5] and seen["variants"] == [] and seen["compare_dir"] == tmp_path / "elsewhere"


def test_import_is_cheap() -> None:
    code = "import sys, orpo_distill; print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert set(od.__all__) == {"STAGES", "Results", "compare_variants", "load_config", "push_to_hub", "results", "run",
                               "run_stage", "stage_result"}
