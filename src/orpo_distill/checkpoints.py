"""Epoch checkpoints: written whole or not at all, and found again after a crash.

A checkpoint is a folder ``checkpoints/epoch_E`` holding the model (``save_pretrained``, or the LoRA
adapter), the tokenizer, the optimizer and scheduler states, every RNG state, the negative buffer and
``state.json``. It is written into a hidden temp folder and renamed into place, so a process killed
mid-write leaves either the previous checkpoint or the complete new one, never half of one; leftover
temp folders are removed on the next start (and at once when the write fails, a full disk say, to give the
space back).

Under DeepSpeed (ZeRO-1/2/3) no rank holds the optimizer state (ZeRO-3: nor the weights): every rank writes
its partition with DeepSpeed's own ``save_checkpoint`` into a staging folder beside the temp folder
(:func:`save_deepspeed_state`), which the main process moves into the checkpoint as ``deepspeed/`` before
the rename; a resume under DeepSpeed with the same number of processes loads it back
(:func:`load_deepspeed_state`). The full weights are saved beside it as for any run, so ``student.model``
can start a new run from them on any setup.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError, storage_error
from .layout import STATE, RunLayout, epoch_of


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return RunLayout(run_dir).checkpoint(epoch)


DEEPSPEED_DIR = "deepspeed"  # a checkpoint's DeepSpeed state: every rank's partition, DeepSpeed's own layout
_DEEPSPEED_TAG = "state"


def deepspeed_staging(run_dir: Path, epoch: int) -> Path:
    """Where the ranks write epoch ``epoch``'s DeepSpeed state before it moves into the checkpoint."""
    final = checkpoint_dir(run_dir, epoch)
    return final.with_name(f".{final.name}.deepspeed.tmp")


def save_deepspeed_state(engine: Any, run_dir: Path, epoch: int) -> Path:
    """Every rank writes its partition of the model and optimizer state (DeepSpeed's ``save_checkpoint``,
    a collective every rank enters) into :func:`deepspeed_staging`; returns that folder."""
    staging = deepspeed_staging(run_dir, epoch)
    engine.save_checkpoint(str(staging), tag=_DEEPSPEED_TAG, save_latest=False)
    return staging


def load_deepspeed_state(engine: Any, checkpoint: Path, world_size: int) -> None:
    """Load the partitions :func:`save_deepspeed_state` wrote back into ``engine`` (every rank, its own),
    refusing a checkpoint written by another number of processes (ZeRO partitions by rank)."""
    folder = checkpoint / DEEPSPEED_DIR
    if not folder.is_dir():
        raise UserError(f"{checkpoint} holds no DeepSpeed state (it was written by a run without DeepSpeed), so "
                        "a DeepSpeed run cannot resume its optimizer from it. Resume it as it was trained, or start "
                        f"a new run with student.model={checkpoint} to go on training from these weights.")
    saved = json.loads((checkpoint / STATE).read_text(encoding="utf-8")).get("world_size")
    if saved is not None and saved != world_size:
        raise UserError(f"{checkpoint} was written by {saved} DeepSpeed processes and this run has {world_size}: "
                        "ZeRO splits the optimizer state by rank, so resume it with the same number of processes, or "
                        f"start a new run with student.model={checkpoint} to go on from its weights.")
    path, _ = engine.load_checkpoint(str(folder), tag=_DEEPSPEED_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"DeepSpeed could not load the state in {folder}")


def save_checkpoint(run_dir: Path, epoch: int, model: Any, tokenizer: Any, optimizer: Any, scheduler: Any,
                    buffer: dict[str, Any], state: dict[str, Any], state_dict: dict[str, Any] | None = None,
                    optimizer_state: dict[str, Any] | None = None, deepspeed_state: Path | None = None) -> Path:
    """Write ``checkpoints/epoch_E`` whole. ``state_dict``: the full weights gathered from a sharded
    model (FSDP, ZeRO-3); None saves ``model``'s own. ``optimizer_state``: the optimizer's full state
    gathered from an FSDP2 model (:func:`full_optimizer_state`), saved instead of ``optimizer``'s.
    ``deepspeed_state``: the folder :func:`save_deepspeed_state` wrote, moved in as ``deepspeed/``."""
    final = checkpoint_dir(run_dir, epoch)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if deepspeed_state is not None:
            os.replace(deepspeed_state, tmp / DEEPSPEED_DIR)
        state_dict = without_tied_copies(model, state_dict)
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        if optimizer_state is not None:
            _torch_save(optimizer_state, tmp / "optimizer.pt")
        elif optimizer is not None:  # None: a sharded optimizer (FSDP1, ZeRO), whose state no one rank holds
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        _torch_save(rng_state(), tmp / "rng.pt")
        (tmp / "buffer.json").write_text(json.dumps(buffer), encoding="utf-8")
        (tmp / STATE).write_text(json.dumps({**state, "epoch": epoch}, indent=2), encoding="utf-8")
        for f in tmp.rglob("*"):  # make the contents durable before the rename publishes them
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
    except Exception as e:  # a full disk, say: free what was written; the previous checkpoint stands
        shutil.rmtree(tmp, ignore_errors=True)
        disk = storage_error(e)
        if disk is not None:
            raise OSError(disk.errno, disk.strerror, str(final)) from e
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def without_tied_copies(model: Any, state_dict: dict[str, Any] | None) -> dict[str, Any] | None:
    """A gathered full state dict (FSDP, ZeRO-3) holds a tied weight twice, as separate tensors, which
    ``save_pretrained`` would then write twice: keep only the weight it is tied to, as a plain save does."""
    if state_dict is None:
        return None
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict)}


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so a failed write keeps its OSError (a full disk says so);
    given a path, torch writes in C++ and reports only 'unexpected pos'."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (one with ``state.json``); removes stale temp folders."""
    root = RunLayout(run_dir).checkpoints
    if not root.is_dir():
        return None
    for stale in root.glob(".epoch_*.tmp"):  # .epoch_E.tmp and .epoch_E.deepspeed.tmp
        shutil.rmtree(stale, ignore_errors=True)
    done = [p for p in root.glob("epoch_*") if (p / STATE).is_file() and epoch_of(p) is not None]
    if not done:
        return None
    return max(done, key=epoch_of)


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The whole optimizer state of an FSDP2 model, keyed by parameter name (so any world size can load it),
    on the CPU; a collective every rank enters (rank 0's copy is the one to save)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds torch's optimizer
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_training_state(path: Path, optimizer: Any, scheduler: Any, model: Any = None, deepspeed_engine: Any = None,
                        world_size: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns (state, buffer). ``model``: the
    FSDP2 model whose shards take the saved full optimizer state (every rank reads it and keeps its share).
    ``deepspeed_engine``: the DeepSpeed engine that loads its partitions back (:func:`load_deepspeed_state`)."""
    if deepspeed_engine is not None:
        load_deepspeed_state(deepspeed_engine, path, world_size)
    elif not (path / "optimizer.pt").is_file():
        how = ("a DeepSpeed run, whose optimizer state is split over its ranks: resume it under DeepSpeed with the "
               "same number of processes" if (path / DEEPSPEED_DIR).is_dir() else
               "a sharded FSDP1 run, whose optimizer state is split over the ranks: resuming those is not supported "
               "yet (FSDP2, DDP and DeepSpeed runs resume)")
        raise UserError(f"{path} holds the model but not the optimizer state (it was written by {how}). Start a new "
                        f"run with student.model={path} to go on training from these weights.")
    else:
        _load_optimizer(path, optimizer, model)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    buffer = json.loads((path / "buffer.json").read_text(encoding="utf-8"))
    return state, buffer


def _load_optimizer(path: Path, optimizer: Any, model: Any) -> None:
    saved = torch.load(path / "optimizer.pt", weights_only=False)
    if model is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), optim_state_dict=saved,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)
