"""The training loop on Accelerate: one epoch of ORPO or SFT steps over prepared examples.

The loop is visible here, not hidden in callbacks: shuffle with the epoch's seed, cut micro-batches,
forward, loss, backward, accumulate, clip, step, log. Tokenizing and collating live in ``batching``,
the loss in ``losses``, checkpoints in ``checkpoints``; the epoch-to-epoch recipe (refresh, pairs,
evaluation) in ``recipe``.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .batching import (
    PairGroup,
    TokenizedPair,
    collate_packed,
    collate_plain,
    collate_sft,
    pair_logps,
    pair_logps_packed,
    sft_logps,
)
from .config import LoraConfig, TrainConfig
from .errors import NonFiniteLossError
from .losses import orpo_loss, sft_loss
from .models import autocast, cpu_supports_bf16


@dataclass
class SftExample:
    prompt_ids: list[int]
    target_ids: list[int]


Example = PairGroup | SftExample  # ORPO trains on one group (a prompt with its K pairs) per question


def example_size(e: Example) -> int:
    """Pairs in a group, or 1 for an SFT example: what ``train.batch_size`` counts."""
    return len(e.pairs) if isinstance(e, PairGroup) else 1


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


def make_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
    ``batch_size - group_size + 1`` pairs (a group larger than the batch goes alone).
    """
    groups = math.ceil(num_examples / group_size)
    per_rank = math.ceil(groups / world_size)  # ranks take a strided share of the groups
    if group_size > cfg.batch_size or cfg.token_budget is not None:
        micro = per_rank  # worst case: one group per micro-batch
    else:
        micro = min(per_rank, math.ceil(per_rank * group_size / (cfg.batch_size - group_size + 1)))
    return math.ceil(micro / cfg.grad_accum)


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


def _forward(model: Any, batch: list[Example], method: str, cfg: TrainConfig, pad_id: int) -> tuple[torch.Tensor, dict[str, float], int]:
    """Loss, its logged metrics, and the number of tokens processed for one micro-batch."""
    device = next(model.parameters()).device
    if method == "orpo":
        if cfg.layout == "packed":
            tensors = collate_packed(batch, pad_id=pad_id, nll_on_prompt=cfg.nll_on_prompt)
            tensors = {k: v.to(device) if torch.is_tensor(v) else v for k, v in tensors.items()}
            sums = pair_logps_packed(model, tensors)
        else:
            pairs = [TokenizedPair(g.prompt_ids, c, r) for g in batch for c, r in g.pairs]
            tensors = collate_plain(pairs, pad_id=pad_id, nll_on_prompt=cfg.nll_on_prompt)
            tensors = {k: v.to(device) if torch.is_tensor(v) else v for k, v in tensors.items()}
            sums = pair_logps(model, tensors)
        out = orpo_loss(sums["chosen_logp_sum"], sums["chosen_tokens"], sums["rejected_logp_sum"],
                        sums["rejected_tokens"], sums["nll_sum"], sums["nll_count"], cfg.lambda_or)
        if cfg.layout == "packed":
            ntok = sum(g.packed_length() for g in batch)
        else:
            ntok = int(tensors["attention_mask"].sum())
        return out.loss, out.metrics(), ntok
    tensors = collate_sft([(e.prompt_ids, e.target_ids) for e in batch], pad_id=pad_id)
    tensors = {k: v.to(device) if torch.is_tensor(v) else v for k, v in tensors.items()}
    logp_sum, count = sft_logps(model, tensors)
    loss = sft_loss(logp_sum, count)
    return loss, {"loss": float(loss.detach()), "nll": float(loss.detach())}, int(tensors["attention_mask"].sum())


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
    """One pass over ``examples``. Each rank takes its strided share of the epoch's order."""
    device = accelerator.device
    bf16 = use_bf16(cfg.precision, device)
    order = epoch_order(len(examples), cfg.seed + run_seed, epoch)[accelerator.process_index :: accelerator.num_processes]
    batches = micro_batches(examples, order, cfg.batch_size, cfg.token_budget)
    result = EpochResult()
    model.train()
    bar = tqdm(total=math.ceil(len(batches) / cfg.grad_accum), desc=f"epoch {epoch} ({cfg.method})", unit="step",
               disable=not (progress and accelerator.is_main_process))
    window: list[dict[str, float]] = []
    tokens = 0
    t0 = time.perf_counter()
    for i, batch in enumerate(batches):
        with autocast(device, bf16):
            loss, metrics, ntok = _forward(model, batch, cfg.method, cfg, pad_id)
        if not torch.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"epoch {epoch}, step {global_step + 1}: the loss is {loss.item()} ({metrics}); the step was "
                "refused and no weights or checkpoints were changed. Lower train.lr, use train.precision=fp32, "
                f"or check the pairs in pairs/epoch_{epoch}.jsonl."
            )
        # the last step of an epoch may hold fewer micro-batches: average over those it has
        in_step = min(cfg.grad_accum, len(batches) - (i // cfg.grad_accum) * cfg.grad_accum)
        accelerator.backward(loss / in_step)
        window.append(metrics)
        tokens += ntok
        result.examples += sum(example_size(e) for e in batch)
        last_micro = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches)
        if not last_micro:
            continue
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        if not math.isfinite(float(grad_norm)):
            # A finite loss can still have a NaN/inf gradient (an overflow in the backward); clipping
            # would spread it to every gradient and the step would write NaN into every weight.
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"epoch {epoch}, step {global_step + 1}: the gradient norm is {float(grad_norm)} (loss "
                f"{window[-1].get('loss')}); the step was refused and no weights or checkpoints were changed. "
                "Lower train.lr or train.max_grad_norm, or use train.precision=fp32."
            )
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (after scheduler.step() it is the next one's)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        result.steps += 1
        elapsed = time.perf_counter() - t0
        row = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
        row.update(epoch=epoch, step=global_step, lr=lr,
                   grad_norm=float(grad_norm), tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0)
        result.tokens += tokens
        result.seconds += elapsed
        result.last = row
        if global_step % cfg.log_every == 0:
            log(row)
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "nll", "or_loss", "reward_accuracy") if k in row})
        bar.update(1)
        window, tokens, t0 = [], 0, time.perf_counter()
    bar.close()
    return result
