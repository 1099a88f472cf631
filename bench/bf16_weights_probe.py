"""Probe (issue 16): the packed ORPO step (forward + loss + backward, 8 pairs) with fp32 weights under bf16
autocast (what training does) against a bf16 copy of the weights without autocast (what fp32 master copies
in the optimizer would allow), alternating in one process; and, with --matmul, the 2048^3 matrix-product rate
in fp32 and bf16 on 2 threads.

Run: python bench/bf16_weights_probe.py [ROUNDS]   (default 3)   |   python bench/bf16_weights_probe.py --matmul
"""
import copy, statistics, sys, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_line
from orpo_distill.batching import collate_packed, group_pairs
from orpo_distill.forward import pair_logps_packed
from orpo_distill.models import autocast, load_model, load_tokenizer
from train_step import DEFAULT_MODEL, PAIRS_PER_QUESTION, _orpo, build_questions, demo_config, make_batches, tokenized_batches
torch.set_num_threads(2)
if "--matmul" in sys.argv:  # the rates of docs/benchmarks.md's AMD EPYC section: train_step.py's measure
    from train_step import matmul_flops_per_s
    for dt in (torch.float32, torch.bfloat16):
        print(dt, f"{matmul_flops_per_s(2048, 5, dt) / 1e9:.0f} GFLOP/s")
    sys.exit(0)
steps, bs, repeats = 3, 8, int(sys.argv[1]) if len(sys.argv) > 1 else 3
cfg = demo_config()
tok = load_tokenizer(DEFAULT_MODEL)
m32 = load_model(DEFAULT_MODEL, dtype="float32", device="cpu"); m32.train()
m16 = copy.deepcopy(m32).to(torch.bfloat16); m16.train()
qs = build_questions(tok, steps * bs // PAIRS_PER_QUESTION, cfg)
pairs = tokenized_batches(tok, make_batches(qs, bs, steps), cfg.train.max_length)
batches = [collate_packed(group_pairs(b, max_pairs=PAIRS_PER_QUESTION), pad_id=tok.pad_token_id, nll_on_prompt=False) for b in pairs]
dev = torch.device("cpu")
def run(model, i, amp):
    t0 = time.perf_counter()
    with autocast(dev, amp):
        out = _orpo(pair_logps_packed(model, batches[i]), cfg.train.lambda_or)
    t1 = time.perf_counter()
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return t1 - t0, time.perf_counter() - t1, float(out.loss)
arms = {"fp32 weights + bf16 autocast": (m32, True), "bf16 weights, no autocast": (m16, False)}
for i in range(steps):
    for m, a in arms.values(): run(m, i, a)
t = {k: [] for k in arms}; losses = {k: [] for k in arms}
for _ in range(repeats):
    for i in range(steps):
        for k, (m, a) in arms.items():
            f, b, l = run(m, i, a); t[k].append(f + b); losses[k].append(l)
print(cpu_line())
base = statistics.median(t["fp32 weights + bf16 autocast"])
for k in arms:
    med = statistics.median(t[k])
    print(f"{k}: step {1e3*med:.0f} ms (min {1e3*min(t[k]):.0f}, max {1e3*max(t[k]):.0f}), {base/med:.2f}x; loss of batch 0 {losses[k][0]:.5f}")
