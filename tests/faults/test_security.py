"""Secrets stay secret, code runs only when the config says so, and a run writes only inside its run_dir.

Already covered, not repeated (docs/reliability.md lists them): the key redacted from the generator's
errors, repr, stats and logs (tests/test_openai_generator.py::test_key_never_leaks_into_repr_stats_errors_or_logs),
the teacher stage alone writing no key into its run_dir (tests/test_config.py::test_secrets_never_reach_the_run_dir),
custom task code used once allowed (tests/test_tasks.py). The refusals, each proven not to run the code,
are rows of tests/faults/test_bad_inputs.py: custom-not-allowed, model-needs-remote-code, yaml-python-tag,
replay-yaml-tag, replay-pickle, api-key-unsendable.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import tiny_config_dict
from fake_openai_server import FakeOpenAIServer, Good, Received, Status
from orpo_distill import cli

from .common import check_store, child_env, orpo_distill_command, write_yaml
from .test_bad_inputs import MARKER, Ctx, remote_code_model

SECRET = "sk-live-faults-7Hq2-DO-NOT-LEAK"
QUESTIONS = [{"id": f"s{i}", "question": f"Which letter is number {i % 3 + 1}?", "choices": ["A", "B", "C"],
              "answer": "ABC"[i % 3]} for i in range(10)]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_full_run_writes_no_key_anywhere_and_nothing_outside_its_run_dir(tmp_path: Path, tmp_path_factory: Any,
                                                                        tiny_model_dir: Path) -> None:
    """`orpo-distill run` (teacher behind the fake server with a secret key, student, evaluation, training)
    then `orpo-distill report`, as real processes: every file of the run, and all they printed, is free of
    the key; and the only files created or changed anywhere under the test's folder are in run_dir, which
    is given with a '..' in it, while the dataset sits in another folder."""
    data_dir, work = tmp_path / "data", tmp_path / "work"
    data_dir.mkdir(), work.mkdir()
    dataset = data_dir / "questions.jsonl"
    dataset.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    run_dir = tmp_path / "work" / ".." / "runs" / "secure"
    logs = tmp_path_factory.mktemp("security-logs")

    def responder(rec: Received) -> Good:
        body = rec.body or {}
        texts = []
        for i in range(int(body["n"])):
            h = zlib.crc32(f"{rec.prompt}|{body['seed'] + i}".encode())
            texts.append(f"Step {h:08x}.\nThe answer is ({'ABC'[h % 3]}).")
        return Good(texts=texts)

    with FakeOpenAIServer(responder) as server:
        # the first request is refused with a body that echoes the key back, as some proxies do
        server.push(Status(401, body=json.dumps({"error": f"invalid key Bearer {SECRET}"})))
        cfg = tiny_config_dict(run_dir, tiny_model_dir)
        cfg.update(
            dataset={"kind": "jsonl", "path": str(dataset), "eval_fraction": 0.2},
            teacher={"kind": "openai", "base_url": server.base_url, "model": "teacher-x", "max_concurrency": 1,
                     "api_key_env": "ORPO_FAULTS_TEACHER_KEY", "sampling": {"samples": 2},
                     "max_failed_share": 0.5},  # the refused first request must not stop the run
        )
        cfg["student"]["sampling"].update(samples=1, max_tokens=4)
        cfg["train"].update(epochs=1, batch_size=4, precision="fp32", max_length=128)
        cfg["eval"].update(max_tokens=8, every_epoch=False)
        config = write_yaml(cfg, tmp_path / "run.yaml")
        before = snapshot(tmp_path)
        env = child_env(ORPO_FAULTS_TEACHER_KEY=SECRET)
        printed = []
        for args in (["run", str(config), "--no-progress"], ["report", str(run_dir)]):
            proc = subprocess.run([*orpo_distill_command(), *args], capture_output=True, cwd=work, env=env, timeout=600)
            printed.append(proc.stdout + proc.stderr)
            (logs / f"{args[0]}.log").write_bytes(printed[-1])
            assert proc.returncode == 0, printed[-1][-3000:].decode(errors="replace")
        assert server.received and all(r.headers["authorization"] == f"Bearer {SECRET}" for r in server.received)

    real_run_dir = run_dir.resolve()
    assert real_run_dir == tmp_path / "runs" / "secure"
    written = {p for p, h in snapshot(tmp_path).items() if before.get(p) != h}
    outside = sorted(p for p in written if not Path(p).is_relative_to(real_run_dir))
    assert outside == [], f"written outside run_dir: {outside}"
    assert snapshot(data_dir) == {k: v for k, v in before.items() if k.startswith(str(data_dir))}
    assert list(work.iterdir()) == []
    names = {Path(p).relative_to(real_run_dir).as_posix() for p in written}
    assert {"config.yaml", "teacher/traces.jsonl", "teacher/traces.failures.jsonl", "student/epoch_1.jsonl",
            "pairs/epoch_1.jsonl", "metrics.jsonl", "eval/summary.json", "model/model.safetensors",
            "checkpoints/epoch_1/optimizer.pt", "report.md", "report.html"} <= names

    secret = SECRET.encode()
    for p in real_run_dir.rglob("*"):
        if p.is_file():
            assert secret not in p.read_bytes(), f"the key is in {p}"
    for out in printed:
        assert secret not in out
    assert b"invalid key Bearer ***" in (real_run_dir / "teacher" / "traces.failures.jsonl").read_bytes()
    saved = yaml.safe_load((real_run_dir / "config.yaml").read_text())
    assert saved["teacher"]["api_key_env"] == "ORPO_FAULTS_TEACHER_KEY"


@pytest.mark.slow
def test_remote_model_code_runs_only_with_trust_remote_code(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The refusal (trust_remote_code unset: the code does not run) is the bad-input row
    model-needs-remote-code; this is the other half: set, the model's own code does run, so the marker
    that row checks for would have shown it."""
    ctx = Ctx(tmp_path, tiny_model_dir)
    model = remote_code_model(ctx)
    config = ctx.config(**{"student.model": model, "student.trust_remote_code": True, "dataset.train_size": 2,
                           "student.sampling.samples": 1, "student.sampling.max_tokens": 2})
    env = child_env(HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    proc = subprocess.run([*orpo_distill_command(), "student", config, "--no-progress"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / MARKER).read_text() == "ran"


def test_replay_file_content_is_data_never_code(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Traces that hold Python, a YAML python tag and pickle opcodes (as text) are stored as text and
    graded as text; nothing in them runs. (Raw pickle bytes and bare YAML lines are refused outright: rows
    replay-pickle and replay-yaml-tag.)"""
    marker = tmp_path / MARKER
    hostile = [
        f"__import__('os').system('touch {marker}')\nThe answer is (A).",
        f"!!python/object/apply:os.system ['touch {marker}']",
        "cos\nsystem\n(S'touch " + str(marker) + "'\ntR.",
        "{{ self.__init__.__globals__ }} The answer is (B).",
    ]
    ids = [f"syn-{i:06d}" for i in range(4)]
    replay = tmp_path / "replay.jsonl"
    replay.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, hostile)), encoding="utf-8")
    cfg = tiny_config_dict(tmp_path / "run", tiny_model_dir)
    cfg["dataset"]["train_size"] = 4
    cfg["teacher"] = {"kind": "replay", "path": str(replay), "sampling": {"samples": 1}}
    config = write_yaml(cfg, tmp_path / "run.yaml")
    assert cli.main(["teacher", str(config), "--no-progress"]) == 0
    rows = check_store(tmp_path / "run" / "teacher" / "traces.jsonl", [(i, 0) for i in ids])
    assert [r["text"] for r in sorted(rows, key=lambda r: r["id"])] == hostile
    assert [r["answer"] for r in sorted(rows, key=lambda r: r["id"])] == ["A", None, None, "B"]
    assert not marker.exists()
