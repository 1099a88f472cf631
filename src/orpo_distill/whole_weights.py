"""The whole weights of a sharded student, for sampling from it during training.

The refresh and the per-epoch evaluation generate on every rank, each rank its own share of the
prompts (``distributed.split_across_ranks``), so each rank needs the whole model, and a forward that
runs no collective: ranks decode different prompts for different numbers of steps. Under DDP every rank
holds the whole model already. Under FSDP2 (``fully_shard``: every parameter a DTensor shard) each rank
holds a shard, and every forward all-gathers its layers, which would hang as soon as two ranks decode a
different number of steps. :func:`whole_model` gathers the full state dict once (a collective every
rank enters, as the refresh does), builds a plain copy of the model from it on this rank's device,
yields it for sampling and frees it: the gather costs one extra copy of the weights per rank (in the
training dtype) for the length of the refresh; docs/scaling.md says when to prefer the vllm path.

Under DeepSpeed ZeRO-3 (every parameter a placeholder with a ``ds_id``, its data partitioned over the
ranks) the weights are gathered in place instead, as TRL's ``unwrap_model_for_generation`` does:
DeepSpeed's ``GatheredParameters`` all-gathers every parameter once on entry (a collective every rank
enters) and re-partitions on exit; inside it ZeRO-3's forward hooks find each parameter present and
fetch nothing, so ranks may decode different numbers of steps. The cost is the same: the whole weights
on every rank for the length of the refresh.

FSDP1 (flat parameters) is not handled here: the trainer refuses to sample from it
(``Distiller._check_sharding``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


def is_fsdp2(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors)."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def is_zero3(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DeepSpeed ZeRO-3 placeholders (they carry a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextmanager
def whole_model(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` itself when this rank holds all of it; under FSDP2 a plain copy with the gathered weights,
    in eval mode, freed on exit; under ZeRO-3 ``model`` itself with its weights gathered in place until exit
    (every rank must enter either: the gather is a collective)."""
    if is_zero3(model):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield model
        return
    if not is_fsdp2(model):
        yield model
        return
    copy = gathered_copy(model)
    try:
        yield copy
    finally:
        del copy
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextmanager
def weights_to_save(accelerator: Any, model: nn.Module, sharded: bool) -> Iterator[tuple[nn.Module, Any]]:
    """``(module, state_dict)`` for a checkpoint or the export, entered by every rank (the gathers are
    collectives; the main process writes). Unsharded: the module, None (it saves its own weights). FSDP,
    ZeRO-1/2: the module and the full state dict gathered by Accelerate. ZeRO-3, and a LoRA student under
    FSDP2: the whole model (``whole_model``: gathered in place, or a gathered copy) and None, so that it
    saves its adapter, or merges it into whole weights, itself."""
    unwrapped = accelerator.unwrap_model(model)
    if is_zero3(unwrapped) or (is_fsdp2(unwrapped) and getattr(unwrapped, "peft_config", None)):
        with whole_model(unwrapped) as whole:
            yield whole, None
    else:
        yield unwrapped, accelerator.get_state_dict(model) if sharded else None


def gathered_copy(model: nn.Module) -> nn.Module:
    """A plain (unsharded) model of ``model``'s class and config holding its full weights on this rank; for
    a LoRA student (a PEFT model) the same adapter wrapped around a plain base, so the names match."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    device = next(iter(full.values())).device if full else torch.device("cpu")
    peft_config = getattr(model, "peft_config", None)
    with torch.device("meta"):
        if peft_config:
            from peft import get_peft_model

            base = AutoModelForCausalLM.from_config(model.get_base_model().config)
            copy: Any = get_peft_model(base, peft_config[model.active_adapter])
        else:
            copy = AutoModelForCausalLM.from_config(model.config)
    copy.load_state_dict(full, strict=False, assign=True)
    # what the state dict does not hold: tied weights (one tensor under two names) and non-persistent
    # buffers (rotary frequencies), which FSDP does not shard
    copy.tie_weights()
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        copy.get_submodule(owner)._buffers[leaf] = buffer.detach().clone()
    missing = [n for n, p in list(copy.named_parameters()) + list(copy.named_buffers()) if p.is_meta]
    if missing:
        raise RuntimeError(f"the gathered state dict of the sharded student lacks {missing[:5]}")
    copy.generation_config = getattr(model, "generation_config", copy.generation_config)
    return copy.to(device).eval()
