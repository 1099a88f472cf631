"""Experiment trackers (``train.report_to``, issue 35): a real run's TensorBoard event files read back
hold the figures of metrics.jsonl; a missing tracker package is refused before training with its pip
command; the tracker's configuration and the event forwarding, by hand."""

from __future__ import annotations

from typing import Any

import pytest

from orpo_distill.errors import UserError
from orpo_distill.metrics import read_metrics
from orpo_distill.pipeline import Run
from orpo_distill.provenance import training_settings
from orpo_distill.trackers import Forwarder, check_installed, tracker_config

from conftest import FAST_TRAIN


def test_events_become_scalars_at_their_step() -> None:
    seen: list[tuple[dict[str, float], int]] = []
    forward = Forwarder(lambda values, step: seen.append((values, step)))
    forward("train", {"step": 3, "epoch": 1, "loss": 0.5, "lr": 1e-4, "cpu": "x", "flag": True})
    forward("epoch", {"epoch": 1, "seconds": 12.0, "tokens": 400})
    forward("eval", {"key": "dev_epoch_1", "accuracy": 0.25, "chosen_logp": -0.9})
    forward("eval", {"key": "eval_epoch_1", "accuracy": 0.5})
    forward("pairs", {"rows": 10})  # not tracked
    assert seen == [({"train/loss": 0.5, "train/lr": 1e-4}, 3), ({"epoch/seconds": 12.0, "epoch/tokens": 400.0}, 3),
                    ({"eval/dev/accuracy": 0.25, "eval/dev/chosen_logp": -0.9}, 3), ({"eval/eval/accuracy": 0.5}, 3)]


def test_the_configuration_is_flat_and_of_simple_types(tiny_config: Any) -> None:
    flat = tracker_config(training_settings(tiny_config(**{"train.phi": [0.25, 0.5], "train.epochs": 3})))
    assert flat["train.phi"] == "[0.25, 0.5]" and flat["train.lr"] == tiny_config().train.lr
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert "train.report_to" not in flat  # not a training setting


def test_a_missing_tracker_package_is_refused_with_its_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="pip install wandb"):
        check_installed(["tensorboard", "wandb"])
    check_installed(["tensorboard"])  # installed with the dev extra


@pytest.mark.slow
def test_a_run_reports_to_tensorboard(tiny_config: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(**{**FAST_TRAIN, "train.report_to": ["tensorboard"], "eval.every_epoch": True})
    run = Run(cfg, progress=False)
    run.run_all()
    events = read_metrics(run.dir / "metrics.jsonl")
    steps = {e["step"]: e["loss"] for e in events if e["event"] == "train"}
    files = sorted(run.layout.trackers.rglob("events.out.tfevents.*"))
    assert files
    scalars: dict[str, list[Any]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    assert {s.step: s.value for s in scalars["train/loss"]} == pytest.approx(steps, rel=1e-6)
    evals = [e for e in events if e["event"] == "eval" and e["key"].startswith("eval_epoch_") and e["key"] != "eval_epoch_0"]
    assert [s.value for s in scalars["eval/eval/accuracy"]] == pytest.approx([e["accuracy"] for e in evals])
    assert {"epoch/seconds", "train/lr", "train/nll"} <= set(scalars)


def test_a_failing_tracker_is_dropped_with_a_warning_and_the_log_goes_on(tmp_path) -> None:
    from orpo_distill.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")

    def dead_server(event: str, fields: dict) -> None:
        raise ConnectionError("tracker unreachable")

    log.listeners.append(dead_server)
    with pytest.warns(UserWarning, match="tracker failed .*ConnectionError"):
        log.log("train", step=1, loss=0.5)
    log.log("train", step=2, loss=0.4)  # no second warning: it was dropped
    assert log.listeners == [] and [e["step"] for e in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
