"""Datasets: every source becomes lists of :class:`~orpo_distill.records.Record`: train, eval and,
with ``dataset.dev_size``, dev.

``load_all_splits`` is the one entry point the stages use (``load_splits``: train and eval only); the loaders behind it are
``synthetic`` (built in, offline), ``gsm8k`` (local files or the shipped sample), ``jsonl`` (a field
map over any JSONL) and ``hf`` (a Hugging Face dataset from the Hub or a local folder).
"""

from __future__ import annotations

from typing import NamedTuple

from ..config import DatasetConfig
from ..errors import UserError
from ..records import Record
from .loaders import load_gsm8k, load_hf, load_jsonl
from .splits import ensure_disjoint
from .synthetic import load_synthetic

LOADERS = {"synthetic": load_synthetic, "gsm8k": load_gsm8k, "jsonl": load_jsonl, "hf": load_hf}


def load_splits(cfg: DatasetConfig, task_kind: str = "mcq") -> tuple[list[Record], list[Record]]:
    """``(train, eval)`` for the configured dataset: deterministic, disjoint by id, capped by
    ``train_size``/``eval_size``. ``task_kind`` decides how answers are normalised (letters for mcq)."""
    train, eval_ = LOADERS[cfg.kind](cfg, task_kind)
    ensure_disjoint(train, eval_)
    return train, eval_


class Splits(NamedTuple):
    train: list[Record]
    eval: list[Record]  # the held-out questions (the test split when there is a dev split)
    dev: list[Record]  # empty without dataset.dev_size


def load_all_splits(cfg: DatasetConfig, task_kind: str = "mcq") -> Splits:
    """The configured dataset's splits. With ``dev_size`` the held-out set is asked for ``eval_size +
    dev_size`` questions, and its last ``dev_size`` become dev: the test split is then the same
    questions as without a dev split, and the two never share a question."""
    if cfg.dev_size is None:
        return Splits(*load_splits(cfg, task_kind), [])
    wider = cfg.model_copy(update={"eval_size": None if cfg.eval_size is None else cfg.eval_size + cfg.dev_size})
    train, held_out = load_splits(wider, task_kind)
    if len(held_out) <= cfg.dev_size:
        raise UserError(f"dataset.dev_size {cfg.dev_size}: the held-out split has only {len(held_out)} questions, "
                        "so nothing would be left to test on; lower dev_size or give more held-out questions")
    return Splits(train, held_out[: len(held_out) - cfg.dev_size], held_out[len(held_out) - cfg.dev_size:])


__all__ = ["LOADERS", "Splits", "load_all_splits", "load_splits"]
