"""The ``orpo-distill`` command: stage summaries, clean user errors, and a teacher stage that survives SIGKILL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest


from fake_openai_server import FakeOpenAIServer, Good, Received, Slow
from orpo_distill import cli
from orpo_distill.config import RunConfig
from orpo_distill.store import read_jsonl
from conftest import write_config




def orpo_distill_command() -> list[str]:
    """The installed console script beside this interpreter (the module as a fallback)."""
    script = Path(sys.executable).parent / "orpo-distill"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "orpo_distill.cli"]


# ---------------------------------------------------------------------------------------------
# stages in-process


@pytest.mark.slow
def test_teacher_and_student_print_their_summaries(tiny_config, tmp_path, capsys):
    cfg = tiny_config()
    path = write_config(cfg, tmp_path / "run.yaml")

    assert cli.main(["teacher", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "teacher traces" in out and "correct share" in out and "questions with no positive" in out
    assert "36 (36)" in out  # 12 questions x 3 samples, all new
    assert len(list(read_jsonl(Path(cfg.run_dir) / "teacher" / "traces.jsonl"))) == 36

    assert cli.main(["student", str(path), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "student samples" in out and "24 (24)" in out
    assert "generate hf:" not in err  # --no-progress reaches the local generator too
    rows = list(read_jsonl(Path(cfg.run_dir) / "student" / "epoch_1.jsonl"))
    assert len(rows) == 24 and {r["source"] for r in rows} == {"student/epoch_1"}
    assert all(r["num_tokens"] <= 24 for r in rows)

    # a second call finds everything on disk and generates nothing new
    assert cli.main(["teacher", str(path), "--no-progress"]) == 0
    assert "36 (0)" in capsys.readouterr().out


def test_bad_config_exits_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  phii: 0.5\n", encoding="utf-8")
    assert cli.main(["teacher", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("orpo-distill: error:") and "train.phii" in err and "Traceback" not in err

    assert cli.main(["teacher", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "error: config file not found" in err and "Traceback" not in err

    good = tmp_path / "good.yaml"
    good.write_text(f"run_dir: {tmp_path / 'r'}\n", encoding="utf-8")
    assert cli.main(["teacher", str(good), "--set", "teacher.sampling.samples=0"]) == 2
    err = capsys.readouterr().err
    assert "teacher.sampling.samples" in err and "Traceback" not in err


def test_bad_config_exits_2_as_a_real_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  phi: [0.5\n", encoding="utf-8")
    proc = subprocess.run([*orpo_distill_command(), "teacher", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "orpo-distill: error:" in proc.stderr and "malformed YAML" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_student_epoch_2_before_training_is_a_clear_error(tiny_config, tmp_path, capsys):
    path = write_config(tiny_config(), tmp_path / "run.yaml")
    assert cli.main(["student", str(path), "--epoch", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: no complete checkpoint for epoch 1" in err and "orpo-distill train" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# the kill test: a teacher stage killed midway loses nothing, duplicates nothing, and resumes


QUESTIONS, K = 160, 3  # 160 questions are five chunks of 32 in the sampling stage


def teacher_reply(prompt: str, seed: int) -> str:
    """The fake teacher's answer, a pure function of the question and the per-sample seed."""
    h = zlib.crc32(f"{prompt}|{seed}".encode())
    return f"Working {h:08x} with seed {seed}.\nThe answer is ({'ABCD'[h % 4]})."


class DeterministicTeacher:
    """Replies to a request for ``n`` choices with seed ``s`` with the replies for seeds ``s .. s+n-1``,
    as a seeded server would, so a resumed run can match an uninterrupted one sample for sample.

    With ``hold_after`` set, every request after that many hangs (until the server closes), so a
    process can be killed with work in flight at a point that does not depend on timing.
    """

    def __init__(self) -> None:
        self.hold_after: int | None = None
        self._count = itertools.count(1)

    def __call__(self, rec: Received) -> Slow | Good:
        body = rec.body or {}
        texts = [teacher_reply(rec.prompt, int(body["seed"]) + i) for i in range(int(body["n"]))]
        if self.hold_after is not None and next(self._count) > self.hold_after:
            return Slow(600, Good(texts=texts))
        return Good(texts=texts)


def openai_teacher_config(tiny_config, server: FakeOpenAIServer, run_dir: Path) -> RunConfig:
    return tiny_config(**{
        "run_dir": str(run_dir),
        "dataset.train_size": QUESTIONS,
        "teacher": {"kind": "openai", "base_url": server.base_url, "model": "teacher-x", "max_concurrency": 4,
                    "timeout": 30, "sampling": {"samples": K, "temperature": 1.0, "max_tokens": 64}},
    })


def complete_lines(path: Path) -> list[bytes]:
    data = path.read_bytes() if path.exists() else b""
    return data.split(b"\n")[:-1]  # whatever follows the last newline is a torn line


@pytest.mark.slow
def test_teacher_killed_midway_resumes_without_loss_or_duplicates(tiny_config, tmp_path, capsys):
    responder = DeterministicTeacher()
    with FakeOpenAIServer(responder) as server:
        killed_cfg = openai_teacher_config(tiny_config, server, tmp_path / "killed")
        config_path = write_config(killed_cfg, tmp_path / "killed.yaml")
        traces = Path(killed_cfg.run_dir) / "teacher" / "traces.jsonl"

        # 1. a real process; after the first chunk and a few requests of the second, the teacher hangs;
        #    SIGKILL as soon as the first chunk is stored, with the second chunk in flight
        responder.hold_after = 32 + 5
        log = (tmp_path / "teacher.log").open("w")
        proc = subprocess.Popen([*orpo_distill_command(), "teacher", str(config_path), "--no-progress"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and proc.poll() is None and not complete_lines(traces):
                time.sleep(0.01)
            while time.monotonic() < deadline and proc.poll() is None and len(server.received) <= 32 + 5:
                time.sleep(0.01)  # until the second chunk has answers in hand and requests hanging
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
            log.close()
        assert proc.returncode == -signal.SIGKILL, (tmp_path / "teacher.log").read_text()
        stored_at_kill = len(complete_lines(traces))
        assert stored_at_kill == 32 * K  # the first chunk, fsynced before the second began
        assert len(server.received) > 32 + 5  # killed with answered-but-unstored work and requests in flight
        # Appends are whole chunks, so this kill left none torn. Make the tail look like a kill in the
        # middle of that append: the last question keeps two of its samples and half of the third.
        lines = complete_lines(traces)
        traces.write_bytes(b"".join(x + b"\n" for x in lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
        stored_at_kill = len(lines) - 1

        # 2. rerun the same command to completion (in-process; nothing hangs now)
        responder.hold_after = None
        asked_before = len(server.received)
        assert cli.main(["teacher", str(config_path), "--no-progress"]) == 0
        assert f"{QUESTIONS * K} ({QUESTIONS * K - stored_at_kill})" in capsys.readouterr().out
        rerun_asked = sum(int(r.body["n"]) for r in server.received[asked_before:])
        assert rerun_asked == QUESTIONS * K - stored_at_kill  # only what was missing was paid for

        # 3. an uninterrupted run of the same config into another run dir
        reference_cfg = openai_teacher_config(tiny_config, server, tmp_path / "reference")
        assert cli.main(["teacher", str(write_config(reference_cfg, tmp_path / "reference.yaml")), "--no-progress"]) == 0

    data = traces.read_bytes()
    assert data.endswith(b"\n")
    rows = [json.loads(line) for line in data.split(b"\n")[:-1]]  # every line whole and valid JSON
    keys = [(r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == QUESTIONS * K
    assert set(keys) == {(f"syn-{q:06d}", i) for q in range(QUESTIONS) for i in range(K)}

    def content(rs: list[dict]) -> set[tuple]:
        return {(r["id"], r["sample"], r["text"], r["correct"]) for r in rs}

    reference = list(read_jsonl(Path(reference_cfg.run_dir) / "teacher" / "traces.jsonl"))
    assert content(rows) == content(reference)
    assert 0 < sum(r["correct"] for r in rows) < len(rows)  # the comparison covers both outcomes
