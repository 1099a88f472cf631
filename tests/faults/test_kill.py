"""SIGKILL at the worst moments, each a real ``orpo-distill`` process, then the same command again.

Covered elsewhere, and not repeated here (docs/reliability.md lists them): the teacher stage killed with
requests in flight (tests/test_cli.py::test_teacher_killed_midway_resumes_without_loss_or_duplicates) and
training killed after a checkpoint, mid-epoch (tests/test_resume.py::
test_training_killed_after_a_checkpoint_resumes_to_the_same_weights).
"""

from __future__ import annotations

import pytest

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

from conftest import set_dotted, tiny_config_dict
from orpo_distill import cli
from orpo_distill.metrics import read_metrics

from .common import (
    assert_same_weights,
    check_store,
    check_training_stores,
    child_env,
    complete_rows,
    error_message,
    model_weights,
    no_traceback,
    run_cli,
    start_cli,
    train_config,
    wait_for,
    write_yaml,
)

pytestmark = pytest.mark.slow  # whole runs or several processes: left out of `make test-fast`


def sigkill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# ---- student sampling ---------------------------------------------------------------------------------------

QUESTIONS, K = 96, 2  # three chunks of 32 questions in the sampling stage: the kill lands after the first


def student_config(tmp: Path, name: str, model: Path) -> Path:
    data = tiny_config_dict(tmp / name, model)
    for key, value in {"dataset.train_size": QUESTIONS, "student.sampling.samples": K, "student.sampling.max_tokens": 4,
                       "student.sampling.batch_size": 64, "student.sampling.temperature": 0.9,
                       "student.device": "cpu"}.items():
        set_dotted(data, key, value)
    return write_yaml(data, tmp / f"{name}.yaml")


def test_student_sampling_killed_midway_keeps_every_stored_sample_and_resumes(
        tmp_path: Path, tiny_model_dir: Path, capsys: Any) -> None:
    killed = student_config(tmp_path, "killed", tiny_model_dir)
    store = tmp_path / "killed" / "student" / "epoch_1.jsonl"
    log = tmp_path / "student.log"
    # each chunk's batch slowed by 1 s, so the kill lands midway however fast the machine is
    proc = start_cli(["student", str(killed), "--no-progress"], log, launcher=True,
                     env=child_env(FAULT_SLOW_GENERATION="1.0"))
    try:
        wait_for(lambda: bool(complete_rows(store)), proc, log)  # the first chunk is stored
        sigkill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = store.read_bytes()
    stored = len(complete_rows(store))
    assert 0 < stored < QUESTIONS * K, "the kill did not land in the middle of the stage"
    check_store(store)  # whatever is there parses and holds no key twice

    assert cli.main(["student", str(killed), "--no-progress"]) == 0  # the same command again
    assert f"{QUESTIONS * K} ({QUESTIONS * K - stored})" in capsys.readouterr().out  # only the missing ones
    expected = [(f"syn-{q:06d}", s) for q in range(QUESTIONS) for s in range(K)]
    rows = check_store(store, expected)
    assert store.read_bytes().startswith(before), "a sample stored before the kill was rewritten"

    # an uninterrupted run: chunks are whole questions with per-request seeds, so the samples are the same
    reference = student_config(tmp_path, "reference", tiny_model_dir)
    assert cli.main(["student", str(reference), "--no-progress"]) == 0
    ref_rows = check_store(tmp_path / "reference" / "student" / "epoch_1.jsonl", expected)

    def content(rs: list[dict[str, Any]]) -> dict[tuple[str, int], tuple[str, Any]]:
        return {(r["id"], r["sample"]): (r["text"], r["answer"]) for r in rs}

    assert content(rows) == content(ref_rows)


# ---- training: killed in the middle of writing a checkpoint --------------------------------------------------


def test_training_killed_mid_checkpoint_write_resumes_from_the_last_whole_one(
        tmp_path: Path, tiny_model_dir: Path, train_reference: Any) -> None:
    """The write of checkpoints/epoch_2 is slowed (a slow disk, patched in by the test-only launcher); the
    process is SIGKILLed once the temp folder holds the model but not the optimizer state."""
    run_dir = tmp_path / "run"
    config = train_config(run_dir, tiny_model_dir, tmp_path / "train.yaml")
    log = tmp_path / "killed.log"
    tmp_ckpt = run_dir / "checkpoints" / ".epoch_2.tmp"
    proc = start_cli(["train", str(config), "--no-progress"], log, launcher=True,
                     env=child_env(FAULT_SLOW_CHECKPOINT="3"))
    try:
        wait_for(lambda: (tmp_ckpt / "model.safetensors").is_file(), proc, log)
        sigkill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert tmp_ckpt.is_dir() and not (tmp_ckpt / "state.json").exists(), "killed mid-write: a half checkpoint"
    assert (run_dir / "checkpoints" / "epoch_1" / "state.json").is_file()
    assert not (run_dir / "checkpoints" / "epoch_2").exists() and not (run_dir / "model").exists()

    resumed = run_cli(["train", str(config), "--no-progress"], tmp_path / "resumed.log")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert not tmp_ckpt.exists(), "the stale temp folder was not removed"
    resumes = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "resume"]
    assert [e["epoch"] for e in resumes] == [1], "resumed from something other than the last whole checkpoint"
    assert json.loads((run_dir / "checkpoints" / "epoch_2" / "state.json").read_text())["epoch"] == 2
    check_training_stores(run_dir)
    assert_same_weights(model_weights(run_dir / "model"), train_reference.weights())


# ---- training: a NaN loss in a real process --------------------------------------------------------------------


def test_nan_loss_in_a_real_training_process_is_refused_and_the_checkpoint_kept(
        tmp_path: Path, tiny_model_dir: Path, train_reference: Any) -> None:
    """Every loss of epoch 2 is NaN (patched in by the test-only launcher): the command stops with one line
    and exit 2, epoch 1's checkpoint stays whole, and a rerun without the fault ends as if nothing happened."""
    run_dir = tmp_path / "run"
    config = train_config(run_dir, tiny_model_dir, tmp_path / "train.yaml")
    failed = run_cli(["train", str(config), "--no-progress"], tmp_path / "nan.log", launcher=True,
                     env=child_env(FAULT_NAN_FROM_EPOCH="2"))
    assert failed.returncode == 2, failed.stdout[-3000:]
    no_traceback(failed.stdout)
    message = error_message(failed.stdout)
    assert re.search(r"epoch 2, step 3: the loss is nan \(.*\); the step was refused and no weights or checkpoints "
                     r"were changed\. Lower train\.lr", message), message
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_1"], "a checkpoint of the NaN epoch was written"
    state = json.loads((ckpts / "epoch_1" / "state.json").read_text())
    assert {k: state.pop(k) for k in ("global_step", "world_size", "epoch")} == {"global_step": 2, "world_size": 1, "epoch": 1}
    assert sorted(state) == ["settings", "settings_hash"], state  # and the settings that trained it
    assert not (run_dir / "model").exists()

    rerun = run_cli(["train", str(config), "--no-progress"], tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    check_training_stores(run_dir)
    assert_same_weights(model_weights(run_dir / "model"), train_reference.weights())


# ---- evaluation ----------------------------------------------------------------------------------------------


def eval_config(tmp: Path, name: str, model: Path) -> Path:
    data = tiny_config_dict(tmp / name, model)
    for key, value in {"dataset.eval_size": 16, "eval.max_tokens": 8, "eval.batch_size": 4, "student.device": "cpu"}.items():
        set_dotted(data, key, value)
    return write_yaml(data, tmp / f"{name}.yaml")


def test_evaluation_killed_midway_leaves_no_result_and_reruns_to_the_same_one(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    killed = eval_config(tmp_path, "killed", tiny_model_dir)
    run_dir = tmp_path / "killed"
    log = tmp_path / "eval.log"
    # with its progress bar, on stderr; each batch of 4 questions slowed by 1 s so the kill lands midway
    proc = start_cli(["eval", str(killed), "--epoch", "0"], log, launcher=True,
                     env=child_env(FAULT_SLOW_GENERATION="1.0"))
    progressed = re.compile(r"generate hf:student@epoch_0:.*\b([1-9]\d*)/16\b")
    try:
        wait_for(lambda: bool(progressed.search(log.read_text(errors="replace"))), proc, log)
        sigkill(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (run_dir / "eval" / "eval_epoch_0.jsonl").exists(), "a partial evaluation was published"
    summary = run_dir / "eval" / "summary.json"
    assert not summary.exists() or "eval_epoch_0" not in json.loads(summary.read_text())

    assert cli.main(["eval", str(killed), "--epoch", "0", "--no-progress"]) == 0
    reference = eval_config(tmp_path, "reference", tiny_model_dir)
    assert cli.main(["eval", str(reference), "--epoch", "0", "--no-progress"]) == 0
    rows = [json.loads(x) for x in (run_dir / "eval" / "eval_epoch_0.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "reference" / "eval" / "eval_epoch_0.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and len({r["id"] for r in rows}) == 16
    assert rows == ref
    assert [p.name for p in (run_dir / "eval").iterdir() if p.name.endswith(".tmp")] == []
