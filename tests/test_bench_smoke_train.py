"""bench/train_step.py runs end to end, its arms train on the same batches, and its numbers are sane.

The real benchmark needs SmolLM2 and many minutes on an idle machine; these tests run ``--quick`` on
the tiny random Llama (conftest's ``tiny_model_dir``: hidden 32, 2 layers, the real SmolLM2
tokenizer), so they check the command, the arms, the loss agreement and the bookkeeping, never speed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bench_loader import load_bench, table_rows

pytestmark = pytest.mark.slow  # whole runs or several processes: left out of `make test-fast`

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "train_step.py"
ARMS = ("(a) TRL ORPOTrainer", "(b) ours, plain", "(c) ours, packed")


def test_quick_markdown_command(tiny_model_dir: Path) -> None:
    """The command a user runs: all three arms with positive numbers, the loss check passing, MFU printed."""
    cmd = [sys.executable, str(SCRIPT), "--quick", "--markdown", "--model", str(tiny_model_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "command: `python bench/train_step.py --quick --markdown --model" in out
    assert "CPU: " in out and "trl " in out and "transformers " in out and "bf16 autocast: " in out
    assert "/proc/self/statm" in out or "psutil" in out  # says how memory was measured

    rows = {r["arm"]: r for r in table_rows(out)}
    assert set(rows) == set(ARMS)
    for r in rows.values():
        assert r["pairs/step"] == "4"  # --quick: one question of K = 4 pairs per step
        assert float(r["pairs/s"]) > 0 and int(r["tokens/step"]) > 0 and float(r["peak MB"]) > 0
    a, b, c = (rows[name] for name in ARMS)
    # TRL and our plain layout compute the same rows; packing holds the prompt once, not 2K times
    assert a["tokens/step"] == b["tokens/step"]
    assert int(c["tokens/step"]) < int(b["tokens/step"])
    assert a["vs (a)"] == "1.00x" and a["memory vs (a)"] == "1.00x"
    assert "identical ids for 4 of 4 pairs" in out

    checks = [l for l in out.splitlines() if l.startswith("- loss check")]
    assert len(checks) == 2 and all(l.endswith("PASS") for l in checks)
    mfu = re.search(r"MFU of \(c\): .* = ([0-9.]+)%", out)
    assert mfu is not None and float(mfu.group(1)) > 0


def test_arms_train_on_the_same_batch_and_agree(tiny_model_dir: Path) -> None:
    """Every arm's step reaches the weights through backward and clears the gradient; the three losses
    of one batch agree in fp32 (TRL's objective: NLL over prompt and response)."""
    bench = load_bench("train_step")
    from orpo_distill.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    cfg = bench.demo_config()
    batches = bench.make_batches(bench.build_questions(tok, 1, cfg), 4, 1)
    pairs = bench.tokenized_batches(tok, batches, cfg.train.max_length)
    amp = lambda: bench.autocast(torch.device("cpu"))  # noqa: E731
    fp32 = lambda: bench.autocast(torch.device("cpu"), enabled=False)  # noqa: E731
    arms = [
        bench.trl_arm(model, tok, batches, 0.1, cfg.train.max_length, amp),
        bench.plain_arm(model, pairs, tok.pad_token_id, 0.1, True, amp),
        bench.packed_arm(model, pairs, tok.pad_token_id, 0.1, True, amp),
    ]
    weight = model.get_input_embeddings().weight
    for arm in arms:
        seen: list[float] = []
        handle = weight.register_hook(lambda g: seen.append(float(g.abs().sum())))
        arm.step(0)
        handle.remove()
        assert len(seen) == 1 and seen[0] > 0, arm.name
        assert weight.grad is None  # zero_grad(set_to_none=True) ends the step
    losses = [arm.loss(0, fp32) for arm in arms]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert losses[2] == pytest.approx(losses[0], rel=1e-5)
    assert arms[0].sequences == arms[1].sequences  # TRL's tokenizing and ours give the same ids here


def test_build_questions_pairs_correct_with_wrong_traces(tiny_model_dir: Path) -> None:
    bench = load_bench("train_step")
    from orpo_distill.datasets import load_splits
    from orpo_distill.models import load_tokenizer, render_prompt
    from orpo_distill.tasks import build_task

    tok = load_tokenizer(str(tiny_model_dir))
    cfg = bench.demo_config()
    questions = bench.build_questions(tok, 3, cfg)
    records, _ = load_splits(cfg.dataset, cfg.task.kind)
    task = build_task(cfg.task)
    by_prompt = {render_prompt(tok, task.messages(r)): r for r in records}
    assert len(questions) == 3 and len({q[0].prompt for q in questions}) == 3
    for pairs in questions:
        record = by_prompt[pairs[0].prompt]  # the demo's question, in the demo's prompt
        assert len(pairs) == bench.PAIRS_PER_QUESTION
        assert len({p.prompt for p in pairs}) == 1 and pairs[0].prompt.startswith("<|im_start|>")
        assert len({p.chosen for p in pairs}) == len(pairs)  # distinct: packing must not gain from repeats
        assert len({p.rejected for p in pairs}) == len(pairs)
        for p in pairs:
            assert task.check(task.extract(p.chosen, record=record), record)
            assert not task.check(task.extract(p.rejected, record=record), record)
    assert bench.build_questions(tok, 3, cfg) == questions  # deterministic


def test_make_batches_takes_whole_questions_in_order() -> None:
    bench = load_bench("train_step")
    P = bench.PairText
    questions = [[P(f"q{q}", f"c{q}{i}", f"r{q}{i}") for i in range(4)] for q in range(4)]
    batches = bench.make_batches(questions, 8, 2)
    assert [len(b) for b in batches] == [8, 8]
    assert {p.prompt for p in batches[0]} == {"q0", "q1"} and {p.prompt for p in batches[1]} == {"q2", "q3"}
    with pytest.raises(ValueError, match="cannot fill"):
        bench.make_batches(questions, 8, 3)


def test_measure_warms_up_then_alternates_arms() -> None:
    bench = load_bench("train_step")
    calls: list[str] = []

    def arm(name: str):
        return bench.Arm(name, lambda i: calls.append(f"{name}{i}"), lambda i, p: 0.0, [10, 10], [12, 12])

    def probe() -> float:
        calls.append("mm")
        return 1e9

    m = bench.measure([arm("a"), arm("b")], steps=2, repeats=2, warmup=1, memory_batch=1,
                      read_rss=lambda: 0, probe=probe, log=lambda s: None)
    warm, rounds = calls[:4], calls[4:]
    assert warm == ["a0", "a1", "b0", "b1"]
    # each round: a's timed steps, a's sampled step on the memory batch, then b, then the matmul probe
    assert rounds == ["a0", "a1", "a1", "b0", "b1", "b1", "mm"] * 2
    assert len(m.seconds["a"]) == len(m.seconds["b"]) == 2 and m.peaks["a"] == [0, 0]
    assert m.matmul == [1e9, 1e9]


def test_peak_rss_increase_sees_a_transient_allocation() -> None:
    bench = load_bench("train_step")
    read, source = bench.rss_reader()
    if read is None:
        pytest.skip("no RSS reader on this platform")

    def allocate() -> None:
        x = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MiB, every page touched
        time.sleep(0.05)  # held long enough for several samples
        del x

    assert bench.peak_rss_increase(allocate, read) >= 200 * 2**20  # freed before the step ended: still seen
    assert bench.peak_rss_increase(lambda: None, read) < 64 * 2**20


def test_summarise_medians_and_ratios_against_trl() -> None:
    bench = load_bench("train_step")
    arms = [
        bench.Arm("a", lambda i: None, lambda i, p: 0.0, [100, 300], [400, 400]),
        bench.Arm("c", lambda i: None, lambda i, p: 0.0, [50, 150], [60, 160]),
    ]
    m = bench.Measurements(
        seconds={"a": [2.0, 4.0, 8.0], "c": [1.0, 2.0, 0.5]},  # 2 steps x 8 pairs each round
        peaks={"a": [100, 300, 200], "c": [50, 50, 400]},
        matmul=[1.0],
    )
    a, c = bench.summarise(arms, m, pairs_per_step=8)
    assert (a.pairs_per_s, a.low, a.high) == (4.0, 2.0, 8.0)  # 16 pairs over 4 s: the median round
    assert a.tokens_per_step == 200 and a.padded_per_step == 400 and a.tokens_per_s == 100.0
    assert c.pairs_per_s == 16.0 and c.speedup == 4.0 and a.speedup == 1.0
    assert a.peak_bytes == 200 and c.peak_bytes == 50 and c.memory_ratio == 0.25


def test_check_losses_and_mfu() -> None:
    bench = load_bench("train_step")
    assert bench.check_losses({"a": 2.0, "b": 2.0001, "c": 1.9999}, 1e-4) == (True, pytest.approx(5e-5))
    ok, worst = bench.check_losses({"a": 2.0, "b": 2.1}, 1e-2)
    assert not ok and worst == pytest.approx(0.05)
    assert not bench.check_losses({"a": 2.0, "b": float("nan")}, 1.0)[0]
    # 6 FLOPs per parameter per token: 100 params x 10 tokens/s = 6000 FLOP/s of 60000
    assert bench.mfu(100, 10.0, 60_000.0) == pytest.approx(0.1)


def test_options_quick_defaults_and_bad_values() -> None:
    bench = load_bench("train_step")
    args = bench.parse_args(["--quick", "--repeats", "2"])
    assert (args.batch_size, args.steps, args.repeats, args.matmul_size) == (4, 1, 2, 256)
    args = bench.parse_args([])
    assert (args.batch_size, args.steps, args.repeats, args.warmup, args.matmul_size, args.model) == (
        8, 3, 5, 1, 2048, "builtin:smollm2-135m-instruct")
    assert not args.response_only_nll
    for bad in (["--batch-size", "6"], ["--repeats", "0"], ["--steps", "x"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_profile_step_groups_the_whole_step_and_times_both_heads(tiny_model_dir: Path) -> None:
    """bench/profile_step.py: every group's row, shares that add up to the whole step, and the step's
    variants (as it is, dense mask, as before issue 16) timed side by side."""
    bench = load_bench("profile_step")
    cmd = [sys.executable, str(ROOT / "bench" / "profile_step.py"), "--quick", "--markdown", "--model",
           str(tiny_model_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line]
    groups = {r[0]: float(r[1].rstrip("%")) for r in rows if r[0] in bench.GROUPS}
    assert set(groups) == set(bench.GROUPS)
    assert abs(sum(groups.values()) - 100) < 0.5 and groups["matmul, body"] > 0
    variants = {r[0]: r for r in rows if r[0] in bench.VARIANTS}
    assert len(variants) == 3 and variants[bench.BEFORE][4] == "1.00x"
    assert all(float(r[3]) > 0 for r in variants.values())


def test_profile_groups_follow_names_and_shapes() -> None:
    bench = load_bench("profile_step")
    v = 49152
    assert bench.group_of("aten::mm", [[815, 576], [576, v]], v) == "matmul, LM head"
    assert bench.group_of("aten::mm", [[926, 576], [576, 1536]], v) == "matmul, body"
    assert bench.group_of("aten::_scaled_dot_product_flash_attention_for_cpu_backward", [], v) == "attention"
    assert bench.group_of("aten::logsumexp", [], v) == "log-probs"
    assert bench.group_of("aten::copy_", [], v) == "dtype casts"
    assert bench.group_of("aten::mul", [], v) == "elementwise & norms"
    assert bench.group_of("aten::empty_strided", [], v) == "other"


def test_optimizer_step_bench_times_every_kind() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "optimizer_step.py"), "--quick", "--markdown"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [r[0] for r in rows] == ["fused", "foreach (torch's CPU default)", "for-loop"]
    assert all(float(r[1]) > 0 for r in rows) and rows[1][2] == "1.00x"


def test_allocator_bench_runs_both_arms_in_fresh_processes_with_identical_losses(tiny_model_dir: Path) -> None:
    """bench/allocator.py: one row per malloc setting, each child saying which setting it ran under, the
    same step losses in both (the allocator moves tensors, it computes nothing), exit 0."""
    cmd = [sys.executable, str(ROOT / "bench" / "allocator.py"), "--quick", "--markdown", "--model", str(tiny_model_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)  # two fresh processes
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    rows = {r["malloc"]: r for r in table_rows(out)}
    assert set(rows) == {"glibc default", "kept in the process (default)"}
    assert rows["glibc default"]["vs glibc default"] == "1.00x"
    assert all(float(r["s/step (median)"]) > 0 and float(r["peak RSS MiB"]) > 0 for r in rows.values())
    assert "step losses identical in both arms: yes" in out
    assert "glibc default: glibc defaults (ORPO_DISTILL_MALLOC=system)" in out


@pytest.mark.slow
def test_step_breakdown_accounts_for_the_whole_trainer_step(tiny_model_dir: Path) -> None:
    """bench/step_breakdown.py --quick on the tiny model: every part of the trainer's own step has a row
    (with "other", the rest of the step), the chunking option reaches the trainer, and the memory lines
    are there."""
    cmd = [sys.executable, str(ROOT / "bench" / "step_breakdown.py"), "--quick", "--markdown", "--model",
           str(tiny_model_dir), "--chunk-tokens", "64"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["part"]: r for r in table_rows(proc.stdout)}
    for part in ("collate", "forward + log-probs", "backward", "optimizer", "log line", "other", "step"):
        assert part in rows, part
    step = float(rows["step"]["ms/step (median)"])
    assert step > 0 and float(rows["backward"]["ms/step (median)"]) > 0
    assert "train.chunk_tokens 64" in proc.stdout
    assert "Resident memory after each step (MiB): " in proc.stdout and "Peak resident memory" in proc.stdout


def test_step_breakdown_timer_adds_up_each_parts_calls() -> None:
    """A part called twice in a step counts both calls, and its RSS after the call is recorded."""
    breakdown = load_bench("step_breakdown")
    timer = breakdown.Timer()
    timed = timer.wrap("collate", lambda: time.sleep(0.01))
    timed()
    timed()
    assert timer.current["collate"] >= 0.02 and timer.rss_after["collate"] > 0
