"""Checkpoints and evaluations are tied to the settings that made them (issue 15): a rerun with other
training settings sets the old outputs aside and retrains, saying so (--reuse keeps them on purpose), a
rerun with other eval settings re-evaluates without retraining, and an unchanged rerun changes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import FAST_TRAIN, tiny_config_dict, set_dotted
from orpo_distill import cli
from orpo_distill.config import build_config, resolved_dict
from orpo_distill.metrics import read_metrics
from orpo_distill.provenance import diff_settings, eval_settings, training_settings
from orpo_distill.store import settings_hash


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """One finished tiny run (2 epochs, final evaluation); each test works on its own copy."""
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "run", tiny_model_dir, root / "config.yaml")
    assert cli.main(["run", str(config), "--no-progress"]) == 0
    return root / "run"


def write_config(run_dir: Path, model_dir: Path, path: Path) -> Path:
    data = tiny_config_dict(run_dir, model_dir)
    for key, value in FAST_TRAIN.items():
        set_dotted(data, key, value)
    path.write_text(yaml.safe_dump(resolved_dict(build_config(data, "test")), sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def run_copy(finished_run: Path, tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(run_dir, config.yaml): a copy of the finished run (mtimes kept) and its config, rerun once so its
    config.yaml names the copy's run_dir."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    config = write_config(run_dir, tiny_model_dir, tmp_path / "config.yaml")
    assert cli.main(["run", str(config), "--no-progress"]) == 0
    return run_dir, config


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.is_file() and p.name != "metrics.jsonl"}


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == name]


@pytest.mark.slow
def test_changed_lr_sets_the_trained_outputs_aside_and_retrains(run_copy: tuple[Path, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, config = run_copy
    old_weights = weights(run_dir / "model")
    old_summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    teacher_mtime = (run_dir / "teacher" / "traces.jsonl").stat().st_mtime_ns
    capsys.readouterr()

    assert cli.main(["run", str(config), "--set", "train.lr=5e-3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 0.005" in err and "set aside" in err and "--reuse" in err
    # the old outputs are set aside, not deleted
    for name in ("checkpoints", "model", "pairs", "eval"):
        assert (run_dir / f"{name}.old").is_dir(), f"{name}.old missing"
    assert (run_dir / "student" / "epoch_2.jsonl.old").is_file(), "the old weights' refresh samples were kept in use"
    kept = weights(run_dir / "model.old")
    assert all(torch.equal(kept[k], old_weights[k]) for k in old_weights)
    # what does not depend on the training settings was not redone
    assert (run_dir / "teacher" / "traces.jsonl").stat().st_mtime_ns == teacher_mtime
    # retrained with the new lr: other weights, a checkpoint recording the new settings
    new = weights(run_dir / "model")
    assert any(not torch.equal(new[k], old_weights[k]) for k in new)
    state = json.loads((run_dir / "checkpoints" / "epoch_2" / "state.json").read_text())
    assert state["settings"]["train"]["lr"] == 5e-3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 5e-3
    assert [e["changes"] for e in events(run_dir, "set_aside")] == [["train.lr: 0.001 -> 0.005"]]
    # and the final evaluation was recomputed for the new model
    key = "eval_epoch_2"
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary[key]["settings_hash"] != old_summary[key]["settings_hash"]
    assert json.loads((run_dir / "eval.old" / "summary.json").read_text()) == old_summary


def test_reuse_keeps_weights_trained_with_other_settings(run_copy: tuple[Path, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, config = run_copy
    before = {k: v for k, v in mtimes(run_dir).items() if not k.startswith("config.yaml")}
    capsys.readouterr()
    assert cli.main(["run", str(config), "--set", "train.lr=5e-3", "--reuse", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--reuse" in err and "train.lr: 0.001 -> 0.005" in err
    assert not (run_dir / "model.old").exists() and not events(run_dir, "set_aside")
    after = {k: v for k, v in mtimes(run_dir).items() if not k.startswith("config.yaml")}
    assert after == before, "--reuse retrained or re-evaluated weights it was told to keep"


def test_weights_handed_to_a_stage_directly_are_checked(run_copy: tuple[Path, Path]) -> None:
    """What the trainer and the evaluation loader say when given a checkpoint recording other settings
    (a run sets such weights aside before they get there)."""
    from orpo_distill.provenance import conflict

    run_dir, config = run_copy
    data = yaml.safe_load(config.read_text())
    state = json.loads((run_dir / "checkpoints" / "epoch_1" / "state.json").read_text())
    assert conflict(run_dir, state, build_config(data, "test")) is None
    data["train"]["lr"] = 5e-3
    text = conflict(run_dir, state, build_config(data, "test"))
    assert text is not None and "train.lr: 0.001 -> 0.005" in text and "--reuse" in text


@pytest.mark.slow
def test_changed_eval_setting_reevaluates_without_retraining(run_copy: tuple[Path, Path]) -> None:
    run_dir, config = run_copy
    ckpt_state = run_dir / "checkpoints" / "epoch_2" / "state.json"
    ckpt_mtime, model_mtime = ckpt_state.stat().st_mtime_ns, (run_dir / "model" / "model.safetensors").stat().st_mtime_ns
    old = json.loads((run_dir / "eval" / "summary.json").read_text())["eval_epoch_2"]
    trained = len(events(run_dir, "train"))

    assert cli.main(["run", str(config), "--set", "eval.max_tokens=3", "--no-progress"]) == 0
    new = json.loads((run_dir / "eval" / "summary.json").read_text())["eval_epoch_2"]
    assert new["settings_hash"] != old["settings_hash"]
    assert new["mean_length"] <= 3
    stale = events(run_dir, "eval_stale")
    assert [e["key"] for e in stale] == ["eval_epoch_2"]
    assert len(events(run_dir, "train")) == trained, "an eval setting retrained the model"
    assert ckpt_state.stat().st_mtime_ns == ckpt_mtime
    assert (run_dir / "model" / "model.safetensors").stat().st_mtime_ns == model_mtime


def test_unchanged_rerun_changes_nothing(run_copy: tuple[Path, Path]) -> None:
    run_dir, config = run_copy
    before = mtimes(run_dir)
    n_events = len(read_metrics(run_dir / "metrics.jsonl"))
    assert cli.main(["run", str(config), "--no-progress"]) == 0
    assert mtimes(run_dir) == before
    assert not [e for e in read_metrics(run_dir / "metrics.jsonl")[n_events:]
                if e["event"] in ("train", "eval", "eval_stale", "epoch")]


@pytest.mark.slow
def test_checkpoint_without_hash_still_resumes_with_a_warning(run_copy: tuple[Path, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A run folder written before checkpoints carried a hash: killed after epoch 1, rerun."""
    run_dir, config = run_copy
    shutil.rmtree(run_dir / "checkpoints" / "epoch_2")
    shutil.rmtree(run_dir / "model")
    state_path = run_dir / "checkpoints" / "epoch_1" / "state.json"
    state = json.loads(state_path.read_text())
    state.pop("settings_hash")
    state.pop("settings")
    state_path.write_text(json.dumps(state))
    capsys.readouterr()

    assert cli.main(["run", str(config), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "epoch_1" in err and "records no training settings" in err
    assert [e["epoch"] for e in events(run_dir, "resume")] == [1]
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert "settings_hash" in json.loads((run_dir / "checkpoints" / "epoch_2" / "state.json").read_text())


def test_what_enters_the_hashes(tiny_config: Any) -> None:
    base = tiny_config(**FAST_TRAIN)
    h = settings_hash(training_settings(base))
    assert settings_hash(training_settings(tiny_config(**FAST_TRAIN, **{"train.log_every": 5}))) == h
    for key, value in {"train.lr": 5e-3, "pairs.seed": 3, "seed": 1, "dataset.train_size": 3,
                       "teacher.sampling.temperature": 0.5, "student.sampling.max_tokens": 5}.items():
        changed = tiny_config(**{**FAST_TRAIN, key: value})
        assert settings_hash(training_settings(changed)) != h, key
    assert diff_settings(training_settings(base), training_settings(tiny_config(**{**FAST_TRAIN, "train.lr": 5e-3}))) \
        == ["train.lr: 0.001 -> 0.005"]
    # an eval setting changes the evaluation's hash, not the training's; the model is part of it after training
    ev = tiny_config(**{**FAST_TRAIN, "eval.max_tokens": 3})
    assert settings_hash(training_settings(ev)) == h
    assert eval_settings(ev, 2) != eval_settings(base, 2)
    lr = tiny_config(**{**FAST_TRAIN, "train.lr": 5e-3})
    assert eval_settings(lr, 0) == eval_settings(base, 0) and eval_settings(lr, 2) != eval_settings(base, 2)


def test_weights_recorded_with_the_settings_phi_replaced_are_not_retrained(tiny_model_dir: Path) -> None:
    """A checkpoint written before train.phi replaced policy/phi_schedule/phi_start records its training
    settings in the old form: the same settings in the new form are not a change (nothing set aside);
    a different phi still is."""
    from orpo_distill.provenance import changes

    cfg = build_config(tiny_config_dict("run", tiny_model_dir), "test")
    old = training_settings(cfg)
    old["train"] = {k: v for k, v in old["train"].items() if k != "phi"}
    old["train"].update(policy="mixed", phi=cfg.train.phi, phi_schedule="constant", phi_start=0.0)
    assert settings_hash(old) != settings_hash(training_settings(cfg))  # the hash alone would say "changed"
    assert changes({"settings_hash": settings_hash(old), "settings": old}, cfg) == []
    old["train"]["policy"] = "off"
    assert changes({"settings_hash": settings_hash(old), "settings": old}, cfg) == [f"train.phi: 0.0 -> {cfg.train.phi}"]
