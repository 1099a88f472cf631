"""Kill and resume: a training process SIGKILLed after a checkpoint ends, once rerun, with the same weights
as a run that was never interrupted; and checkpoints are whole or absent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from orpo_distill import checkpoints, cli
from orpo_distill.checkpoints import latest_checkpoint, save_checkpoint
from orpo_distill.config import RunConfig
from conftest import FAST_TRAIN, write_config
from orpo_distill.metrics import read_metrics

pytestmark = pytest.mark.slow  # whole runs or several processes: left out of `make test-fast`

FAST = {**FAST_TRAIN, "train.epochs": 3}  # batch 2: 2 steps an epoch, time to kill it between checkpoints




def orpo_distill_command() -> list[str]:
    script = Path(sys.executable).parent / "orpo-distill"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "orpo_distill.cli"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def kill_after_first_checkpoint_then_resume(killed_cfg: RunConfig, reference_cfg: RunConfig,
                                            tmp_path: Path) -> tuple[Path, Path, Path]:
    """`orpo-distill train` SIGKILLed after checkpoints/epoch_1 appears, then the same command again, beside
    an uninterrupted run (started alongside, to save time); every run its own process, as a user's would be.
    Returns the two run folders and the killed run's config file."""
    killed_yaml = write_config(killed_cfg, tmp_path / "killed.yaml")
    killed, reference = Path(killed_cfg.run_dir), Path(reference_cfg.run_dir)

    procs: list[subprocess.Popen] = []

    def train(config: Path, name: str) -> subprocess.Popen:
        log = (tmp_path / f"{name}.stderr").open("wb")  # a file, not a pipe that could fill and block
        procs.append(subprocess.Popen([*orpo_distill_command(), "train", str(config), "--no-progress"],
                                      stdout=subprocess.DEVNULL, stderr=log))
        log.close()
        return procs[-1]

    def stderr(name: str) -> str:
        return (tmp_path / f"{name}.stderr").read_text(errors="replace")[-2000:]

    uninterrupted = train(write_config(reference_cfg, tmp_path / "reference.yaml"), "reference")
    proc = train(killed_yaml, "killed")
    try:
        deadline = time.monotonic() + 300
        while not (killed / "checkpoints" / "epoch_1" / "state.json").is_file():
            assert proc.poll() is None, f"training ended before its first checkpoint: {stderr('killed')}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert not (killed / "model").exists(), "the run finished before the kill; the test proves nothing"
        assert latest_checkpoint(killed).name in ("epoch_1", "epoch_2")

        # rerun to completion: the same command
        assert train(killed_yaml, "resumed").wait(timeout=300) == 0, stderr("resumed")
        assert uninterrupted.wait(timeout=300) == 0, stderr("reference")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return killed, reference, killed_yaml


def test_training_killed_after_a_checkpoint_resumes_to_the_same_weights(tiny_config: Any, tmp_path: Path) -> None:
    killed_cfg = tiny_config(**FAST, run_dir=str(tmp_path / "killed"))
    reference_cfg = tiny_config(**FAST, run_dir=str(tmp_path / "reference"))
    killed, reference, killed_yaml = kill_after_first_checkpoint_then_resume(killed_cfg, reference_cfg, tmp_path)

    resumes = [e for e in read_metrics(killed / "metrics.jsonl") if e["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["epoch"] in (1, 2)
    a, b = weights(killed), weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill and resume"
    initial = load_file(str(Path(killed_cfg.student.model) / "model.safetensors"))
    assert any(not torch.equal(a[k], initial[k]) for k in a), "training changed nothing; the comparison proves nothing"
    # the same data was trained on, and the steps after the resume logged the same numbers
    for epoch in (1, 2, 3):
        assert (killed / "pairs" / f"epoch_{epoch}.jsonl").read_text() == (reference / "pairs" / f"epoch_{epoch}.jsonl").read_text()
    steps = {e["step"]: e["loss"] for e in read_metrics(reference / "metrics.jsonl") if e["event"] == "train"}
    after = [e for e in read_metrics(killed / "metrics.jsonl") if e["event"] == "train"][-4:]
    assert [e["step"] for e in after] == list(range(3, 7))
    assert all(e["loss"] == steps[e["step"]] for e in after)

    # killed after the last checkpoint but before model/ was exported: a rerun exports it
    shutil.rmtree(killed / "model")
    assert cli.main(["train", str(killed_yaml), "--no-progress"]) == 0
    again = weights(killed)
    assert all(torch.equal(again[k], b[k]) for k in b)


# ---- checkpoints are whole or absent -----------------------------------------------------------------


class _Saveable:
    def __init__(self, tag: str):
        self.tag = tag

    def save_pretrained(self, path: Path) -> None:
        (Path(path) / f"{self.tag}.json").write_text("{}")

    def state_dict(self) -> dict[str, Any]:
        return {"tag": self.tag}


def _save(run_dir: Path, epoch: int) -> Path:
    return save_checkpoint(run_dir, epoch, _Saveable("model"), _Saveable("tokenizer"), _Saveable("opt"),
                           _Saveable("sched"), {"q": []}, {"global_step": epoch * 10})


def test_latest_checkpoint_ignores_and_removes_leftover_temp_folders(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    # a write of epoch 2 killed midway: even its state.json is there, but it was never renamed into place
    stale = root / ".epoch_2.tmp"
    stale.mkdir()
    (stale / "model.json").write_text("{}")
    (stale / "state.json").write_text(json.dumps({"epoch": 2}))
    # a folder without state.json (not complete) is not a checkpoint either
    (root / "epoch_3").mkdir()
    assert latest_checkpoint(tmp_path) == root / "epoch_1"
    assert not stale.exists()
    assert (root / "epoch_3").exists(), "only temp folders are removed"


def test_latest_checkpoint_orders_epochs_as_numbers(tmp_path: Path) -> None:
    for e in (2, 9, 10):
        _save(tmp_path, e)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "epoch_10"
    state = json.loads((tmp_path / "checkpoints" / "epoch_10" / "state.json").read_text())
    assert state == {"global_step": 100, "epoch": 10}


def test_a_checkpoint_write_that_dies_midway_leaves_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path, 1)
    real_save = torch.save

    def dying_save(obj: Any, path: Any, *a: Any, **kw: Any) -> None:
        if str(getattr(path, "name", path)).endswith("rng.pt"):  # a path, or the file it was opened as
            raise KeyboardInterrupt  # stands in for a kill between two files
        real_save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoints.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert not (root / "epoch_2").exists() and (root / ".epoch_2.tmp").exists()
    assert latest_checkpoint(tmp_path) == root / "epoch_1"
    assert not (root / ".epoch_2.tmp").exists()
    # and the next attempt writes it whole
    _save(tmp_path, 2)
    assert latest_checkpoint(tmp_path) == root / "epoch_2"
    assert {p.name for p in (root / "epoch_2").iterdir()} == {
        "model.json", "tokenizer.json", "optimizer.pt", "scheduler.pt", "rng.pt", "buffer.json", "state.json"}


class _FakeDeepSpeedEngine:
    """DeepSpeed's checkpoint calls as the engine makes them: each rank writes its partition under
    ``save_dir/tag``; ``load_checkpoint`` returns (path, client state), or (None, None) when it finds nothing."""

    def __init__(self, rank: int = 0):
        self.rank, self.loaded = rank, []

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = True) -> None:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt").write_bytes(b"partition")

    def load_checkpoint(self, load_dir: str, tag: str, **kw: Any) -> tuple[Any, Any]:
        found = (Path(load_dir) / tag / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt").is_file()
        self.loaded.append((load_dir, tag, kw))
        return (load_dir, {}) if found else (None, None)


def test_a_deepspeed_checkpoint_holds_every_ranks_partition_and_resumes_only_with_the_same_world_size(
        tmp_path: Path) -> None:
    """Every rank stages its partition beside the checkpoint; the main process moves the staging folder in
    as ``deepspeed/`` with the rest, and a resume loads it back with the optimizer states. A staging folder a
    kill left behind is removed like a temp folder; another world size, a checkpoint without DeepSpeed state,
    and a load that finds nothing are refused with what to do."""
    from orpo_distill.errors import UserError

    for rank in (0, 1):
        staged = checkpoints.save_deepspeed_state(_FakeDeepSpeedEngine(rank), tmp_path, 1)
    assert staged == tmp_path / "checkpoints" / ".epoch_1.deepspeed.tmp"
    ckpt = save_checkpoint(tmp_path, 1, _Saveable("model"), _Saveable("tokenizer"), None, _Saveable("sched"),
                           {"q": []}, {"global_step": 3, "world_size": 2}, deepspeed_state=staged)
    assert not staged.exists() and not (ckpt / "optimizer.pt").exists()
    assert sorted(p.name for p in (ckpt / "deepspeed" / "state").iterdir()) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    engine = _FakeDeepSpeedEngine(1)
    checkpoints.load_deepspeed_state(engine, ckpt, world_size=2)
    assert engine.loaded == [(str(ckpt / "deepspeed"), "state", {"load_optimizer_states": True,
                                                                 "load_lr_scheduler_states": False})]
    with pytest.raises(UserError, match="written by 2 DeepSpeed processes and this run has 4"):
        checkpoints.load_deepspeed_state(_FakeDeepSpeedEngine(0), ckpt, world_size=4)
    with pytest.raises(UserError, match="could not load"):
        checkpoints.load_deepspeed_state(_FakeDeepSpeedEngine(2), ckpt, world_size=2)  # no partition 2
    # a plain (one-process) run cannot resume a DeepSpeed checkpoint's optimizer, and says how to
    with pytest.raises(UserError, match="resume it under DeepSpeed with the same number of processes"):
        checkpoints.load_training_state(ckpt, None, None)
    # a DeepSpeed run cannot resume a checkpoint without DeepSpeed state
    plain = _save(tmp_path / "plain", 1)
    with pytest.raises(UserError, match="holds no DeepSpeed state"):
        checkpoints.load_deepspeed_state(_FakeDeepSpeedEngine(0), plain, world_size=2)

    # a kill after the ranks staged epoch 2 but before the rename: the next start removes the staging
    leftover = checkpoints.save_deepspeed_state(_FakeDeepSpeedEngine(0), tmp_path, 2)
    assert leftover.is_dir()
    assert latest_checkpoint(tmp_path) == ckpt and not leftover.exists()


def test_sft_first_then_the_term_killed_after_the_sft_epoch_resumes_to_the_same_weights(
        tiny_config: Any, tmp_path: Path) -> None:
    """``train.sft_epochs: 1`` of 3: killed after the SFT epoch's checkpoint (or later), the rerun samples the
    SFT'd student's negatives where the kill left them and trains the term's epochs to the same weights."""
    staged = {**FAST, "train.sft_epochs": 1}
    killed_cfg = tiny_config(**staged, run_dir=str(tmp_path / "killed"))
    reference_cfg = tiny_config(**staged, run_dir=str(tmp_path / "reference"))
    killed, reference, _ = kill_after_first_checkpoint_then_resume(killed_cfg, reference_cfg, tmp_path)
    assert [e["epoch"] for e in read_metrics(killed / "metrics.jsonl") if e["event"] == "resume"] in ([1], [2])
    a, b = weights(killed), weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in b), "the two-stage run resumed to other weights"
    for name in ("student/epoch_2.jsonl", "pairs/epoch_1.jsonl", "pairs/epoch_2.jsonl", "pairs/epoch_3.jsonl"):
        assert sorted((killed / name).read_text().splitlines()) == sorted((reference / name).read_text().splitlines())
    assert "completion" in (killed / "pairs" / "epoch_1.jsonl").read_text()  # epoch 1 was the SFT stage
    assert '"rejected_epoch": 2' in (killed / "pairs" / "epoch_2.jsonl").read_text()
