"""A disk that fills up and a run directory that cannot be written: one clear line, exit 2, and the last
good state intact (stores parse with no key lost or doubled, the last checkpoint loads), then a rerun
with room finishes the job.

How the faults are made, in order of preference:

- a full disk: a small ``tmpfs`` mounted for the test (needs root with CAP_SYS_ADMIN, as in this
  project's containers), which fails writes with ENOSPC; elsewhere a per-process file-size limit
  (``RLIMIT_FSIZE``, SIGXFSZ ignored) on the child, which fails writes past it with EFBIG;
- a read-only run directory: the same tmpfs remounted read-only (EROFS); as a user that is not root,
  ``chmod -R a-w`` (EACCES; root ignores file modes); as root without mount, ``chattr +i`` (EPERM).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import set_dotted, tiny_config_dict
from orpo_distill import cli
from orpo_distill.checkpoints import latest_checkpoint

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
    train_config,
    write_yaml,
)

pytestmark = pytest.mark.slow  # whole runs or several processes: left out of `make test-fast`


def _mount(*args: str) -> bool:
    """Run mount; False where that cannot work (or ORPO_FAULTS_NO_MOUNT=1 asks for the fallbacks)."""
    if os.geteuid() != 0 or not shutil.which("mount") or os.environ.get("ORPO_FAULTS_NO_MOUNT"):
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


class SmallDisk:
    """A folder on which writes fail past ``size`` bytes: all files together (tmpfs) or each file
    (RLIMIT_FSIZE fallback). ``grow()`` makes room, as freeing space would."""

    def __init__(self, root: Path, size: int):
        self.root, self.size = root, size
        root.mkdir()
        self.mode = "tmpfs" if _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)) else "rlimit"
        self.limit: int | None = size

    @property
    def errno_name(self) -> str:
        return "ENOSPC" if self.mode == "tmpfs" else "EFBIG"

    @property
    def strerror(self) -> str:
        return "No space left on device" if self.mode == "tmpfs" else "File too large"

    def preexec(self) -> Callable[[], None] | None:
        if self.mode == "tmpfs" or self.limit is None:
            return None
        limit = self.limit

        def limit_file_size() -> None:  # in the child, before exec: SIG_IGN survives the exec
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return limit_file_size

    def grow(self) -> None:
        if self.mode == "tmpfs":
            assert _mount("-o", "remount,size=512m", str(self.root))
        self.limit = None

    def close(self) -> None:
        if self.mode == "tmpfs":
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], SmallDisk]]:
    disks: list[SmallDisk] = []

    def make(size: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size))
        return disks[-1]

    yield make
    for d in disks:
        d.close()


# ---- the teacher store fills the disk ------------------------------------------------------------------------

QUESTIONS, K = 200, 4  # about 49 KB of traces per chunk of 32 questions


def teacher_config(run_dir: Path, model: Path, path: Path) -> Path:
    data = tiny_config_dict(run_dir, model)
    set_dotted(data, "dataset.train_size", QUESTIONS)
    set_dotted(data, "teacher.sampling.samples", K)
    return write_yaml(data, path)


def test_disk_full_during_teacher_sampling(tmp_path: Path, tiny_model_dir: Path, small_disk: Any) -> None:
    disk = small_disk(80 * 1024)  # room for the config and one chunk of traces, not two
    run_dir = disk.root / "run"
    config = teacher_config(run_dir, tiny_model_dir, tmp_path / "teacher.yaml")
    store = run_dir / "teacher" / "traces.jsonl"
    expected = [(f"syn-{q:06d}", s) for q in range(QUESTIONS) for s in range(K)]

    full = run_cli(["teacher", str(config), "--no-progress"], tmp_path / "full.log", preexec_fn=disk.preexec())
    assert full.returncode == 2, full.stdout[-3000:]
    no_traceback(full.stdout)
    assert error_message(full.stdout) == (
        f"orpo-distill: error: cannot write {store}: {disk.strerror} [{disk.errno_name}]; free some space (or raise "
        "the limit), then rerun the same command (finished work is kept)")
    stored = complete_rows(store)  # every whole line parses; a torn tail, if any, is not a row
    assert 0 < len(stored) < len(expected)
    keys = [(r["id"], r["sample"]) for r in stored]
    assert len(set(keys)) == len(keys) and set(keys) <= set(expected)

    disk.grow()
    again = run_cli(["teacher", str(config), "--no-progress"], tmp_path / "again.log", preexec_fn=disk.preexec())
    assert again.returncode == 0, again.stdout[-3000:]
    rows = check_store(store, expected)
    assert rows[: len(stored)] == stored, "a sample stored before the disk filled was changed"

    reference = teacher_config(tmp_path / "reference", tiny_model_dir, tmp_path / "reference.yaml")
    assert cli.main(["teacher", str(reference), "--no-progress"]) == 0
    ref = check_store(tmp_path / "reference" / "teacher" / "traces.jsonl", expected)
    assert {(r["id"], r["sample"], r["text"]) for r in rows} == {(r["id"], r["sample"], r["text"]) for r in ref}


# ---- a checkpoint fills the disk --------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_write(tmp_path: Path, tiny_model_dir: Path, small_disk: Any,
                                             train_reference: Any) -> None:
    """tmpfs: room for one checkpoint (about 23 MB) but not two, so epoch 2's write fails and epoch 1's must
    survive; file-size limit: 8 MB, so epoch 1's optimizer state (13 MB) fails and no checkpoint exists."""
    disk = small_disk(32 * 1024 * 1024)
    if disk.mode == "rlimit":
        disk.limit = 8 * 1024 * 1024
    failing_epoch = 2 if disk.mode == "tmpfs" else 1
    run_dir = disk.root / "run"
    config = train_config(run_dir, tiny_model_dir, tmp_path / "train.yaml")

    full = run_cli(["train", str(config), "--no-progress"], tmp_path / "full.log", preexec_fn=disk.preexec())
    assert full.returncode == 2, full.stdout[-3000:]
    no_traceback(full.stdout)
    assert error_message(full.stdout) == (
        f"orpo-distill: error: cannot write {run_dir}/checkpoints/epoch_{failing_epoch}: {disk.strerror} "
        f"[{disk.errno_name}]; free some space (or raise the limit), then rerun the same command "
        "(finished work is kept)")
    ckpts = run_dir / "checkpoints"
    assert not (ckpts / f".epoch_{failing_epoch}.tmp").exists(), "the failed write's space was not given back"
    assert not (ckpts / f"epoch_{failing_epoch}").exists() and not (run_dir / "model").exists()
    check_training_stores(run_dir)
    if failing_epoch == 2:  # the last good checkpoint is whole and loads
        assert latest_checkpoint(run_dir) == ckpts / "epoch_1"
        assert json.loads((ckpts / "epoch_1" / "state.json").read_text())["epoch"] == 1
        assert model_weights(ckpts / "epoch_1")
    else:
        assert latest_checkpoint(run_dir) is None

    disk.grow()
    again = run_cli(["train", str(config), "--no-progress"], tmp_path / "again.log", preexec_fn=disk.preexec())
    assert again.returncode == 0, again.stdout[-3000:]
    check_training_stores(run_dir)
    assert_same_weights(model_weights(run_dir / "model"), train_reference.weights())


# ---- a read-only run directory ------------------------------------------------------------------------------------


class ReadOnly:
    """Makes a folder read-only by the strongest means this machine allows (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.mounted = _mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(root))
        self.how = ""

    def freeze(self) -> tuple[str, str]:
        """Make it read-only; returns the strerror and errno name a write then meets."""
        if self.mounted and _mount("-o", "remount,ro", str(self.root)):
            self.how = "tmpfs remounted read-only"
            return "Read-only file system", "EROFS"
        if os.geteuid() != 0:
            for p in [self.root, *self.root.rglob("*")]:
                p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            self.how = "chmod -R a-w"
            return "Permission denied", "EACCES"
        if shutil.which("chattr") and subprocess.run(["chattr", "-R", "+i", str(self.root)]).returncode == 0:
            self.how = "chattr -R +i"
            return "Operation not permitted", "EPERM"
        pytest.skip("no way to make a folder read-only here (root, no mount, no chattr)")

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)
        elif self.how.startswith("chattr"):
            subprocess.run(["chattr", "-R", "-i", str(self.root)], capture_output=True)
        elif self.how.startswith("chmod"):
            for p in [self.root, *self.root.rglob("*")]:
                p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_read_only_run_directory(tmp_path: Path, tiny_model_dir: Path) -> None:
    ro = ReadOnly(tmp_path / "ro")
    try:
        run_dir = ro.root / "run"
        data = tiny_config_dict(run_dir, tiny_model_dir)
        config = write_yaml(data, tmp_path / "run.yaml")
        assert cli.main(["teacher", str(config), "--no-progress"]) == 0
        store = run_dir / "teacher" / "traces.jsonl"
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        strerror, code = ro.freeze()

        failed = run_cli(["student", str(config), "--no-progress"], tmp_path / "student.log", env=child_env())
        assert failed.returncode == 2, failed.stdout[-3000:]
        no_traceback(failed.stdout)
        assert error_message(failed.stdout) == (
            f"orpo-distill: error: cannot access {run_dir}/config.yaml: {strerror} [{code}]; the run directory must "
            "be a folder you can write to, then rerun the same command (finished work is kept)"), ro.how
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
        check_store(store, [(f"syn-{q:06d}", s) for q in range(12) for s in range(3)])
    finally:
        ro.close()
