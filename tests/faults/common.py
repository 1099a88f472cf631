"""Helpers the fault tests share: running the real command, and checking a store for lost or doubled keys.

Every store check is an assertion (no key lost, no key twice) and is also tallied, so that the end of a
``pytest tests/faults`` run prints how many keys were checked and how many were lost or doubled (zero).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from conftest import FAST_TRAIN

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).resolve().with_name("launcher.py")

# filled by check_store; printed by conftest.pytest_terminal_summary
TALLY = {"stores": 0, "keys": 0, "lost": 0, "duplicates": 0}


def orpo_distill_command() -> list[str]:
    """The installed console script beside this interpreter (the module as a fallback)."""
    script = Path(sys.executable).parent / "orpo-distill"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "orpo_distill.cli"]


def launcher_command() -> list[str]:
    """``python tests/faults/launcher.py``: orpo_distill.cli.main in a real process, with the fault that
    the FAULT_* environment variables name patched in (test code only; the product has no hooks)."""
    return [sys.executable, str(LAUNCHER)]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.update(extra)
    return env


def write_yaml(data: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def run_cli(args: list[str], log: Path, *, launcher: bool = False, env: dict[str, str] | None = None,
            timeout: float = 300, **popen: Any) -> subprocess.CompletedProcess:
    """Run the command to its end as a real process; stdout and stderr go to ``log`` (a file, not a pipe)."""
    cmd = [*(launcher_command() if launcher else orpo_distill_command()), *args]
    with log.open("wb") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or child_env(), timeout=timeout,
                              **popen)
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(errors="replace"), "")


def start_cli(args: list[str], log: Path, *, launcher: bool = False, env: dict[str, str] | None = None,
              **popen: Any) -> subprocess.Popen:
    cmd = [*(launcher_command() if launcher else orpo_distill_command()), *args]
    with log.open("wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or child_env(), **popen)


def wait_for(condition: Any, proc: subprocess.Popen, log: Path, timeout: float = 240, poll: float = 0.002) -> None:
    """Poll ``condition()`` at high frequency until it holds; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before the fault point:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"fault point not reached within {timeout} s")
        time.sleep(poll)


def complete_rows(path: Path) -> list[dict[str, Any]]:
    """Every whole line of a JSONL store, each of which must parse (a torn last line is not a row)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].split(b"\n") if line.strip()]


def check_store(path: Path, expected: Iterable[tuple[str, int]] | None = None) -> list[dict[str, Any]]:
    """Assert that the store at ``path`` parses, holds no key twice and (when ``expected`` is given) holds
    exactly the expected ``(id, sample)`` keys. Returns its rows."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path} ends in a torn line"
    rows = complete_rows(path)
    keys = [(str(r["id"]), int(r["sample"])) for r in rows]
    duplicates = len(keys) - len(set(keys))
    lost = len(set(expected) - set(keys)) if expected is not None else 0
    extra = set(keys) - set(expected) if expected is not None else set()
    TALLY["stores"] += 1
    TALLY["keys"] += len(set(keys))
    TALLY["lost"] += lost
    TALLY["duplicates"] += duplicates
    assert duplicates == 0, f"{path}: {duplicates} keys stored twice"
    assert lost == 0, f"{path}: {lost} keys missing"
    assert not extra, f"{path}: unexpected keys {sorted(extra)[:5]}"
    return rows


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]


def error_message(text: str) -> str:
    """The ``orpo-distill: error:`` message of a failed command: there must be exactly one, and it is one
    line, or (a config with several wrong fields) one line followed by one indented line per field."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("orpo-distill: error:")]
    assert len(starts) == 1, text[-3000:]
    i = starts[0]
    message = [lines[i]]
    while i + 1 < len(lines) and lines[i + 1].startswith("  "):
        i += 1
        message.append(lines[i])
    return "\n".join(message)


# ---- one small training run, shared by the kill, NaN and disk-full tests ---------------------------------

TRAIN_FAST = {**FAST_TRAIN, "student.device": "cpu"}  # CPU: bitwise-equal weights across runs


def train_config(run_dir: Path, model_dir: Path, path: Path) -> Path:
    """The small mixed-policy training run (2 epochs of 2 steps), written as YAML to ``path``."""
    from conftest import set_dotted, tiny_config_dict

    data = tiny_config_dict(run_dir, model_dir)
    for key, value in TRAIN_FAST.items():
        set_dotted(data, key, value)
    return write_yaml(data, path)


def model_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


def check_training_stores(run_dir: Path, questions: int = 4, teacher_k: int = 3, student_k: int = 2) -> None:
    """No lost or doubled key in the teacher store and the initial student store of the small run."""
    ids = [f"syn-{q:06d}" for q in range(questions)]
    check_store(run_dir / "teacher" / "traces.jsonl", [(i, s) for i in ids for s in range(teacher_k)])
    check_store(run_dir / "student" / "epoch_1.jsonl", [(i, s) for i in ids for s in range(student_k)])
    refreshed = run_dir / "student" / "epoch_2.jsonl"
    if refreshed.exists():  # the refresh of epoch 2 samples a share phi of the questions, K each
        rows = check_store(refreshed)
        got = {(str(r["id"]), int(r["sample"])) for r in rows}
        assert got == {(i, s) for i in {r["id"] for r in rows} for s in range(student_k)}


class TrainReference:
    """The small training run, uninterrupted, as its own process; started at once, awaited on use."""

    def __init__(self, folder: Path, model_dir: Path):
        self.run_dir = folder / "run"
        self.log = folder / "train.log"
        self.config = train_config(self.run_dir, model_dir, folder / "train.yaml")
        self.proc = start_cli(["train", str(self.config), "--no-progress"], self.log)

    def weights(self) -> dict[str, Any]:
        assert self.proc.wait(timeout=300) == 0, self.log.read_text(errors="replace")[-3000:]
        return model_weights(self.run_dir / "model")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
