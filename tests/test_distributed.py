"""Training and the mixed-policy refresh under ``accelerate launch`` with two CPU processes (gloo).

The unit tests check the bookkeeping that makes the world size invisible: which micro-batches each
rank runs in each step, and the sharded generator. The launch tests run real processes: the training
stage under two processes and under one with the same global batch (two micro-batches per step
either way) must log the same losses step by step and end with the same weights, and the refresh
under two ranks must regenerate exactly the questions one process would, each rank sampling its own
share, and build the same negative buffer on both ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from orpo_distill import cli
from orpo_distill.distributed import RankSplitGenerator, step_members, step_plan
from orpo_distill.generators.base import GenerationStats, Request, Sample
from orpo_distill.metrics import read_metrics
from orpo_distill.pairs import choose_refresh
from conftest import FAST_TRAIN
from test_resume import write_config

pytestmark = pytest.mark.slow  # whole runs or several processes: left out of `make test-fast`

deepspeed_installed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (make test installs it: pip install --no-build-isolation deepspeed)")


# ---- the step plan -----------------------------------------------------------------------------


@pytest.mark.parametrize("n, accum, world", [(1, 1, 2), (5, 1, 2), (7, 2, 2), (8, 2, 2), (9, 3, 4), (4, 1, 1), (10, 4, 1)])
def test_every_micro_batch_runs_once_on_one_rank_in_its_step(n: int, accum: int, world: int) -> None:
    members = step_members(n, accum, world)
    plans = [step_plan(n, accum, r, world) for r in range(world)]
    assert sum(len(m) for m in members) == n
    for s, step in enumerate(members):
        ran = sorted(i for plan in plans for i in plan[s])
        assert ran == step  # the step's micro-batches, each on exactly one rank
        assert all(len(plan[s]) <= accum for plan in plans)
    assert all(len(plan) == len(members) for plan in plans)  # every rank takes every step


def test_one_process_with_accumulation_takes_the_same_steps_as_two_ranks() -> None:
    """grad_accum 2 on one process and grad_accum 1 on two ranks: the same micro-batches in each step."""
    assert step_members(9, 2, 1) == step_members(9, 1, 2) == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert step_plan(9, 1, 1, 2)[-1] == []  # rank 1 has nothing in the last step: it runs a zero-weight copy


# ---- the sharded generator ---------------------------------------------------------------------


class CountingGenerator:
    """Answers each request with texts naming the request and the rank that served it."""

    name = "counting"

    def __init__(self, rank: int):
        self.rank = rank
        self.stats = GenerationStats()
        self.seen: list[str] = []

    def generate(self, requests: list[Request]) -> list[list[Sample]]:
        self.seen += [r.key for r in requests]
        return [[Sample(f"{r.key}#{i}") for i in range(r.n)] for r in requests]


def test_sharded_generator_splits_requests_and_returns_all_in_order() -> None:
    requests = [Request(key=f"q{i}", messages=({"role": "user", "content": str(i)},), n=1 + i % 3) for i in range(7)]
    inner = [CountingGenerator(r) for r in range(3)]
    # Simulate three ranks in one process: each gather returns every rank's local results.
    local = [inner[r].generate([requests[i] for i in range(r, 7, 3)]) for r in range(3)]
    for r in range(3):
        inner[r].seen.clear()
    gens = [RankSplitGenerator(inner[r], rank_=r, world=3, gather=lambda mine, r=r: local) for r in range(3)]
    outs = [g.generate(requests) for g in gens]
    expected = [[f"{q.key}#{i}" for i in range(q.n)] for q in requests]
    for out in outs:
        assert [[s.text for s in samples] for samples in out] == expected
    assert [g.inner.seen for g in gens] == [["q0", "q3", "q6"], ["q1", "q4"], ["q2", "q5"]]


# ---- real processes under accelerate launch ----------------------------------------------------

DIST = {
    **FAST_TRAIN,
    "dataset.train_size": 10,
    "teacher.error_rate": 0.3,
    "teacher.sampling.samples": 3,
    "student.device": "cpu",
    "student.sampling.max_tokens": 6,
    "pairs.pairs_per_question": 2,
    "train.phi": 0.0,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], log: Path, processes: int = 2) -> None:
    """``accelerate launch <args>`` (a script, or ``-m module``) on the CPU with gloo; fails the test
    with the log's tail if a process fails."""
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with log.open("wb") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    assert done.returncode == 0, log.read_text(errors="replace")[-4000:]


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]


def sampled_base(tiny_config: Any, tmp_path: Path, over: dict[str, Any]) -> tuple[Any, Any]:
    """The teacher and initial student stages of ``over`` run once in ``tmp_path/base``; returns its config
    and ``prepared(name, **more)``: a copy of that folder as run ``name`` with ``more`` on top, its YAML path."""
    base = tiny_config(**over, run_dir=str(tmp_path / "base"))
    base_yaml = write_config(base, tmp_path / "base.yaml")
    assert cli.main(["teacher", str(base_yaml), "--no-progress"]) == 0
    assert cli.main(["student", str(base_yaml), "--no-progress"]) == 0

    def prepared(name: str, **more: Any) -> Path:
        shutil.copytree(tmp_path / "base", tmp_path / name)
        return write_config(tiny_config(**{**over, **more}, run_dir=str(tmp_path / name)), tmp_path / f"{name}.yaml")

    return base, prepared


def test_two_processes_train_like_one_with_the_same_global_batch(tiny_config: Any, tmp_path: Path) -> None:
    """Teacher and initial student samples are made once and copied, so both runs train on the same
    pairs; a step holds two micro-batches of 2 pairs in both (one process: grad_accum 2; two: 1 each).
    The two-process run's epoch-1 checkpoint is then resumed by one process: checkpoints load with
    any world size and the result is the same again."""
    base, prepared = sampled_base(tiny_config, tmp_path, DIST)

    two = prepared("two", **{"train.grad_accum": 1, "eval.every_epoch": True})
    one = prepared("one", **{"train.grad_accum": 2})
    launch(["-m", "orpo_distill.cli", "train", str(two), "--no-progress"], tmp_path / "two.log")
    assert cli.main(["train", str(one), "--no-progress"]) == 0

    rows_two, rows_one = train_rows(tmp_path / "two"), train_rows(tmp_path / "one")
    assert len(rows_two) == len(rows_one) >= 6  # one metrics line per step: rank 0 alone writes
    for a, b in zip(rows_two, rows_one):
        assert a["step"] == b["step"]
        for k in ("loss", "nll", "or_loss", "log_odds_ratio", "reward_accuracy", "grad_norm", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    w_two, w_one = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("two", "one"))
    assert w_two.keys() == w_one.keys()
    for k in w_one:
        torch.testing.assert_close(w_two[k], w_one[k], rtol=1e-4, atol=1e-5, msg=k)
    # the stores were not appended to twice, and pairs/checkpoints exist once
    pairs = [json.loads(x) for x in (tmp_path / "two" / "pairs" / "epoch_1.jsonl").read_text().splitlines()]
    assert len(pairs) == len({(p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs})

    # evaluation under two ranks: each question evaluated once, one summary per epoch, written once
    for epoch in (1, 2):
        rows = [json.loads(x) for x in (tmp_path / "two" / "eval" / f"eval_epoch_{epoch}.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted({r["id"] for r in rows}) and len(rows) == base.dataset.eval_size
    summary = json.loads((tmp_path / "two" / "eval" / "summary.json").read_text())
    assert sorted(summary) == ["eval_epoch_1", "eval_epoch_2"] and summary["eval_epoch_2"]["n"] == base.dataset.eval_size
    assert sum(r["event"] == "eval" for r in read_metrics(tmp_path / "two" / "metrics.jsonl")) == 2

    # resume the two-process run's epoch-1 checkpoint with one process
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "epoch_2")
    shutil.rmtree(tmp_path / "resumed" / "model")
    resumed = prepared_from(tiny_config, tmp_path, "resumed", **{"train.grad_accum": 2})
    assert cli.main(["train", str(resumed), "--no-progress"]) == 0
    w_resumed = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    for k in w_one:
        torch.testing.assert_close(w_resumed[k], w_one[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", pytest.param("zero3", marks=deepspeed_installed)])
def test_lora_under_two_processes_trains_and_refreshes_like_one(tiny_config: Any, tmp_path: Path, strategy: str) -> None:
    """A LoRA student (PEFT adapter) under DDP, FSDP2 (a gathered PEFT copy for the refresh, the
    checkpoints and the export's merge) and DeepSpeed ZeRO-3 (the frozen base and the adapter both
    partitioned; gathered in place) with the mixed-policy refresh: the same per-step losses, the same
    refreshed samples, the same adapter in model/adapter and merged model as one process with the same
    global batch; and a resume from the epoch-1 checkpoint that ends with the same adapter."""
    lora = {"train.lora.enabled": True, "train.lora.r": 4, "train.lora.alpha": 8, "train.lr": 5e-3,
            "train.precision": "fp32", "train.phi": 0.5}
    _, prepared = sampled_base(tiny_config, tmp_path, {**DIST, **lora})
    two = prepared("two", **{"train.grad_accum": 1})
    one = prepared("one", **{"train.grad_accum": 2})
    script = {"ddp": ["-m", "orpo_distill.cli"], "fsdp2": [str(Path(__file__).with_name("dist_fsdp_train.py"))],
              "zero3": [str(Path(__file__).with_name("dist_deepspeed_train.py")), "3"]}[strategy]
    launch([*script, "train", str(two), "--no-progress"], tmp_path / "two.log")
    assert cli.main(["train", str(one), "--no-progress"]) == 0

    epochs = [r for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["event"] == "epoch"]
    assert {r["distributed"] for r in epochs} == {{"ddp": "MULTI_CPU", "fsdp2": "FSDP", "zero3": "DEEPSPEED"}[strategy]}
    rows_two, rows_one = train_rows(tmp_path / "two"), train_rows(tmp_path / "one")
    assert len(rows_two) == len(rows_one) >= 4
    for a, b in zip(rows_two, rows_one):
        for k in ("loss", "nll", "or_loss", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    refreshed = {d: (tmp_path / d / "student" / "epoch_2.jsonl").read_text().splitlines()[1:] for d in ("two", "one")}
    assert refreshed["two"] and sorted(refreshed["two"]) == sorted(refreshed["one"])  # each question sampled once
    a_two, a_one = (load_file(str(tmp_path / d / "model" / "adapter" / "adapter_model.safetensors")) for d in ("two", "one"))
    assert a_two.keys() == a_one.keys() and a_two
    for k in a_one:
        torch.testing.assert_close(a_two[k], a_one[k], rtol=1e-4, atol=1e-5, msg=k)
    # LoRA's B matrices start at zero: a non-zero one shows that the adapter compared above learned
    assert any("lora_B" in k and a_one[k].abs().max() > 0 for k in a_one)
    m_two, m_one = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("two", "one"))
    assert m_two.keys() == m_one.keys() and not any("lora" in k for k in m_one)  # merged into whole weights
    for k in m_one:
        torch.testing.assert_close(m_two[k], m_one[k], rtol=1e-4, atol=1e-5, msg=k)

    # resume: without epoch 2's checkpoint and the export, the sharded run trains epoch 2 again from epoch 1's
    # (the adapter and the optimizer state) and ends with the same adapter
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "epoch_2")
    shutil.rmtree(tmp_path / "two" / "model")
    launch([*script, "train", str(two), "--no-progress"], tmp_path / "resumed.log")
    assert [r["epoch"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl") if r["event"] == "resume"] == [1]
    a_resumed = load_file(str(tmp_path / "two" / "model" / "adapter" / "adapter_model.safetensors"))
    for k in a_one:
        torch.testing.assert_close(a_resumed[k], a_two[k], rtol=1e-5, atol=1e-6, msg=k)


def prepared_from(tiny_config: Any, tmp_path: Path, name: str, **over: Any) -> Path:
    cfg = tiny_config(**DIST, run_dir=str(tmp_path / name), **over)
    return write_config(cfg, tmp_path / f"{name}.yaml")


def test_refresh_under_two_ranks_regenerates_the_questions_one_process_would(tiny_config: Any, tmp_path: Path) -> None:
    """phi 0.5 at epoch 2: the chosen questions are those one process picks; each rank samples only its
    share of them; both ranks end with the same buffer, and the store holds each key once."""
    cfg = tiny_config(**{**DIST, "train.policy": "mixed", "train.phi": 0.5}, run_dir=str(tmp_path / "run"))
    config = write_config(cfg, tmp_path / "run.yaml")
    assert cli.main(["teacher", str(config), "--no-progress"]) == 0
    assert cli.main(["student", str(config), "--no-progress"]) == 0
    out = tmp_path / "ranks"
    launch([str(Path(__file__).with_name("dist_refresh.py")), str(config), str(out)], tmp_path / "refresh.log")

    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["buffer"] == ranks[1]["buffer"]
    questions = ranks[0]["questions"]
    expected = choose_refresh(questions, 0.5, cfg.seed, 2)
    assert len(expected) == round(0.5 * len(questions)) > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "student" / "epoch_2.jsonl").read_text().splitlines()]
    assert sorted({x["id"] for x in lines}) == sorted(expected)
    assert len(lines) == len({(x["id"], x["sample"]) for x in lines}) == 2 * len(expected)
    # each rank asked its generator for its strided share only
    assert sorted(ranks[0]["asked"] + ranks[1]["asked"]) == sorted(expected)
    assert not set(ranks[0]["asked"]) & set(ranks[1]["asked"])
    # the refreshed negatives in the buffer are those samples (the wrong ones), on both ranks
    refreshed = {q for q, negs in ranks[0]["buffer"].items() if any(n["epoch"] == 2 for n in negs)}
    assert refreshed <= set(expected)


# ---- sharded strategies ------------------------------------------------------------------------


def test_refresh_from_an_fsdp2_sharded_student_samples_what_the_whole_one_does(tiny_config: Any, tmp_path: Path) -> None:
    """Two gloo ranks, the student sharded by FSDP2 (every parameter a DTensor shard): the refresh gathers
    the whole weights once into a plain copy per rank (whole_weights.whole_model), each rank samples its
    share with no collective in the decoding, and the store and both ranks' buffers are exactly those of
    the same refresh from the unsharded student (fp32, per-row seeds)."""
    import shutil

    cfg = tiny_config(**{**DIST, "train.policy": "mixed", "train.phi": 0.5}, run_dir=str(tmp_path / "whole"))
    config = write_config(cfg, tmp_path / "whole.yaml")
    assert cli.main(["teacher", str(config), "--no-progress"]) == 0
    assert cli.main(["student", str(config), "--no-progress"]) == 0
    shutil.copytree(tmp_path / "whole", tmp_path / "sharded")
    sharded = write_config(cfg.model_copy(update={"run_dir": str(tmp_path / "sharded")}), tmp_path / "sharded.yaml")
    script = str(Path(__file__).with_name("dist_refresh.py"))
    launch([script, str(config), str(tmp_path / "ranks-whole")], tmp_path / "whole.log")
    launch([script, str(sharded), str(tmp_path / "ranks-sharded"), "fsdp2"], tmp_path / "sharded.log")
    for r in range(2):
        whole = json.loads((tmp_path / "ranks-whole" / f"rank_{r}.json").read_text())
        shard = json.loads((tmp_path / "ranks-sharded" / f"rank_{r}.json").read_text())
        assert shard["buffer"] == whole["buffer"] and shard["asked"] == whole["asked"] and shard["asked"]
        assert shard["sampled_from_shards"] == [False] * len(shard["sampled_from_shards"])  # the gathered copy
    texts = {name: sorted((x["id"], x["sample"], x["text"]) for x in map(json.loads, (
        tmp_path / name / "student" / "epoch_2.jsonl").read_text().splitlines())) for name in ("whole", "sharded")}
    assert texts["sharded"] == texts["whole"] and texts["whole"]



def _launch_cmd(args: list[str], processes: int = 2) -> tuple[list[str], dict[str, str]]:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *args]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _sharded_run_matches_one_and_resumes_after_kill_9(tiny_config: Any, tmp_path: Path, script: list[str],
                                                     distributed: str, accum: int = 1) -> Path:
    """A sharded trainer (``script``: a harness that sets up Accelerate's plugin, then the CLI) on two gloo
    ranks, a mixed-policy run (phi 0.5) with a refresh and per-epoch evaluation: the same per-step losses,
    the same refreshed samples and the same final weights as one unsharded process with the same global
    batch (``accum`` micro-batches a rank a step against ``2 x accum`` in the one process). Then again,
    SIGKILLed during epoch 2 and relaunched: it resumes from its epoch-1 checkpoint (full weights and the
    optimizer state) and ends with the same weights. Returns the epoch-1 checkpoint."""
    import signal
    import time

    import psutil

    _, prepared = sampled_base(tiny_config, tmp_path, {**DIST, "train.policy": "mixed", "train.phi": 0.5,
                                                       "dataset.train_size": 12})

    sharded = prepared("sharded", **{"train.grad_accum": accum, "eval.every_epoch": True})
    one = prepared("one", **{"train.grad_accum": 2 * accum, "eval.every_epoch": True})
    killed = prepared("killed", **{"train.grad_accum": accum, "eval.every_epoch": True})
    launch([*script, "train", str(sharded), "--no-progress"], tmp_path / "sharded.log")
    assert cli.main(["train", str(one), "--no-progress"]) == 0

    epochs = [r for r in read_metrics(tmp_path / "sharded" / "metrics.jsonl") if r["event"] == "epoch"]
    assert {r["distributed"] for r in epochs} == {distributed} and {r["processes"] for r in epochs} == {2}
    rows_sharded, rows_one = train_rows(tmp_path / "sharded"), train_rows(tmp_path / "one")
    assert len(rows_sharded) == len(rows_one) >= 6 // accum
    for a, b in zip(rows_sharded, rows_one):
        for k in ("loss", "nll", "or_loss", "reward_accuracy", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (a["step"], k)
    refreshed = {name: sorted((x["id"], x["sample"], x["text"]) for x in map(json.loads, (
        tmp_path / name / "student" / "epoch_2.jsonl").read_text().splitlines())) for name in ("sharded", "one")}
    assert refreshed["sharded"] == refreshed["one"] and refreshed["one"]
    summary = json.loads((tmp_path / "sharded" / "eval" / "summary.json").read_text())
    assert sorted(summary) == ["eval_epoch_1", "eval_epoch_2"]
    w_sharded, w_one = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("sharded", "one"))
    assert w_sharded.keys() == w_one.keys()
    for k in w_one:
        torch.testing.assert_close(w_sharded[k], w_one[k], rtol=1e-4, atol=1e-5, msg=k)

    # kill -9 in epoch 2 (its refresh: epoch 1's checkpoint and evaluation are done; the tiny model's six
    # training steps are too quick to hit), then relaunch: resumes from epoch 1
    cmd, env = _launch_cmd([*script, "train", str(killed), "--no-progress"])
    metrics = tmp_path / "killed" / "metrics.jsonl"
    with (tmp_path / "killed.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and any(r["event"] == "eval" for r in read_metrics(metrics)):
                # the launcher and both ranks (torch's elastic agent starts them in sessions of their own)
                for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                    p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text(errors="replace")[-3000:]
    assert not (tmp_path / "killed" / "checkpoints" / "epoch_2").exists()
    assert (tmp_path / "killed" / "checkpoints" / "epoch_1" / "state.json").is_file()
    launch([*script, "train", str(killed), "--no-progress"], tmp_path / "resumed.log")
    assert any(r["event"] == "resume" for r in read_metrics(tmp_path / "killed" / "metrics.jsonl"))
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*")), "a staging folder was left behind"
    w_killed = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    for k in w_one:
        torch.testing.assert_close(w_killed[k], w_sharded[k], rtol=1e-5, atol=1e-6, msg=k)
    return tmp_path / "sharded" / "checkpoints" / "epoch_1"


def test_fsdp2_training_with_the_refresh_matches_one_process_and_resumes_after_kill_9(tiny_config: Any,
                                                                                     tmp_path: Path) -> None:
    """The trainer under Accelerate's FSDP2 plugin (dist_fsdp_train.py: the plugin set up as on GPUs); its
    checkpoint holds the gathered full optimizer state."""
    ckpt = _sharded_run_matches_one_and_resumes_after_kill_9(
        tiny_config, tmp_path, [str(Path(__file__).with_name("dist_fsdp_train.py"))], "FSDP")
    state = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert state["state"], "the FSDP2 checkpoint holds the optimizer's state"


@deepspeed_installed
@pytest.mark.parametrize("stage, accum", [(2, 2), (3, 1)])
def test_deepspeed_training_with_the_refresh_matches_one_process_and_resumes_after_kill_9(
        tiny_config: Any, tmp_path: Path, stage: int, accum: int) -> None:
    """The trainer under Accelerate's DeepSpeed plugin, ZeRO-2 and ZeRO-3 (dist_deepspeed_train.py: the
    plugin set up as on GPUs; DeepSpeed's CPU accelerator over gloo). ZeRO-2 accumulates two micro-batches a
    rank a step (DeepSpeed steps only on the last: the sync flag the loop sets). Under ZeRO-3 the refresh
    and the per-epoch evaluation sample with the weights gathered in place (whole_weights). The checkpoint
    holds every rank's partition of the optimizer state in DeepSpeed's layout, and the full weights."""
    ckpt = _sharded_run_matches_one_and_resumes_after_kill_9(
        tiny_config, tmp_path, [str(Path(__file__).with_name("dist_deepspeed_train.py")), str(stage)], "DEEPSPEED",
        accum=accum)
    assert not (ckpt / "optimizer.pt").exists()
    partitions = sorted(p.name for p in (ckpt / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(partitions) == 2, partitions  # one a rank
    assert (ckpt / "model.safetensors").is_file()


def test_an_fsdp2_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two gloo ranks, FSDP2: 3 AdamW steps straight against 1 step, a checkpoint (full weights and the
    gathered full optimizer state through save_checkpoint), then a fresh sharded model and optimizer that
    load it (load_training_state) and take steps 2 and 3. Same weights (fp32, 1e-6); resuming without the
    optimizer state gives other weights, so the comparison is not vacuous."""
    import torch

    launch([str(Path(__file__).with_name("dist_fsdp_resume.py")), str(tiny_model_dir), str(tmp_path)],
           tmp_path / "resume.log")
    w = torch.load(tmp_path / "weights.pt", weights_only=False)
    assert w["straight"] and set(w["straight"]) == set(w["resumed"])
    for name, tensor in w["straight"].items():
        torch.testing.assert_close(w["resumed"][name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert any(not torch.allclose(w["resumed_without_optimizer"][n], t, atol=1e-5) for n, t in w["straight"].items())
    assert (tmp_path / "run" / "checkpoints" / "epoch_1" / "optimizer.pt").is_file()


@pytest.mark.parametrize("kind, stage, over, refused", [
    ("FSDP", None, {}, True),  # FSDP1: mixed policy refreshes and per-epoch eval both need whole weights
    ("FSDP", "fsdp2", {}, False),  # FSDP2: gathered for sampling (the test above)
    ("DEEPSPEED", 3, {}, False),  # ZeRO-3: gathered in place for sampling (the DeepSpeed test above)
    ("DEEPSPEED", 2, {}, False),  # ZeRO-2 keeps whole weights on every rank
    ("MULTI_GPU", None, {}, False),
    ("FSDP", None, {"train.phi": 0.0, "eval.every_epoch": False}, False),
    ("FSDP", None, {"pairs.negatives": "teacher", "eval.every_epoch": False}, False),
    ("FSDP", None, {"train.phi": 0.0, "eval.every_epoch": True}, True),
])
def test_sharded_weights_are_refused_where_training_samples_from_the_model(tiny_config: Any, kind: str, stage: Any,
                                                                          over: dict[str, Any], refused: bool) -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from orpo_distill.errors import UserError
    from orpo_distill.recipe import Distiller

    cfg = tiny_config(**over)
    acc = SimpleNamespace(distributed_type=getattr(DistributedType, kind), is_fsdp2=stage == "fsdp2",
                          state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))
    distiller = SimpleNamespace(cfg=cfg, tcfg=cfg.train)
    if refused:
        with pytest.raises(UserError, match="FSDP1 shards"):
            Distiller._check_sharding(distiller, acc)
    else:
        Distiller._check_sharding(distiller, acc)


def test_deepspeed_steps_only_at_the_end_of_each_accumulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accelerate's DeepSpeed backward steps the optimizer whenever its sync flag is set: the loop must
    clear it on all but the last micro-batch of a step, run grad_accum backward passes in every step
    (zero-weight copies in a short last step) and undo DeepSpeed's own 1/gradient_accumulation_steps."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from orpo_distill import training
    from orpo_distill.config import TrainConfig
    from orpo_distill.training import SftExample, train_epoch

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)  # every micro-batch's loss is 1 (and lr 0 keeps it so)
    monkeypatch.setattr(training, "_forward", lambda model, batch, method, cfg, pad_id: training.MicroBatchOut(
        model.weight.sum() + 1.0, None, {"nll": 1.0}, 1))
    seen: list[tuple[bool, float]] = []

    class FakeDeepSpeedAccelerator:
        device = torch.device("cpu")
        num_processes, process_index, is_main_process = 1, 0, True
        distributed_type = DistributedType.DEEPSPEED
        state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config={"gradient_accumulation_steps": 4}))
        gradient_state = SimpleNamespace(sync_gradients=True)
        gradient_state._set_sync_gradients = lambda flag: setattr(FakeDeepSpeedAccelerator.gradient_state, "sync_gradients", flag)

        def no_sync(self, model: Any) -> Any:
            raise AssertionError("one process: no DDP no_sync")

        def backward(self, loss: torch.Tensor) -> None:
            seen.append((self.gradient_state.sync_gradients, float(loss)))
            loss.backward()

        def clip_grad_norm_(self, params: Any, max_norm: float) -> None:
            return None  # DeepSpeed clips inside its step and may report no norm

    cfg = TrainConfig(method="sft", batch_size=1, grad_accum=3, precision="fp32")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    examples = [SftExample([1], [2]) for _ in range(7)]
    result = train_epoch(model, examples, opt, sched, cfg, 1, 0, FakeDeepSpeedAccelerator(), log=lambda row: None,
                         progress=False)
    assert result.steps == 3 and result.examples == 7
    assert [sync for sync, _ in seen] == [False, False, True] * 3
    # each of the first two steps: 3 micro-batches, a third of the step each, times DeepSpeed's 4
    assert [round(v, 6) for _, v in seen[:6]] == [round(4 / 3, 6)] * 6
    # the last step holds one real micro-batch (its whole share) and two zero-weight copies
    assert [round(v, 6) for _, v in seen[6:]] == [4.0, 0.0, 0.0]


def test_one_process_run_does_not_ask_for_the_student_device(tiny_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The teacher stage on a CPU box for a run whose student trains on a GPU later: creating the Run
    must not resolve student.device (only a multi-process launch needs it, to set up the process group)."""
    from orpo_distill import pipeline
    from orpo_distill.errors import UserError

    def no_gpu(name: str) -> Any:
        raise UserError("student.device is 'cuda' but no CUDA GPU is available")

    monkeypatch.setattr(pipeline, "pick_device", no_gpu)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = pipeline.Run(tiny_config(**{"student.device": "cuda"}), progress=False)
    assert run.teacher().samples > 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="no CUDA GPU"):
        pipeline.Run(tiny_config(**{"student.device": "cuda"}), progress=False)


def test_one_and_two_processes_sample_the_same_store(tiny_config: Any, tmp_path: Path) -> None:
    """Issue 12: every sampled trace is a function of (seed, question, sample index, weights), so the
    student stage under two ranks (each batching its own strided share) writes the same store as one
    process, line for line. student.dtype float32: plain fp32 sampling, bit-exact at any batch shape."""
    over = {**DIST, "student.dtype": "float32", "student.sampling.samples": 3, "student.sampling.max_tokens": 8,
            "student.sampling.temperature": 1.0, "student.sampling.batch_size": 4}
    configs = {}
    for name in ("one", "two"):
        configs[name] = write_config(tiny_config(**over, run_dir=str(tmp_path / name)), tmp_path / f"{name}.yaml")
    assert cli.main(["student", str(configs["one"]), "--no-progress"]) == 0
    launch(["-m", "orpo_distill.cli", "student", str(configs["two"]), "--no-progress"], tmp_path / "two.log")

    def rows(name: str) -> dict[tuple[str, int], str]:
        lines = [json.loads(x) for x in (tmp_path / name / "student" / "epoch_1.jsonl").read_text().splitlines()]
        assert len(lines) == len({(x["id"], x["sample"]) for x in lines})  # every key once
        return {(x["id"], x["sample"]): x["text"] for x in lines}

    one, two = rows("one"), rows("two")
    assert len(one) == 3 * DIST["dataset.train_size"]
    assert two == one
    by_question: dict[str, set[str]] = {}
    for (qid, _), text in one.items():
        by_question.setdefault(qid, set()).add(text)
    assert all(len(texts) == 3 for texts in by_question.values())  # K distinct samples per question


@pytest.mark.parametrize("value, expected", [("auto", 0.5), (None, 0.5), (0.5, 0.5), ("missing", 0.5), (1.0, None)])
def test_deepspeed_clips_at_train_max_grad_norm_or_the_run_is_refused(value: Any, expected: Any) -> None:
    from orpo_distill.distributed import align_deepspeed_clipping
    from orpo_distill.errors import UserError

    config: dict[str, Any] = {} if value == "missing" else {"gradient_clipping": value}
    if expected is None:
        with pytest.raises(UserError, match="gradient_clipping.*train.max_grad_norm"):
            align_deepspeed_clipping(config, 0.5)
    else:
        align_deepspeed_clipping(config, 0.5)
        assert config["gradient_clipping"] == expected
