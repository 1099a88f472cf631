"""bench/generate.py runs end to end and its table is complete and sane.

The real benchmark needs SmolLM2 and minutes; these tests run ``--quick`` on the tiny random Llama
(conftest's ``tiny_model_dir``, real SmolLM2 tokenizer), so they check the command, the arms and the
counting, never the speed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bench_loader import load_bench, table_rows

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "generate.py"
ARMS = ("hf fp32", "loop fp32")  # plus "hf bf16" or "hf bf16 (inactive)", depending on the CPU


@pytest.mark.slow
def test_quick_markdown_command(tiny_model_dir: Path) -> None:
    """The command a user runs: every arm at every quick batch size, positive numbers, the machine named."""
    cmd = [sys.executable, str(SCRIPT), "--quick", "--markdown", "--model", str(tiny_model_dir)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "command: `python bench/generate.py --quick --markdown --model" in out
    assert "CPU: " in out and "torch " in out and "bf16 autocast: " in out

    rows = table_rows(out)
    by_key = {(r["batch"], r["arm"]): r for r in rows}
    assert len(rows) == 6 and len(by_key) == 6
    for batch in ("1", "2"):
        arms = {arm for b, arm in by_key if b == batch}
        assert set(ARMS) <= arms and any(a.startswith("hf bf16") for a in arms)
    for r in rows:
        assert int(r["prompts"]) == int(r["batch"])
        assert 0 < int(r["gen tokens"]) <= 8 * int(r["prompts"])  # --quick: 8 new tokens per prompt
        assert float(r["seconds"]) > 0 and float(r["tokens/s"]) > 0
        assert r["vs loop"].endswith("x")
    # batch 1, fp32, no padding: our generator and the plain loop compute the same greedy tokens,
    # so they count the same; a drift here means the two arms no longer measure the same work
    assert by_key[("1", "hf fp32")]["gen tokens"] == by_key[("1", "loop fp32")]["gen tokens"]
    assert by_key[("1", "loop fp32")]["vs loop"] == "1.00x"


@pytest.mark.slow
def test_rich_table_in_process(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("generate")
    assert bench.main(["--quick", "--batch-sizes", "3", "--model", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "Generation throughput" in out
    for arm in (*ARMS, "hf bf16"):
        assert arm in out


@pytest.mark.slow
def test_decoding_arms_write_the_same_samples(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--decoding``: our loop against model.generate at 2 samples per prompt; both arms' rows, the
    speedup column, and the identity check saying every sample matched (fp32)."""
    bench = load_bench("generate")
    argv = ["--quick", "--decoding", "--samples", "2", "--temperature", "1.0", "--batch-sizes", "4",
            "--markdown", "--model", str(tiny_model_dir)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    rows = {r["arm"]: r for r in table_rows(out)}
    assert {"generate fp32", "fast fp32"} <= set(rows)
    assert rows["generate fp32"]["vs generate"] == "1.00x" and rows["fast fp32"]["vs generate"].endswith("x")
    assert rows["fast fp32"]["gen tokens"] == rows["generate fp32"]["gen tokens"]
    assert int(rows["fast fp32"]["prompts"]) == 2  # 4 rows of 2 samples each
    assert "batch 4 fp32: 4/4 samples identical between the arms" in out


def test_count_generated_stops_after_first_eos() -> None:
    bench = load_bench("generate")
    assert bench.count_generated([5, 6, 2, 9, 2], {2}) == 3  # EOS itself counts, padding after it does not
    assert bench.count_generated([5, 6, 7], {2}) == 3
    assert bench.count_generated([2, 2, 2], {2}) == 1


def test_summarise_takes_medians_and_speedup_against_loop() -> None:
    bench = load_bench("generate")
    timings = {
        "hf": [(100, 1.0), (100, 2.0), (100, 4.0)],  # 100, 50, 25 tokens/s
        "loop": [(100, 10.0), (100, 20.0), (100, 5.0)],  # 10, 5, 20 tokens/s
    }
    rows = {r.arm: r for r in bench.summarise(16, 16, timings, baseline="loop")}
    assert rows["hf"].tokens_per_s == 50 and rows["hf"].seconds == 2.0
    assert (rows["hf"].low, rows["hf"].high) == (25, 100)
    assert rows["loop"].tokens_per_s == 10
    assert rows["hf"].speedup == 5 and rows["loop"].speedup == 1


def test_measure_warms_up_then_alternates_arms() -> None:
    bench = load_bench("generate")
    calls: list[tuple[str, int, int | None]] = []

    def arm(name: str):
        def run(max_new_tokens: int, limit: int | None) -> int:
            calls.append((name, max_new_tokens, limit))
            return max_new_tokens

        return run

    timings = bench.measure({"a": arm("a"), "b": arm("b")}, 64, 3, 16, warmup_limits={"b": 2})
    assert calls[:2] == [("a", 16, None), ("b", 16, 2)]  # short warm-up; the loop-like arm on 2 prompts
    assert [c[0] for c in calls[2:]] == ["a", "b", "b", "a", "a", "b"]  # order rotates each repeat
    assert all(c[1:] == (64, None) for c in calls[2:])
    assert [t for t, _ in timings["a"]] == [64, 64, 64]


def test_options_quick_defaults_and_bad_values() -> None:
    bench = load_bench("generate")
    args = bench.parse_args(["--quick", "--repeats", "2"])
    assert (args.batch_sizes, args.max_new_tokens, args.repeats) == ((1, 2), 8, 2)
    args = bench.parse_args(["--batch-sizes", "1,16,64"])
    assert (args.batch_sizes, args.max_new_tokens, args.repeats, args.model) == (
        (1, 16, 64), 64, 3, "builtin:smollm2-135m-instruct")
    for bad in (["--batch-sizes", "0,4"], ["--batch-sizes", "x"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


# ---- --backend vllm (the GPU arm; only its wiring is testable here) ----------------------------


def test_backend_option_defaults_to_hf_and_checks_values() -> None:
    bench = load_bench("generate")
    args = bench.parse_args([])
    assert (args.backend, args.gpu_memory_utilization) == ("hf", 0.5)
    args = bench.parse_args(["--backend", "vllm", "--gpu-memory-utilization", "0.3"])
    assert (args.backend, args.gpu_memory_utilization) == ("vllm", 0.3)
    for bad in (["--backend", "tgi"], ["--gpu-memory-utilization", "1.5"], ["--gpu-memory-utilization", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert bench.headers()[-1] == "vs loop" and bench.headers("hf bf16")[-1] == "vs hf bf16"


def test_vllm_backend_without_a_gpu_is_a_clear_error(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load_bench("generate")
    assert bench.main(["--backend", "vllm", "--quick", "--device", "cpu", "--model", str(tiny_model_dir)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_vllm_arm_sends_the_whole_workload_in_one_call_and_counts_its_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake engine with vLLM's interface (chat, get_tokenizer, outputs with token_ids)."""
    import types
    from dataclasses import dataclass, field

    @dataclass
    class Params:  # vLLM's SamplingParams takes keywords only
        n: int = 1
        temperature: float = 1.0
        top_p: float = 1.0
        max_tokens: int = 16
        seed: int | None = None
        stop: list[str] | None = None

    @dataclass
    class Completion:
        text: str
        token_ids: list[int]
        finish_reason: str = "length"
        index: int = 0

    @dataclass
    class Output:
        outputs: list[Completion] = field(default_factory=list)

    class Engine:
        calls: list[int] = []

        def get_tokenizer(self):
            return types.SimpleNamespace(chat_template="{{ messages }}")

        def chat(self, conversations, sampling_params=None, use_tqdm=True, **kwargs):
            self.calls.append(len(conversations))
            assert all(p.temperature == 0 for p in sampling_params)  # greedy, like the hf arms
            return [Output([Completion("x" * p.max_tokens, list(range(p.max_tokens)))]) for p in sampling_params]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=Params))
    bench = load_bench("generate")
    prompts = [({"role": "user", "content": f"q{i}"},) for i in range(5)]
    engine = Engine()
    run = bench.vllm_arm(engine, prompts)
    assert run(7, None) == 5 * 7
    assert run(3, 2) == 2 * 3
    assert engine.calls == [5, 2]  # one engine call per run, whatever the batch size


@pytest.mark.slow
def test_seeded_sampling_bench_runs_and_fp32_is_exact(tiny_model_dir: Path) -> None:
    """bench/seeded_sampling.py end to end on the tiny model: its three tables, and in fp32 every sample
    equal to its batch-1 sample (the contract the bench measures)."""
    cmd = [sys.executable, str(ROOT / "bench" / "seeded_sampling.py"), "--model", str(tiny_model_dir), "--prompts", "3",
           "--max-new-tokens", "6", "--batch-sizes", "2,6", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    drift, exact, speed = (table_rows(block) for block in proc.stdout.split("\n\n") if block.startswith("|"))
    assert [r["precision"] for r in drift] == ["fp32", "fp32", "bf16 autocast", "bf16 autocast"]
    fp32 = [r for r in exact if r["precision"] == "fp32" and r["share"]]
    assert [r["share"] for r in fp32] == ["100.0%", "100.0%"]
    assert len(speed) == 2 and all(float(r["tokens/s (median)"]) > 0 for r in speed)


@pytest.mark.slow
def test_gpu_check_runs_its_whole_path_on_the_cpu(tmp_path: Path) -> None:
    """``bash bench/gpu_check.sh --cpu``: the GPU machine's script, on the CPU with a tiny student (the
    student built from a shape, the pipeline with a refresh, the packed step and the parity check), every
    row ok and the table printed. Without ``--cpu`` on a machine with no GPU it says so and exits non-zero."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert [r["check"] for r in rows] == ["bf16 matmul rate", "pipeline (tiny, cpu, fp32)",
                                          "packed ORPO step (bf16 autocast, fused AdamW)", "loss parity, fp32: cpu vs cpu"]
    assert all(r["result"] == "ok" for r in rows)
    assert "pairs/s" in rows[2]["figures"] and "MFU" in rows[2]["figures"]
    assert "GPU CHECK PASSED" in proc.stdout and "CPU: " in proc.stdout
    assert (tmp_path / "work" / "run" / "eval" / "summary.json").is_file()
    refused = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**env, "KIT": str(tmp_path / "no-kit")})
    import torch

    if not torch.cuda.is_available():
        assert refused.returncode != 0 and "no CUDA device here" in refused.stderr
