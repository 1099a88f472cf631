"""The whole pipeline through ``orpo-distill run``: every artifact of the run folder (docs/architecture.md), a rerun that
does nothing, and each training variant the paper compares, on the tiny student and scripted teacher."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from orpo_distill import cli
from orpo_distill.config import load_config
from orpo_distill.metrics import read_metrics
from orpo_distill.store import read_jsonl

from conftest import TINY_RUN, write_config

pytestmark = pytest.mark.slow  # whole runs or several processes: left out of `make test-fast`

FAST = {k: v for k, v in TINY_RUN.items() if k != "eval.every_epoch"}
FAST["train.warmup_ratio"] = 0.0
TRAIN_KEYS = {"loss", "nll", "or_loss", "logps/chosen", "logps/rejected", "log_odds_ratio", "reward_accuracy",
              "margin", "lr", "tokens_per_s"}




def snapshot(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def rows(path: Path) -> list[dict[str, Any]]:
    return list(read_jsonl(path))


def test_run_end_to_end_writes_every_artifact_and_a_rerun_does_nothing(tiny_config: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_config(**FAST, **{"train.policy": "mixed", "train.phi": 0.5})
    config_file = write_config(cfg, tmp_path / "run.yaml")
    assert cli.main(["run", str(config_file), "--no-progress"]) == 0
    run = Path(cfg.run_dir)

    # config.yaml: the resolved configuration, which loads back to the same run
    assert load_config(run / "config.yaml") == cfg

    # teacher/traces.jsonl: one line per (question, sample), verified
    teacher = rows(run / "teacher" / "traces.jsonl")
    assert len(teacher) == 4 * 3 and len({(r["id"], r["sample"]) for r in teacher}) == 12
    assert all({"text", "answer", "correct", "source"} <= set(r) and r["text"] for r in teacher)
    assert {r["source"] for r in teacher} == {"teacher"}
    # the questions that train: those with a correct, complete teacher trace
    qids = sorted({r["id"] for r in teacher if r["correct"] and r["finish_reason"] != "length"})
    assert len(qids) >= 2

    # student/epoch_E.jsonl: all questions before epoch 1, phi = half of the training ones before epoch 2
    s1, s2 = rows(run / "student" / "epoch_1.jsonl"), rows(run / "student" / "epoch_2.jsonl")
    assert len(s1) == 4 * 2 and len({r["id"] for r in s1}) == 4
    half = round(0.5 * len(qids))
    assert len(s2) == half * 2 and len({r["id"] for r in s2}) == half and {r["id"] for r in s2} <= set(qids)

    # pairs/epoch_E.jsonl in TRL's conversational format
    for epoch in (1, 2):
        pairs = rows(run / "pairs" / f"epoch_{epoch}.jsonl")
        assert sorted(r["id"] for r in pairs) == qids
        for r in pairs:
            assert r["prompt"][-1]["role"] == "user"
            assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
            assert r["chosen"][0]["content"] != r["rejected"][0]["content"]
            assert r["rejected_source"] == "student"

    # checkpoints/epoch_E: model, optimizer, scheduler, RNG, negative buffer, state
    for epoch in (1, 2):
        ckpt = run / "checkpoints" / f"epoch_{epoch}"
        for name in ("config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "buffer.json",
                     "state.json", "tokenizer.json"):
            assert (ckpt / name).is_file(), f"{ckpt.name}/{name}"
        assert json.loads((ckpt / "state.json").read_text())["epoch"] == epoch
        assert sorted(json.loads((ckpt / "buffer.json").read_text())) == qids
    assert not list((run / "checkpoints").glob(".*")), "a temp folder was left behind"

    # metrics.jsonl: one train row per step, with every figure the ORPO loss logs, finite
    events = read_metrics(run / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    assert [e["step"] for e in train] == [1, 2] and [e["epoch"] for e in train] == [1, 2]  # batch 8 > pairs
    for e in train:
        assert TRAIN_KEYS <= set(e)
        assert all(isinstance(e[k], float) and math.isfinite(e[k]) for k in TRAIN_KEYS)
        assert e["loss"] == pytest.approx(e["nll"] + cfg.train.lambda_or * e["or_loss"], rel=1e-5)
        assert 0 <= e["reward_accuracy"] <= 1 and e["tokens_per_s"] > 0
    # the rate each step used: cosine over 2 steps without warmup is lr, then lr / 2
    assert [e["lr"] for e in train] == pytest.approx([cfg.train.lr, cfg.train.lr / 2])
    assert {e["event"] for e in events} >= {"sampling", "pairs", "train", "epoch", "refresh", "eval"}
    # each epoch says what computed it: a comparison carried between machines tells its arms apart by these
    from orpo_distill.models import cpu_name, cpu_supports_bf16
    from orpo_distill.provenance import code_version
    expected = "bf16" if cfg.train.precision != "fp32" and cpu_supports_bf16() else "fp32"
    for e in (e for e in events if e["event"] == "epoch"):
        assert (e["precision"], e["device"], e["cpu"], e["code"]) == (expected, "cpu", cpu_name(), code_version())
        assert e["cpu"] and e["code"].startswith("0.")

    # eval: before training, after each epoch, and the summary
    split = cfg.eval.split
    summary = json.loads((run / "eval" / "summary.json").read_text())
    for epoch in (0, 1, 2):
        preds = rows(run / "eval" / f"{split}_epoch_{epoch}.jsonl")
        assert len(preds) == 2 and all({"id", "prediction", "gold", "correct", "text"} <= set(p) for p in preds)
        s = summary[f"{split}_epoch_{epoch}"]
        assert s["n"] == 2 and s["epoch"] == epoch and 0 <= s["accuracy"] <= 1
        assert s["correct"] == sum(p["correct"] for p in preds)

    # model/: the final student, loadable with plain transformers, equal to the last checkpoint
    model = AutoModelForCausalLM.from_pretrained(str(run / "model"), dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(run / "model"))
    last = load_file(str(run / "checkpoints" / "epoch_2" / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in last.items())

    # a rerun finds everything complete: no new line anywhere, every file the same
    before = snapshot(run)
    assert cli.main(["run", str(config_file), "--no-progress"]) == 0
    assert snapshot(run) == before


MORE_TEACHER_NEGATIVES = {"teacher.sampling.samples": 4, "teacher.error_rate": 0.5}
VARIANTS = {
    "sft-single": {"train.method": "sft", "train.traces": "single", "train.epochs": 1},
    "sft-all": {"train.method": "sft", "train.traces": "all", "train.epochs": 1},
    "orpo-teacher": {"pairs.negatives": "teacher", "train.epochs": 1, **MORE_TEACHER_NEGATIVES},
    "orpo-both-off": {"pairs.negatives": "both", "train.policy": "off", "pairs.pairs_per_question": 2,
                      **MORE_TEACHER_NEGATIVES},
    "orpo-on": {"pairs.negatives": "student", "train.policy": "on"},
    # every positive trained on: the questions with no wrong teacher trace as NLL-only rows
    "orpo-teacher-nll": {"pairs.negatives": "teacher", "pairs.pairing": "every_positive", "pairs.no_negative": "nll",
                         "train.epochs": 1, "teacher.sampling.samples": 3, "teacher.error_rate": 0.3},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_runs(tiny_config: Any, tmp_path: Path, variant: str) -> None:
    cfg = tiny_config(**{**FAST, "eval.before_training": False, "eval.every_epoch": False, **VARIANTS[variant]})
    assert cli.main(["run", str(write_config(cfg, tmp_path / "run.yaml")), "--no-progress"]) == 0
    run = Path(cfg.run_dir)
    epochs = cfg.train.epochs
    assert (run / "model" / "model.safetensors").is_file()
    assert (run / "checkpoints" / f"epoch_{epochs}" / "state.json").is_file()
    train = [e for e in read_metrics(run / "metrics.jsonl") if e["event"] == "train"]
    assert train and all(math.isfinite(e["loss"]) for e in train)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert list(summary) == [f"eval_epoch_{epochs}"]
    teacher = rows(run / "teacher" / "traces.jsonl")
    positives = {q: sum(1 for r in teacher if r["id"] == q and r["correct"] and r["finish_reason"] != "length")
                 for q in {r["id"] for r in teacher}}
    pairs = rows(run / "pairs" / f"epoch_{epochs}.jsonl")

    if cfg.train.method == "sft":
        assert not (run / "student").exists(), "SFT needs no student samples"
        assert all(set(r) == {"id", "prompt", "completion"} for r in pairs)
        assert {"or_loss"}.isdisjoint(train[0])
        per_question = {q: sum(r["id"] == q for r in pairs) for q in positives}
        if cfg.train.traces == "single":
            assert per_question == {q: int(n > 0) for q, n in positives.items()}
        else:
            assert per_question == positives
        return

    if cfg.pairs.no_negative == "nll":
        # the chosen side is every positive, as for sft-all; questions with no negative have rejected null
        assert {q: sum(r["id"] == q for r in pairs) for q in positives} == positives
        no_neg = {q for q in positives if positives[q] and not any(r["id"] == q and not r["correct"] for r in teacher)}
        assert no_neg, "the teacher's settings should leave some question without a wrong trace"
        assert {r["id"] for r in pairs if r["rejected"] is None} == no_neg
        assert [e["nll_only"] for e in read_metrics(run / "metrics.jsonl") if e["event"] == "pairs"] == [len(no_neg)]
        pairs = [r for r in pairs if r["rejected"] is not None]
    sources = {r["rejected_source"] for r in pairs}
    if cfg.pairs.negatives == "teacher":
        assert sources == {"teacher"} and not (run / "student").exists()
    elif cfg.pairs.negatives == "both":
        assert sources <= {"teacher", "student"} and "student" in sources
    if cfg.train.policy == "off":
        assert not (run / "student" / "epoch_2.jsonl").exists()
    if cfg.train.policy == "on":
        assert len({r["id"] for r in rows(run / "student" / "epoch_2.jsonl")}) == 4
        assert {r["rejected_epoch"] for r in pairs} == {2}


def test_eval_without_checkpoints_uses_the_exported_model(tiny_config: Any, tmp_path: Path) -> None:
    """compare removes checkpoints/ and keeps model/: `eval` must evaluate that, not the base model."""
    import shutil

    cfg = tiny_config(**{"train.epochs": 1, "eval.before_training": False})
    config_file = write_config(cfg, tmp_path / "run.yaml")
    assert cli.main(["run", str(config_file), "--no-progress"]) == 0
    run_dir = Path(cfg.run_dir)
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "eval")
    assert cli.main(["eval", str(config_file), "--no-progress"]) == 0
    assert (run_dir / "eval" / "eval_epoch_1.jsonl").is_file()
    assert not (run_dir / "eval" / "eval_epoch_0.jsonl").exists()


def test_a_float32_student_samples_without_autocast_in_every_stage(
    tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """student.dtype float32 means plain fp32 sampling (bit-exact at any batch shape) for the first samples,
    the mixed-policy refresh and the evaluations alike, not only for the generator loaded from disk."""
    from contextlib import nullcontext

    from orpo_distill.generators import hf as hf_module

    asked: list[tuple[str, bool]] = []

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append((self.name, self.bf16))
        return original(self, *args, **kwargs)

    original = hf_module.HFGenerator.generate
    monkeypatch.setattr(hf_module.HFGenerator, "generate", recording)
    monkeypatch.setattr(hf_module, "autocast", lambda device, enabled=True: nullcontext())
    cfg = tiny_config(**{"student.dtype": "float32", "train.policy": "mixed", "train.phi": 0.5,
                         "eval.every_epoch": True, "eval.before_training": True})
    assert cli.main(["run", str(write_config(cfg, tmp_path / "run.yaml")), "--no-progress"]) == 0
    assert len({name for name, _ in asked}) >= 3  # the base student, the refresh, the evaluations
    assert not [name for name, bf16 in asked if bf16]
