"""Datasets: every source becomes two lists of :class:`~orpo_distill.records.Record`, train and eval.

``load_splits`` is the one entry point the stages use; the loaders behind it are
``synthetic`` (built in, offline), ``gsm8k`` (local files or the shipped sample), ``jsonl`` (a field
map over any JSONL) and ``hf`` (a Hugging Face dataset from the Hub or a local folder).
"""

from __future__ import annotations

from ..config import DatasetConfig
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


__all__ = ["LOADERS", "load_splits"]
