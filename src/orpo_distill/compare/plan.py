"""``plan.json``: the base configuration, the variants and the seeds a comparison folder holds, and
which of its runs are finished.

The base configuration must stay the one the folder was started with: a run finished under other
settings would otherwise be counted as if it belonged to this comparison. See docs/architecture.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..config import RunConfig, build_config, resolved_dict
from ..errors import UserError
from ..evaluation import best_dev_epoch
from ..layout import CompareLayout, RunLayout, eval_key
from ..store import atomic_write_json


@dataclass
class Plan:
    """What a comparison folder holds: one base configuration and the variants and seeds run on it."""

    dir: Path
    base: RunConfig
    variants: list[str]
    seeds: list[int]

    @property
    def layout(self) -> CompareLayout:
        return CompareLayout(self.dir)

    def to_dict(self) -> dict[str, Any]:
        return {"base_config": _comparable(self.base), "variants": self.variants, "seeds": self.seeds}


def _comparable(cfg: RunConfig) -> dict[str, Any]:
    data = resolved_dict(cfg)
    data.pop("run_dir")
    return data


def _upgraded(old_base: dict[str, Any]) -> dict[str, Any]:
    """A plan's base config as this version reads it: fields added since it was written take their
    defaults (they did not exist, so they cannot have differed). A field this version no longer knows is
    left in, and then shows as the difference."""
    try:
        return _comparable(build_config({**old_base, "run_dir": "."}, "plan.json"))
    except UserError:
        return old_base


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')} ({a!r} there, {b!r} now)"


def open_plan(compare_dir: Path, base: RunConfig, variants: Sequence[str], seeds: Sequence[int]) -> Plan:
    """Create ``plan.json``, or extend the one there with new variants and seeds; a UserError when the
    folder holds a comparison of another base configuration."""
    compare_dir = Path(compare_dir)
    path = CompareLayout(compare_dir).plan
    variants, seeds = list(variants), list(seeds)
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = _first_difference(_upgraded(old["base_config"]), _comparable(base))
        if diff:
            raise UserError(f"{compare_dir} holds a comparison of another configuration (first difference: {diff}); "
                            "use --out NEW_DIR for this one, or delete the old folder")
        variants = [*old["variants"], *(v for v in variants if v not in old["variants"])]
        seeds = [*old["seeds"], *(s for s in seeds if s not in old["seeds"])]
    plan = Plan(compare_dir, base, variants, seeds)
    atomic_write_json(path, plan.to_dict())
    return plan


def load_plan(compare_dir: Path) -> Plan:
    path = CompareLayout(compare_dir).plan
    if not path.is_file():
        raise UserError(f"{compare_dir} is not a comparison folder (no plan.json); run `orpo-distill compare` first")
    d = json.loads(path.read_text(encoding="utf-8"))
    base = build_config({**d["base_config"], "run_dir": str(compare_dir)}, str(path))
    return Plan(Path(compare_dir), base, list(d["variants"]), [int(s) for s in d["seeds"]])


def final_eval_key(cfg: RunConfig) -> str:
    return eval_key(cfg.eval.split, cfg.train.epochs)


def is_finished(directory: Path, cfg: RunConfig) -> bool:
    """A run is finished when its final evaluation (predictions and summary entry) is on disk and its
    model was exported (``model/``, or the note left where compare removed the weights). (With
    ``eval.every_epoch`` the last evaluation runs before the export; a run killed between the two is not
    finished: its rerun exports the model from the last checkpoint.)"""
    layout = RunLayout(directory)
    summaries = layout.eval_summaries()
    best = best_dev_epoch(summaries, cfg.train.epochs) if cfg.dataset.dev_size else None  # evaluated on test too
    return (layout.eval_rows(cfg.eval.split, cfg.train.epochs).is_file()
            and final_eval_key(cfg) in summaries
            and (best is None or eval_key(cfg.eval.split, best) in summaries)
            and (layout.has_model() or layout.model_removed.is_file()))
