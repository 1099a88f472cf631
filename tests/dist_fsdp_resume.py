"""Launched by test_distributed.py under ``accelerate launch`` with two processes (gloo): an FSDP2-sharded
student (``fully_shard`` per decoder layer, then the model) trained 3 AdamW steps straight, against the
same 3 steps with a checkpoint after step 1 (the full weights and ``checkpoints.full_optimizer_state``
written through ``save_checkpoint``) and a fresh sharded model and optimizer that resume from it
(``load_training_state``). Rank 0 writes the final full weights of both, and of a resume that drops the
optimizer state (the control: it must differ), to ``OUT/weights.pt``.

Usage: python dist_fsdp_resume.py MODEL_DIR OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from orpo_distill.checkpoints import full_optimizer_state, load_training_state, save_checkpoint
from orpo_distill.models import load_model, load_tokenizer

STEPS = 3


def sharded(path: str) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = load_model(path, dtype="float32", device="cpu")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 * i + dist.get_rank())  # each rank its own data, as under FSDP
    x = torch.randint(3, 60, (2, 12), generator=g)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main(model_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run = Path(out) / "run"
    straight, opt, _ = sharded(model_dir)
    for i in range(STEPS):
        step(straight, opt, i)
    results = {"straight": full(straight)}

    model, opt, sched = sharded(model_dir)
    step(model, opt, 0)
    weights, opt_state = full(model), full_optimizer_state(model, opt)  # collectives: every rank
    if rank == 0:
        inner = load_model(model_dir, dtype="float32", device="cpu")
        save_checkpoint(run, 1, inner, load_tokenizer(model_dir), None, sched, {}, {"global_step": 1},
                        state_dict=weights, optimizer_state=opt_state)
    dist.barrier()
    ckpt = str(run / "checkpoints" / "epoch_1")
    for name, with_optimizer in (("resumed", True), ("resumed_without_optimizer", False)):
        model, opt, sched = sharded(ckpt)
        if with_optimizer:
            load_training_state(Path(ckpt), opt, sched, model=model)
        for i in range(1, STEPS):
            step(model, opt, i)
        results[name] = full(model)
    if rank == 0:
        torch.save(results, Path(out) / "weights.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
