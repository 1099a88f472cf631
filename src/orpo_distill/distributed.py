"""Several processes, one run: who does what under ``accelerate launch`` (or ``torchrun``).

Every process runs the same command. The rules that keep them consistent:

* Work that produces samples is split: a :class:`RankSplitGenerator` gives each rank a strided share of
  the requests and gathers every rank's samples back, in request order, on every rank. The teacher,
  the initial student, the mixed-policy refresh and evaluation all go through it, so the negative
  buffer a refresh builds is identical on every rank.
* Files are written by the main process only (stores, pairs, metrics, checkpoints, the exported model);
  the others open stores read-only, after the main process has opened (and repaired) them.
* Training data is cut into micro-batches the same way on every rank; each optimizer step takes
  ``grad_accum x world_size`` consecutive micro-batches and rank ``r`` runs its ``grad_accum`` of them
  (see :func:`step_plan`), so a step holds the same examples whatever the world size.

With one process every function here is a no-op, and nothing initialises ``torch.distributed``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

from .generators.base import GenerationStats, Generator, Request, Sample

T = TypeVar("T")

# Sampling a stage can take hours on the main process while the others wait at a barrier.
DEFAULT_TIMEOUT = timedelta(hours=6)


def world_size() -> int:
    """Processes in this run, from the launcher's environment (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(cpu: bool, timeout: timedelta = DEFAULT_TIMEOUT) -> Any:
    """Initialise the process group once (Accelerate's ``PartialState``); None with one process.

    ``cpu`` must match the Accelerator the training stage builds later (Accelerate refuses to
    re-initialise with another device). The long ``timeout`` lets ranks wait at a barrier while
    the main process finishes a write.
    """
    if world_size() == 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=cpu, timeout=timeout)


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def main_first(open_fn: Callable[[], T]) -> T:
    """Call ``open_fn`` on the main process first, then (after a barrier) on the others.

    For opening a store: the main process repairs a torn tail or sets an old file aside before any
    other rank reads the file.
    """
    if world_size() == 1:
        return open_fn()
    out = open_fn() if is_main() else None
    barrier()
    if not is_main():
        out = open_fn()
    return out  # type: ignore[return-value]


def shard_indices(n: int, rank_: int, world: int) -> list[int]:
    """Rank ``rank_``'s strided share of ``n`` items."""
    return list(range(rank_, n, world))


class RankSplitGenerator:
    """Each rank generates a strided share of the requests; every rank gets all the samples back.

    Per-request seeds travel with the requests, so a seeded generator (openai, scripted, replay)
    returns the same samples whatever the world size.
    """

    def __init__(self, inner: Generator, rank_: int | None = None, world: int | None = None,
                 gather: Callable[[Any], list[Any]] = all_gather):
        self.inner = inner
        self.name = inner.name
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        self.gather = gather

    @property
    def stats(self) -> GenerationStats:
        return self.inner.stats

    def generate(self, requests: Sequence[Request]) -> list[list[Sample]]:
        mine = shard_indices(len(requests), self.rank, self.world)
        local = self.inner.generate([requests[i] for i in mine]) if mine else []
        out: list[list[Sample]] = [[] for _ in requests]
        for r, samples in enumerate(self.gather(local)):
            for i, s in zip(shard_indices(len(requests), r, self.world), samples):
                out[i] = s
        return out


def split_across_ranks(gen: Generator) -> Generator:
    """``gen`` wrapped in a :class:`RankSplitGenerator` when several processes run, else ``gen``."""
    return RankSplitGenerator(gen) if world_size() > 1 else gen


def step_members(num_micro_batches: int, grad_accum: int, world: int) -> list[list[int]]:
    """For each optimizer step, every micro-batch in it (all ranks): ``grad_accum x world`` consecutive
    ones of the (rank-independent) epoch order; what the step's loss averages over."""
    per_step = grad_accum * world
    return [list(range(s, min(s + per_step, num_micro_batches))) for s in range(0, num_micro_batches, per_step)]


def step_plan(num_micro_batches: int, grad_accum: int, rank_: int, world: int) -> list[list[int]]:
    """For each optimizer step, the indices of the micro-batches rank ``rank_`` runs: the ``rank_``-th
    run of ``grad_accum`` among the step's members. In the last step a rank may get fewer, or none (it
    then runs a zero-weight copy so that the gradient all-reduce stays in step)."""
    lo, hi = rank_ * grad_accum, (rank_ + 1) * grad_accum
    return [members[lo:hi] for members in step_members(num_micro_batches, grad_accum, world)]


def align_deepspeed_clipping(ds_config: dict[str, Any], max_grad_norm: float) -> None:
    """Under DeepSpeed the clipping is DeepSpeed's own (its ``gradient_clipping``; Accelerate's
    ``clip_grad_norm_`` only reads the norm back), so the run clips at ``train.max_grad_norm`` only if the two
    agree: fill an ``auto`` or missing value with it, and refuse a config that says otherwise."""
    value = ds_config.get("gradient_clipping", "auto")
    if value in ("auto", None):
        ds_config["gradient_clipping"] = max_grad_norm
        return
    from .errors import UserError

    if float(value) != float(max_grad_norm):
        raise UserError(f"the DeepSpeed config clips gradients at {value} (gradient_clipping) and train.max_grad_norm "
                        f"is {max_grad_norm}: DeepSpeed clips inside its own step, so set one to the other (or "
                        "gradient_clipping to \"auto\", which takes train.max_grad_norm)")
