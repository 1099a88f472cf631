"""Memory in the run's record (issue 36): every metrics event carries the peak RSS since the event before
it, and the closing table reads each stage's time and peak from those events."""

from __future__ import annotations

from pathlib import Path

import pytest

from orpo_distill.allocator import release_free_memory
from orpo_distill.memory import interval_peak_rss_mib, lifetime_peak_rss_mib, rss_mib
from orpo_distill.metrics import MetricsLog, read_metrics, stage_costs, stage_name


def test_rss_figures_are_sane() -> None:
    now = rss_mib()
    assert 10 < now <= lifetime_peak_rss_mib() + 1
    assert interval_peak_rss_mib() <= lifetime_peak_rss_mib() + 1


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="Linux only: RSS is read from /proc")
def test_each_event_carries_the_peak_of_its_own_interval(tmp_path: Path) -> None:
    import time

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.log("start")
    block = bytearray(512 * 1024 * 1024)  # 512 MiB, touched page by page
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(0.5)  # the watcher reads RSS every 0.2 s
    del block
    release_free_memory()  # the block's pages back to the kernel whatever the allocator setting (the suite may keep them)
    log.log("big")
    log.log("small")
    start, big, small = read_metrics(tmp_path / "metrics.jsonl")
    assert big["peak_rss_mib"] >= start["peak_rss_mib"] + 400  # the block's interval saw it
    assert small["peak_rss_mib"] < big["peak_rss_mib"] - 400  # the next interval starts from the RSS then


def test_stage_names() -> None:
    assert stage_name({"event": "sampling", "stage": "teacher"}) == "teacher traces"
    assert stage_name({"event": "sampling", "stage": "student/epoch_1"}) == "initial student samples"
    assert stage_name({"event": "sampling", "stage": "student/epoch_3"}) == "refresh before epoch 3"
    assert stage_name({"event": "eval", "key": "eval_epoch_0"}) == "evaluation eval_epoch_0"
    assert stage_name({"event": "train", "epoch": 2}) == stage_name({"event": "epoch", "epoch": 2}) == "training epoch 2"
    assert stage_name({"event": "pairs", "epoch": 1}).startswith("other")


def test_stage_costs_sum_intervals_and_take_the_largest_peak() -> None:
    events = [
        {"event": "old", "time": 5.0, "peak_rss_mib": 9000},  # before this invocation: left out
        {"event": "sampling", "stage": "teacher", "time": 11.0, "peak_rss_mib": 300},
        {"event": "sampling", "stage": "student/epoch_1", "time": 41.0, "peak_rss_mib": 2100},
        {"event": "pairs", "epoch": 1, "time": 42.0, "peak_rss_mib": 2000},
        {"event": "train", "epoch": 1, "time": 52.0, "peak_rss_mib": 3900},
        {"event": "train", "epoch": 1, "time": 62.0, "peak_rss_mib": 3700},
        {"event": "epoch", "epoch": 1, "time": 63.0, "peak_rss_mib": 3600},
        {"event": "eval", "key": "eval_epoch_1", "time": 93.0},  # written before peaks were logged
    ]
    assert stage_costs(events, since=10.0) == [
        ("teacher traces", 1.0, 300.0), ("initial student samples", 30.0, 2100.0),
        ("other (pairs, refresh bookkeeping, loading)", 1.0, 2000.0), ("training epoch 1", 21.0, 3900.0),
        ("evaluation eval_epoch_1", 30.0, 0.0)]
