"""Arms that differ only in their refresh share their first epoch: it is trained once per seed.

Why it is exact: the mixed-policy refresh first runs before epoch 2, so orpo-off, orpo-on, orpo-mixed and
``orpo-mixed@PHI`` of one seed train epoch 1 on the same rows (the initial student's negatives), in the
same order, from the same weights, with the same learning-rate schedule (sized by the epochs and the rows,
not by phi): their epoch-1 checkpoints are the same bits. :func:`first_epoch_key` is the hash of every
training setting with phi left out; arms with the same key (and seed) share.

How: when an arm of a key has trained epoch 1, its epoch-1 checkpoint (weights, optimizer, scheduler, RNG
states, negative buffer), its ``pairs/epoch_1.jsonl`` and its epoch-1 events are kept in
``COMPARE_DIR/first-epoch/seed_S/KEY/`` (:func:`keep_first_epoch`). A later arm with that key and no
checkpoint of its own starts from them (:func:`start_from_first_epoch`): the checkpoint is linked in (hard
links: no copy of its 1.6 GB) with ``state.json`` naming the arm's own training settings, the events are
appended to its ``metrics.jsonl`` marked ``shared_from`` (their seconds too: comparison.md's training
minutes read as if each arm had trained whole), and the run resumes at epoch 2. The cache is not
archived (``compare --archive`` copies the plan, the shared runs and finished runs only): on another
machine the first arm of a key trains epoch 1 again. Not shared under ``eval.every_epoch`` (the epoch-1
evaluation would have to come along). ``compare --no-share-first-epoch`` trains every arm whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..layout import STATE, RunLayout
from ..metrics import read_metrics
from ..provenance import training_settings, uses_student_negatives
from ..store import atomic_write_jsonl, copy_atomic, settings_hash

EPOCH_ONE_EVENTS = ("pairs", "train", "epoch")  # what epoch 1 logs in a variant's run


def first_epoch_key(cfg: RunConfig) -> str | None:
    """The hash of what determines a run's epoch-1 weights, for an ORPO run on student negatives with a
    later epoch (None otherwise: nothing to share). Every training setting, phi aside. Not with
    ``train.protect_chosen``: its references (``pairs/chosen_reference.jsonl``) are made at the term's first
    epoch from the weights then, which a shared epoch 1 would not carry."""
    if cfg.train.method != "orpo" or not uses_student_negatives(cfg) or cfg.train.epochs < 2:
        return None
    if cfg.train.protect_chosen > 0:
        return None
    settings = training_settings(cfg)
    return settings_hash({**settings, "train": {**settings["train"], "phi": None}})[:16]


def cache_dir(compare_dir: Path, seed: int, key: str) -> Path:
    return compare_dir / "first-epoch" / f"seed_{seed}" / key


def keep_first_epoch(run: RunLayout, cache: Path) -> bool:
    """Keep ``run``'s epoch-1 checkpoint, pairs and events in ``cache`` (written whole, then renamed);
    False when the cache exists already or the run has no epoch-1 checkpoint."""
    ckpt = run.checkpoint(1)
    if cache.exists() or not (ckpt / STATE).is_file() or not run.pairs(1).is_file():
        return False
    tmp = cache.with_name(f".{cache.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _link_tree(ckpt, tmp / "checkpoint")
    copy_atomic(run.pairs(1), tmp / "pairs_epoch_1.jsonl")
    events = [e for e in read_metrics(run.metrics) if e.get("event") in EPOCH_ONE_EVENTS and e.get("epoch") == 1]
    atomic_write_jsonl(tmp / "events.jsonl", events)
    cache.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, cache)
    return True


def start_from_first_epoch(cache: Path, run: RunLayout, cfg: RunConfig) -> bool:
    """Give ``run`` the shared epoch 1 from ``cache`` when it has no checkpoint of its own; True if it did."""
    own = run.checkpoints.is_dir() and any(not p.name.endswith(".tmp") for p in run.checkpoints.iterdir())
    if own or not (cache / "checkpoint" / STATE).is_file():
        return False
    final = run.checkpoint(1)
    tmp = final.with_name(f".{final.name}.tmp")  # a kill here leaves a temp folder the next start removes
    shutil.rmtree(tmp, ignore_errors=True)
    _link_tree(cache / "checkpoint", tmp)
    state = json.loads((tmp / STATE).read_text(encoding="utf-8"))
    settings = training_settings(cfg)
    (tmp / STATE).unlink()  # a link to the cache's: write the arm's own
    (tmp / STATE).write_text(json.dumps({**state, "settings_hash": settings_hash(settings), "settings": settings},
                                        indent=2), encoding="utf-8")
    copy_atomic(cache / "pairs_epoch_1.jsonl", run.pairs(1))
    shared_from = str(cache)
    if not any(e.get("shared_from") == shared_from for e in read_metrics(run.metrics)):  # a kill may have come after
        with run.metrics.open("a", encoding="utf-8") as f:
            for line in (cache / "events.jsonl").read_text(encoding="utf-8").splitlines():
                f.write(json.dumps({**json.loads(line), "shared_from": shared_from}) + "\n")
    os.replace(tmp, final)  # last: until here the run has no checkpoint, and a rerun starts this over
    return True


def _link_tree(src: Path, dst: Path) -> None:
    """``src``'s files under ``dst`` as hard links (a copy where the file system refuses links)."""

    def link(a: Any, b: Any) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)
