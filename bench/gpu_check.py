"""The GPU check: what a bare accelerator machine can show about this package, in one table.

Run by ``bench/gpu_check.sh`` (which installs the carried wheels first); on its own:

    python bench/gpu_check.py --tokenizer .gpukit/tokenizer          # on a CUDA GPU, bf16
    python bench/gpu_check.py --cpu                                  # the same path on the CPU, tiny model

The machine it is made for has no network (no Hub model, no vLLM), so the student is built here: a
decoder with a real model's shape (``--shape qwen2.5-0.5b``: Qwen2.5-0.5B-Instruct's layers, widths,
heads and rope; the vocabulary is the bundled SmolLM2 tokenizer's 49,152 tokens, not Qwen's 151,936)
and random weights, saved with the tokenizer. Random weights give the real model's speed and memory,
not its accuracy. Steps, each a row of the table:

1. the bf16 matmul rate of the device (``8192^3`` on a GPU), the ceiling the step's MFU is read against;
2. the pipeline (``orpo-distill run configs/gpu-check.yaml``: scripted teacher, student samples, base
   evaluation, two ORPO epochs with a mixed-policy refresh, final evaluation) with the student on the
   device, bf16; its wall time and what its metrics say (sampling and training tokens/s);
3. the packed ORPO train step (collate, forward, loss, backward, fused AdamW step) under bf16 autocast on
   fp32 weights, on the pairs the pipeline wrote (8 pairs a step, the demo's batch): pairs/s, tokens/s,
   peak device memory and MFU = 6 x parameters x tokens/s over the measured matmul rate;
4. (GPU only) the training stage again under ``accelerate launch`` with FSDP2 on one GPU, the refresh
   sampling from the gathered weights;
5. loss parity: the same packed batch's ORPO loss in fp32 on the CPU and on the device (TF32 off),
   relative difference under ``PARITY_TOL``. With ``--cpu`` both sides run on the CPU: the row checks
   the path, not a device.

Exits 1 when a check fails (the table says which).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from orpo_distill import cli  # noqa: E402
from orpo_distill.batching import batch_to, collate_packed  # noqa: E402
from orpo_distill.forward import orpo_loss_of, pair_logps_packed  # noqa: E402
from orpo_distill.models import load_tokenizer  # noqa: E402
from orpo_distill.recipe import tokenize_rows  # noqa: E402
from orpo_distill.training import micro_batches  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/machine.py; bench/ is on sys.path when run as a script)

# Qwen2.5-0.5B-Instruct's config.json (the fields that set its size and speed); "tiny" for --cpu.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
}
# configs/gpu-check.yaml as it is on a GPU; --cpu shrinks it to seconds
CPU_SIZES = ["dataset.train_size=4", "dataset.eval_size=4", "student.sampling.max_tokens=8",
             "eval.max_tokens=8", "train.max_length=160", "teacher.sampling.max_tokens=96"]
PAIRS_PER_STEP = 8
PARITY_TOL = 1e-3  # relative: fp32 on both sides, only kernels and summation order differ


def build_student(shape: str, tokenizer_dir: str | None, out: Path) -> Path:
    """A Qwen2 decoder of ``shape`` with random weights and the bundled tokenizer, saved to ``out``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = load_tokenizer(tokenizer_dir or "builtin:smollm2-135m-instruct")
    config = Qwen2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def matmul_rate(device: torch.device, n: int, calls: int = 10) -> float:
    """bf16 ``n x n @ n x n``: ``2 n^3`` FLOPs over the median of ``calls`` timed calls (after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = []
    for i in range(calls + 2):
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        if i >= 2:
            seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pipeline(model_dir: Path, run_dir: Path, device: torch.device) -> dict[str, Any]:
    """``orpo-distill run configs/gpu-check.yaml`` with the built student on ``device``; wall time and metrics."""
    sets = [f"run_dir={run_dir}", f"student.model={model_dir}", f"student.device={device.type}",
            f"student.dtype={'bfloat16' if device.type == 'cuda' else 'float32'}"]
    if device.type == "cpu":
        sets += CPU_SIZES
    args = ["run", str(REPO / "configs" / "gpu-check.yaml"), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    start = time.perf_counter()
    rc = cli.main(args)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "eval" / "summary.json").read_text()) if rc == 0 else {}
    return {"rc": rc, "wall_s": wall, "events": rows, "summary": summary}


def packed_batches(run_dir: Path, model_dir: Path, max_length: int) -> list[list[Any]]:
    """The pipeline's epoch-1 pairs, tokenized as training does, cut into micro-batches of 8 pairs."""
    tok = load_tokenizer(str(model_dir))
    rows = [json.loads(line) for line in (run_dir / "pairs" / "epoch_1.jsonl").read_text().splitlines() if line]
    groups = tokenize_rows(tok, rows, max_length)
    return micro_batches(groups, list(range(len(groups))), PAIRS_PER_STEP)


def packed_loss(model: Any, batch: list[Any], pad_id: int, device: torch.device) -> Any:
    tensors = batch_to(collate_packed(batch, pad_id=pad_id, nll_on_prompt=False), device)
    return orpo_loss_of(pair_logps_packed(model, tensors), 0.1)


def train_step_speed(model_dir: Path, batches: list[list[Any]], device: torch.device, steps: int) -> dict[str, float]:
    """Median seconds of a packed ORPO step (bf16 autocast on fp32 weights, fused AdamW), its tokens, peak memory."""
    from orpo_distill.models import autocast, load_model

    model = load_model(str(model_dir), dtype="float32", device=device.type)
    model.train()
    pad = load_tokenizer(str(model_dir)).pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    times, tokens, pairs = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 2):  # two warm-up steps
        batch = batches[i % len(batches)]
        sync(device)
        start = time.perf_counter()
        with autocast(device, True):
            out = packed_loss(model, batch, pad, device)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
            tokens.append(sum(g.packed_length() for g in batch))
            pairs.append(sum(len(g.pairs) for g in batch))
    return {
        "seconds": statistics.median(times),
        "pairs_per_s": sum(pairs) / sum(times),
        "tokens_per_s": sum(tokens) / sum(times),
        "peak_bytes": float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan"),
        "parameters": float(sum(p.numel() for p in model.parameters())),
    }


def fsdp2_training(run_dir: Path, fsdp_dir: Path) -> dict[str, Any]:
    """The training stage again under ``accelerate launch`` with FSDP2 on one GPU, from a copy of the run's
    stores (teacher and initial student samples; checkpoints and model removed): the refresh and the
    per-epoch evaluation sample from the gathered weights (``whole_weights``)."""
    import subprocess

    shutil.rmtree(fsdp_dir, ignore_errors=True)
    shutil.copytree(run_dir, fsdp_dir, ignore=shutil.ignore_patterns("checkpoints", "model", "eval", "pairs"))
    for refreshed in (fsdp_dir / "student").glob("epoch_[2-9]*.jsonl"):  # the refresh writes these again
        refreshed.unlink()
    (fsdp_dir / "metrics.jsonl").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
           "--num_processes", "1", "--mixed_precision", "bf16", "-m", "orpo_distill.cli", "train",
           str(fsdp_dir / "config.yaml"), "--no-progress", "--set", f"run_dir={fsdp_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    (fsdp_dir / "train.log").write_text(done.stdout + done.stderr)
    rows = [json.loads(x) for x in (fsdp_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (fsdp_dir / "metrics.jsonl").is_file() else []
    refresh = [r for r in rows if r.get("event") == "refresh"]
    kinds = {r.get("distributed") for r in rows if r.get("event") == "epoch"}
    ok = done.returncode == 0 and bool(refresh) and (fsdp_dir / "model" / "config.json").is_file() and kinds == {"FSDP"}
    tail = "" if ok else f"; exit {done.returncode}: {(done.stderr or done.stdout)[-300:]!r}"
    return {"ok": ok, "figure": f"{wall:.0f} s wall, trained as {sorted(map(str, kinds))}, refresh {refresh[0]['refreshed'] if refresh else 0} questions, "
                                f"log {fsdp_dir / 'train.log'}{tail}"}


def loss_parity(model_dir: Path, batch: list[Any], device: torch.device) -> tuple[float, float, float]:
    """The ORPO loss of one packed batch in fp32 on the CPU and on ``device``: (cpu, device, relative difference)."""
    from orpo_distill.models import load_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pad = load_tokenizer(str(model_dir)).pad_token_id
    values = []
    for dev in (torch.device("cpu"), device):
        model = load_model(str(model_dir), dtype="float32", device=dev.type).eval()
        with torch.no_grad():
            values.append(float(packed_loss(model, batch, pad, dev).loss))
        del model
    return values[0], values[1], abs(values[1] - values[0]) / max(1.0, abs(values[0]))


def machine_line(device: torch.device) -> str:
    import transformers

    where = (f"GPU: {torch.cuda.get_device_name(device)}, "
             f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB" if device.type == "cuda"
             else f"CPU: {cpu_model()}, {os.cpu_count()} cores (--cpu: path check)")
    return (f"{where}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
            f"Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run the same path on the CPU with the tiny shape")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="student shape (default qwen2.5-0.5b; tiny with --cpu)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the bundled SmolLM2 tokenizer)")
    parser.add_argument("--out", help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps (default 20 on a GPU, 2 on --cpu)")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device here (torch.cuda.is_available() is False); use --cpu for the path check")
    device = torch.device("cpu" if args.cpu else "cuda")
    shape = args.shape or ("tiny" if args.cpu else "qwen2.5-0.5b")
    steps = args.steps or (2 if args.cpu else 20)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    failed = []

    def row(check: str, ok: bool, figure: str) -> None:
        rows.append((check, "ok" if ok else "FAILED", figure))
        if not ok:
            failed.append(check)

    t0 = time.perf_counter()
    rate = matmul_rate(device, 512 if args.cpu else 8192)
    row("bf16 matmul rate", rate > 0, f"{rate / 1e12:.1f} TFLOP/s ({'512' if args.cpu else '8192'}^3)")
    model_dir = build_student(shape, args.tokenizer, work / "student")
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = run_pipeline(model_dir, run_dir, device)
    events = result["events"]
    sampling = [e for e in events if e.get("event") == "sampling"]
    train = [e for e in events if e.get("event") == "train"]
    ok = result["rc"] == 0 and {"eval_epoch_0", "eval_epoch_2"} <= set(result["summary"]) and bool(train) \
        and any(e.get("event") == "refresh" for e in events)
    sample_rate = ", ".join(f"{e['stage']} {e['tokens_per_second']:.0f} tok/s" for e in sampling)
    train_rate = statistics.median(e["tokens_per_s"] for e in train) if train else float("nan")
    row(f"pipeline ({shape}, {device.type}, {'bf16' if device.type == 'cuda' else 'fp32'})", ok,
        f"{result['wall_s']:.0f} s wall; sampling {sample_rate}; training median {train_rate:.0f} packed tok/s")
    if result["rc"] == 0:
        batches = packed_batches(run_dir, model_dir, max_length=384 if device.type == "cuda" else 160)
        speed = train_step_speed(model_dir, batches, device, steps)
        mfu = 6 * speed["parameters"] * speed["tokens_per_s"] / rate
        memory = "n/a on the CPU" if device.type == "cpu" else f"{speed['peak_bytes'] / 2**30:.2f} GiB peak"
        row("packed ORPO step (bf16 autocast, fused AdamW)", speed["seconds"] > 0,
            f"{speed['pairs_per_s']:.1f} pairs/s, {speed['tokens_per_s']:.0f} tok/s, {memory}, "
            f"MFU {100 * mfu:.1f}% of the matmul rate ({speed['parameters'] / 1e6:.0f}M parameters, median of {steps})")
        if device.type == "cuda":
            fsdp = fsdp2_training(run_dir, work / "run-fsdp2")
            row("train under FSDP2, 1 GPU (accelerate launch), with the refresh", fsdp["ok"], fsdp["figure"])
        cpu_loss, dev_loss, rel = loss_parity(model_dir, batches[0], device)
        row(f"loss parity, fp32: cpu vs {device.type}", rel <= PARITY_TOL,
            f"{cpu_loss:.6f} vs {dev_loss:.6f} (relative {rel:.1e}, tolerance {PARITY_TOL:.0e})")
    print()
    print(machine_line(device))
    print(f"total {time.perf_counter() - t0:.0f} s; work folder {work}")
    print()
    print("| check | result | figures |")
    print("| --- | --- | --- |")
    for check, status, figure in rows:
        print(f"| {check} | {status} | {figure} |")
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        print(f"\nGPU CHECK FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("\nGPU CHECK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
