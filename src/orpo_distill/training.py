"""The training loop on Accelerate: one epoch of ORPO or SFT steps over prepared examples.

The loop is visible here, not hidden in callbacks: shuffle with the epoch's seed, cut micro-batches,
forward, loss, backward, accumulate, clip, step, log. Tokenizing and collating live in ``batching``,
the loss in ``losses``, checkpoints in ``checkpoints``; the epoch-to-epoch recipe (refresh, pairs,
evaluation) in ``recipe``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from accelerate.utils import DistributedType
from torch import nn
from tqdm.auto import tqdm

from .batching import (
    PairGroup,
    TokenizedPair,
    batch_to,
    collate_packed,
    collate_plain,
    collate_sft,
)
from .forward import orpo_loss_of, pair_logps, pair_logps_packed, sft_logps
from .config import LoraConfig, TrainConfig
from .distributed import step_members, step_plan
from .errors import NonFiniteLossError, UserError
from .memory import rss_mib
from .losses import ORPO_METRICS, PROTECT_METRIC, orpo_objective, sft_loss
from .models import autocast, cpu_supports_bf16


@dataclass
class SftExample:
    prompt_ids: list[int]
    target_ids: list[int]


Example = PairGroup | SftExample  # ORPO trains on one group (a prompt with its K pairs) per question


def example_size(e: Example) -> int:
    """Pairs in a group (NLL-only rows included), or 1 for an SFT example: what ``train.batch_size`` counts."""
    return len(e.pairs) if isinstance(e, PairGroup) else 1


def or_pairs(e: Example) -> int:
    """Pairs of ``e`` in the odds-ratio term's mean: a group's pairs with a rejected side (0 for SFT)."""
    return sum(1 for _, rejected in e.pairs if rejected) if isinstance(e, PairGroup) else 0


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if precision == "bf16" and not cpu_supports_bf16():
        warnings.warn("train.precision is bf16 but this CPU has no bf16 units: training runs in fp32", stacklevel=2)
    return cpu_supports_bf16()


def apply_lora(model: Any, cfg: LoraConfig) -> Any:
    """Wrap ``model`` with a PEFT LoRA adapter; only the adapter's weights train."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def make_optimizer(model: Any, cfg: TrainConfig, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; torch's fused kernel where it applies (every weight a plain
    floating tensor on a CPU or CUDA device, and no FSDP/ZeRO, which put their own tensors in its place):
    the same update as the default multi-tensor one up to rounding (tests/test_training.py), 5.35x
    faster on a 2-core Xeon with AMX for the 135M student (88 ms against 470 ms a step;
    ``bench/optimizer_step.py``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = (not sharded and bool(params) and "fused" in inspect.signature(torch.optim.AdamW).parameters
             and all(type(p) is nn.Parameter and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                     for p in params))
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True if fused else None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.scheduler]
    warmup = int(math.ceil(cfg.warmup_ratio * total_steps))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(1, total_steps))


def steps_per_epoch(num_examples: int, cfg: TrainConfig, world_size: int = 1, group_size: int = 1) -> int:
    """An upper bound on the optimizer steps of an epoch of ``num_examples`` pairs (or SFT examples)
    that come in groups of at most ``group_size`` (a question's pairs stay in one micro-batch).

    Sizes the learning-rate schedule, which must not run past its end. :func:`micro_batches` closes a
    batch only when the next group does not fit, so every batch but the last holds at least
    ``batch_size - group_size + 1`` pairs (a group larger than the batch goes alone). A step takes
    ``grad_accum x world_size`` micro-batches.
    """
    groups = math.ceil(num_examples / group_size)
    if group_size > cfg.batch_size or cfg.token_budget is not None:
        micro = groups  # worst case: one group per micro-batch
    else:
        micro = min(groups, math.ceil(groups * group_size / (cfg.batch_size - group_size + 1)))
    return math.ceil(micro / (cfg.grad_accum * world_size))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch: a permutation that depends only on (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass
class EpochResult:
    steps: int = 0
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"  # what the matrix products ran in: bf16 (autocast) or fp32


def example_tokens(e: Example) -> int:
    """Tokens an example puts in a packed row (what ``train.token_budget`` counts)."""
    if isinstance(e, PairGroup):
        return e.packed_length()
    return len(e.prompt_ids) + len(e.target_ids)


def micro_batches(examples: Sequence[Example], order: list[int], batch_size: int,
                  token_budget: int | None = None) -> list[list[Example]]:
    """Consecutive examples in ``order``, each batch filled up to ``batch_size`` pairs and, when set,
    ``token_budget`` packed tokens; a batch holds at least one example.

    A question's pairs stay together (its group), so the packed layout shares its prompt.
    """
    batches: list[list[Example]] = []
    current: list[Example] = []
    size = tokens = 0
    for i in order:
        e = examples[i]
        over_budget = token_budget is not None and tokens + example_tokens(e) > token_budget
        if current and (size + example_size(e) > batch_size or over_budget):
            batches.append(current)
            current, size, tokens = [], 0, 0
        current.append(e)
        size += example_size(e)
        tokens += example_tokens(e)
    if current:
        batches.append(current)
    return batches


def chunks(batch: list[Example], chunk_tokens: int | None) -> list[list[Example]]:
    """A micro-batch cut into consecutive chunks of at most ``chunk_tokens`` packed tokens (``train.chunk_tokens``;
    a longer example is a chunk alone), computed one after the other with their gradients summed. Each chunk's
    loss is weighted by its share of the step (:class:`Share`), so the step is the micro-batch's."""
    if chunk_tokens is None:
        return [batch]
    return micro_batches(batch, list(range(len(batch))), batch_size=sum(example_size(e) for e in batch),
                         token_budget=chunk_tokens)


def nll_tokens(e: Example, nll_on_prompt: bool) -> int:
    """Tokens of ``e`` in the NLL term's token mean: the chosen responses (and the prompt's targets,
    every prompt token but the first, once per pair when ``nll_on_prompt``), or an SFT target."""
    if isinstance(e, SftExample):
        return len(e.target_ids)
    prompt = len(e.prompt_ids) - 1 if nll_on_prompt else 0
    return sum(len(c) + prompt for c, _ in e.pairs)


@dataclass
class MicroBatchOut:
    """The two terms of one micro-batch's loss, before they are weighted by its share of the step."""

    nll: torch.Tensor  # token mean over the micro-batch's NLL tokens
    or_loss: torch.Tensor | None  # mean over its pairs (ORPO); None for SFT
    metrics: dict[str, float]
    tokens: int  # tokens the forward pass processed


@dataclass(frozen=True)
class Share:
    """A micro-batch's share of its optimizer step (over every rank): of the NLL tokens and of the pairs
    with a rejected side (:func:`or_pairs`; 0 when the step has none)."""

    nll: float
    pairs: float


def step_loss(out: MicroBatchOut, share: Share, lambda_or: float) -> torch.Tensor:
    """This micro-batch's part of the step's loss. Summed over the step's micro-batches (every rank) it
    is exactly the loss of the whole step as one batch: the NLL a token mean over all its NLL tokens,
    the odds-ratio term a mean over all its pairs. So neither accumulation nor world size changes it."""
    if out.or_loss is None:
        return out.nll * share.nll
    return orpo_objective(out.nll * share.nll, out.or_loss * share.pairs, lambda_or)


def step_metrics(parts: list[tuple[MicroBatchOut, Share]], method: str, lambda_or: float,
                 protect: bool = False) -> dict[str, float]:
    """The logged metrics of this rank's part of a step, weighted as :func:`step_loss` weighs the loss;
    their sums over the ranks are the step's values. Every rank returns the same keys (a rank with no
    micro-batch in a step returns zeros), as the all-reduce needs. ``protect``: chosen-side protection is
    on (``train.protect_chosen``), so the pairs' ``chosen_drop`` is logged too."""
    keys = [k for k in ORPO_METRICS if k != "loss"] if method == "orpo" else ["nll"]
    keys += [PROTECT_METRIC] if method == "orpo" and protect else []
    row = dict.fromkeys(keys, 0.0)
    for out, share in parts:
        for k in keys:
            row[k] += out.metrics[k] * (share.nll if k == "nll" else share.pairs)
    row["loss"] = orpo_objective(row["nll"], row["or_loss"], lambda_or) if method == "orpo" else row["nll"]
    return row


def _forward(model: Any, batch: list[Example], method: str, cfg: TrainConfig, pad_id: int) -> MicroBatchOut:
    """The loss terms and logged metrics of one micro-batch."""
    device = next(model.parameters()).device
    if method == "orpo":
        if cfg.layout == "packed":
            tensors = batch_to(collate_packed(batch, pad_id=pad_id, nll_on_prompt=cfg.nll_on_prompt,
                                              pad_multiple=cfg.pad_multiple), device)
            sums = pair_logps_packed(model, tensors)
        else:
            pairs = [TokenizedPair(g.prompt_ids, c, r, g.rejected_start.get(tuple(r), 0), g.chosen_ref.get(tuple(c)))
                     for g in batch for c, r in g.pairs]
            tensors = batch_to(collate_plain(pairs, pad_id=pad_id, nll_on_prompt=cfg.nll_on_prompt,
                                             pad_multiple=cfg.pad_multiple), device)
            sums = pair_logps(model, tensors)
        out = orpo_loss_of(sums, cfg.lambda_or, protect=cfg.protect_chosen)
        if cfg.layout == "packed":
            ntok = sum(g.packed_length() for g in batch)
        else:
            ntok = int(tensors["attention_mask"].sum())
        return MicroBatchOut(out.nll, out.or_loss, out.metrics(), ntok)
    tensors = batch_to(collate_sft([(e.prompt_ids, e.target_ids) for e in batch], pad_id=pad_id,
                                   pad_multiple=cfg.pad_multiple), device)
    logp_sum, count = sft_logps(model, tensors)
    loss = sft_loss(logp_sum, count)
    return MicroBatchOut(loss, None, {"nll": float(loss.detach())}, int(tensors["attention_mask"].sum()))


def _refuse(what: str, value: float, epoch: int, step: int, detail: str, advice: str) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"epoch {epoch}, step {step}: the {what} is {value} ({detail}); the step was refused and no weights or "
        f"checkpoints were changed. {advice}"
    )


def train_epoch(
    model: Any,
    examples: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    epoch: int,
    pad_id: int,
    accelerator: Any,
    log: Callable[[dict[str, Any]], None],
    global_step: int = 0,
    progress: bool = True,
    run_seed: int = 0,
) -> EpochResult:
    """One pass over ``examples``.

    Every rank cuts the same micro-batches from the epoch's order; an optimizer step takes
    ``grad_accum x world_size`` consecutive ones and each rank runs its ``grad_accum`` of them
    (:func:`~orpo_distill.distributed.step_plan`). Each micro-batch's loss is weighted by its share of
    the whole step's NLL tokens and pairs, so one process with ``grad_accum = A x W`` and W processes
    with ``grad_accum = A`` take the same steps (up to floating-point summation order).
    """
    device = accelerator.device
    bf16 = use_bf16(cfg.precision, device)
    world, rank = accelerator.num_processes, accelerator.process_index
    order = epoch_order(len(examples), cfg.seed + run_seed, epoch)
    batches = micro_batches(examples, order, cfg.batch_size, cfg.token_budget)
    plan = step_plan(len(batches), cfg.grad_accum, rank, world)
    members = step_members(len(batches), cfg.grad_accum, world)
    deepspeed = getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED
    # DDP averages gradients over ranks; the step's loss is a sum of the ranks' parts. DeepSpeed also
    # divides each backward by the gradient_accumulation_steps of its own config.
    scale = float(world) * (deepspeed_accumulation(accelerator) if deepspeed else 1)
    pad_steps = world > 1 or deepspeed
    if deepspeed and cfg.chunk_tokens is not None:
        raise UserError("train.chunk_tokens is not supported under DeepSpeed (its engine counts every backward as a "
                        "micro-step of its own accumulation); lower train.batch_size or use ZeRO's activation "
                        "checkpointing instead")
    result = EpochResult(precision="bf16" if bf16 else "fp32")
    model.train()
    bar = tqdm(total=len(plan), desc=f"epoch {epoch} ({cfg.method})", unit="step",
               disable=not (progress and accelerator.is_main_process))
    for mine, everyone in zip(plan, members):
        t0 = time.perf_counter()
        step_nll = sum(nll_tokens(e, cfg.nll_on_prompt) for i in everyone for e in batches[i])
        step_pairs = sum(or_pairs(e) for i in everyone for e in batches[i])
        # Every rank runs grad_accum backward passes per step (zero-weight copies where it has fewer
        # micro-batches), so the gradient all-reduce and DeepSpeed's step boundary stay in step.
        work = [(i, 1.0) for i in mine]
        if pad_steps:
            work += [(everyone[0], 0.0)] * (cfg.grad_accum - len(mine))
        parts: list[tuple[MicroBatchOut, Share]] = []
        tokens = 0
        pieces = [(chunk, weight) for i, weight in work for chunk in chunks(batches[i], cfg.chunk_tokens)]
        for n, (batch, weight) in enumerate(pieces):
            share = Share(nll=weight * sum(nll_tokens(e, cfg.nll_on_prompt) for e in batch) / step_nll,
                          pairs=weight * sum(or_pairs(e) for e in batch) / step_pairs if step_pairs else 0.0)
            sync = n + 1 == len(pieces)
            with accelerator.no_sync(model) if (world > 1 and not sync) else contextlib.nullcontext():
                with autocast(device, bf16):
                    out = _forward(model, batch, cfg.method, cfg, pad_id)
                loss = step_loss(out, share, cfg.lambda_or)
                if not torch.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise _refuse("loss", loss.item(), epoch, global_step + 1, str(out.metrics),
                                  f"Lower train.lr, use train.precision=fp32, or check the pairs in pairs/epoch_{epoch}.jsonl.")
                if deepspeed:  # its backward steps the optimizer whenever Accelerate says "sync"
                    accelerator.gradient_state._set_sync_gradients(sync)
                accelerator.backward(loss * scale)
            if weight:
                parts.append((out, share))
                tokens += out.tokens
                result.examples += sum(example_size(e) for e in batch)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            # A finite loss can still have a NaN/inf gradient (an overflow in the backward); clipping
            # would spread it to every gradient and the step would write NaN into every weight.
            optimizer.zero_grad(set_to_none=True)
            raise _refuse("gradient norm", float(grad_norm), epoch, global_step + 1, f"loss {parts[-1][0].metrics if parts else '?'}",
                          "Lower train.lr or train.max_grad_norm, or use train.precision=fp32.")
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (after scheduler.step() it is the next one's)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        result.steps += 1
        row = reduce_sum(accelerator, {**step_metrics(parts, cfg.method, cfg.lambda_or, cfg.protect_chosen > 0),
                                            "tokens": float(tokens)})
        elapsed = time.perf_counter() - t0
        step_tokens = int(row.pop("tokens"))
        row.update(epoch=epoch, step=global_step, lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   tokens_per_s=step_tokens / elapsed if elapsed > 0 else 0.0, rss_mib=rss_mib())
        result.tokens += step_tokens
        result.seconds += elapsed
        result.last = row
        if global_step % cfg.log_every == 0 and accelerator.is_main_process:
            log(row)
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "nll", "or_loss", "reward_accuracy") if k in row})
        bar.update(1)
    bar.close()
    return result


def deepspeed_accumulation(accelerator: Any) -> int:
    """The gradient_accumulation_steps in DeepSpeed's config (1 when unset or "auto", which Accelerate
    fills from its own setting, 1 here: this loop accumulates itself)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    value = (getattr(plugin, "deepspeed_config", None) or {}).get("gradient_accumulation_steps", 1)
    return value if isinstance(value, int) and value > 0 else 1


def reduce_sum(accelerator: Any, row: dict[str, float]) -> dict[str, float]:
    """Sum each metric over the ranks (one all-reduce); with one process, ``row`` itself."""
    if accelerator.num_processes == 1:
        return row
    keys = sorted(row)
    t = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist()))
