"""What a run folder's checkpoints, model and evaluations were made with, and the check that sets aside
what a changed config would make otherwise.

The trace stores carry the hash of their sampling settings (``store.py``); this module does the same for
what sits on top of them. :func:`training_settings` is the one definition of what determines the trained
weights: each checkpoint's ``state.json`` (and ``model/training_settings.json``) records it and its hash.
:func:`eval_settings` does the same for an entry of ``eval/summary.json``. A rerun whose training settings
differ from the newest checkpoint's sets the trained outputs aside (``checkpoints.old``, ...; never
deleted), says which fields changed, and trains again; ``--reuse`` keeps them on purpose.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .checkpoints import latest_checkpoint
from .config import RunConfig, TrainConfig
from .layout import STATE, RunLayout
from .sampling import sampling_settings
from .store import free_name, settings_hash


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code that computes a run: the package's version, and where it runs from a git checkout its commit
    (``0.1.0+gb857520``; ``.dirty`` when tracked files differ from it). Recorded with each epoch, as the
    precision and the CPU are, so that a comparison carried between sessions says which code trained each
    arm: kernels that compute the same values up to rounding (issue 16's) still change bf16 runs' bits."""
    return describe_code(Path(__file__).resolve().parent)


def describe_code(here: Path) -> str:
    """:func:`code_version` for the package at ``here``: the commit only when ``here`` is tracked by git."""
    try:
        version = metadata.version("orpo-distill")
    except metadata.PackageNotFoundError:
        version = "unknown"

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # this code is the checkout's, not a copy inside it
        commit = git("rev-parse", "--short=7", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}{'.dirty' if dirty else ''}"


def task_fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """What about the prompt and the answer check a stored trace depends on."""
    t = cfg.task
    return {"kind": t.kind, "custom": t.custom, "system": t.system_prompt, "instruction": t.instruction}


def teacher_store_settings(cfg: RunConfig, samples: int | None = None) -> dict[str, Any]:
    """``samples``: another count than ``teacher.sampling.samples`` (the dev traces take one)."""
    t = cfg.teacher
    sampling = t.sampling if samples is None else t.sampling.model_copy(update={"samples": samples})
    settings = sampling_settings(f"{t.kind}:{t.source}", sampling, task_fingerprint(cfg))
    if t.kind == "scripted":
        settings["error_rate"] = t.error_rate
    return settings


def student_store_settings(cfg: RunConfig, generator_name: str | None = None) -> dict[str, Any]:
    s = cfg.student
    return sampling_settings(generator_name or f"{s.kind}:{s.source}", s.sampling, task_fingerprint(cfg))


def uses_student_negatives(cfg: RunConfig) -> bool:
    """Whether the run trains on the student's own samples as negatives."""
    return cfg.train.method == "orpo" and cfg.pairs.negatives in ("student", "both")


def uses_initial_student(cfg: RunConfig) -> bool:
    """Whether the run trains on the initial student's samples (``student/epoch_1.jsonl``): student
    negatives from epoch 1, not after an SFT stage (``train.sft_epochs``), whose student gives them."""
    return uses_student_negatives(cfg) and cfg.train.sft_epochs == 0


# Settings added after runs were archived, at the value that reproduces the code before them: left out
# of the hashes at that value, so that a finished run's recorded settings still match its config.
LATER_DEFAULTS = {
    "train": {"unrefreshed": "previous", "sft_epochs": 0, "protect_chosen": 0.0},
    "pairs": {"dedup_rouge_l": None, "rejected_span": "whole", "max_similarity": None},
    "dataset": {"dev_size": None},
}


def _without_later_defaults(section: str, values: dict[str, Any]) -> dict[str, Any]:
    later = LATER_DEFAULTS.get(section, {})
    return {k: v for k, v in values.items() if not (k in later and v == later[k])}


def _train_settings(train: TrainConfig) -> dict[str, Any]:
    out = _without_later_defaults("train", train.model_dump(mode="json", by_alias=True))
    out.pop("log_every", None)  # only logs
    out.pop("report_to", None)  # only logs, elsewhere
    out.pop("chunk_tokens", None)  # how a step is computed, not which step: the same weights up to rounding
    out.pop("pad_multiple", None)  # likewise: padding is masked
    return out


def dataset_settings(cfg: RunConfig) -> dict[str, Any]:
    return _without_later_defaults("dataset", cfg.dataset.model_dump(mode="json"))


def training_settings(cfg: RunConfig) -> dict[str, Any]:
    """Everything that determines the trained weights (``train.log_every`` aside, which only logs)."""
    return {
        "train": _train_settings(cfg.train),
        "pairs": _without_later_defaults("pairs", cfg.pairs.model_dump(mode="json")),
        "student": {"model": cfg.student.source},
        "seed": cfg.seed,
        "dataset": dataset_settings(cfg),
        "teacher_traces": settings_hash(teacher_store_settings(cfg)),
        # the student's sampling settings, when the run trains on student samples (the initial student's, or
        # with train.sft_epochs the SFT'd student's: the same settings draw them)
        "student_traces": settings_hash(student_store_settings(cfg)) if uses_student_negatives(cfg) else None,
    }


def _upgraded(settings: dict[str, Any]) -> dict[str, Any]:
    """Recorded training settings as this version writes them: a ``train`` section with settings since
    replaced (``policy``, ``phi_schedule``, ``phi_start``: now ``phi``) read through the current schema.
    Left as recorded when it does not validate (the difference then shows)."""
    if not isinstance(settings.get("train"), dict):
        return settings
    try:
        return {**settings, "train": _train_settings(TrainConfig.model_validate(settings["train"]))}
    except ValidationError:
        return settings


def eval_settings(cfg: RunConfig, epoch: int, weights: str | None = None, split: str | None = None) -> dict[str, Any]:
    """What an evaluation after ``epoch`` depends on: the eval settings, the questions and prompts, and the
    model: the student model before training, else ``weights`` (the training-settings hash recorded with
    the weights evaluated; None: this config's)."""
    e = cfg.eval
    if epoch >= 1:
        model = weights or settings_hash(training_settings(cfg))
    else:
        model = cfg.local_student.model
    return {
        "eval": {"split": split or e.split, "max_tokens": e.max_tokens, "self_consistency": e.self_consistency,
                 "temperature": e.temperature},
        "seed": cfg.seed if e.self_consistency else None,  # greedy decoding does not depend on it
        "task": task_fingerprint(cfg),
        "dataset": dataset_settings(cfg),
        "dtype": cfg.local_student.dtype,
        "model": model,
    }


def diff_settings(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["train.lr: 0.0001 -> 0.005", ...]``: the dotted keys whose values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{key}: (absent) -> {json.dumps(new[k])}")
            elif k not in new:
                out.append(f"{key}: {json.dumps(old[k])} -> (absent)")
            else:
                out += diff_settings(old[k], new[k], key)
        return out
    return [] if old == new else [f"{prefix or '(settings)'}: {json.dumps(old)} -> {json.dumps(new)}"]


def recorded_settings(layout: RunLayout) -> tuple[Path, dict[str, Any]] | None:
    """The training settings the run folder's weights were made with: the newest complete checkpoint's
    ``state.json``, else the exported ``model/``'s. None when there are no weights (a record without a
    hash, written before hashes existed, is returned as such)."""
    ckpt = latest_checkpoint(layout.root)
    if ckpt is not None:
        return ckpt, json.loads((ckpt / STATE).read_text(encoding="utf-8"))
    if layout.model_settings.is_file():
        return layout.model, json.loads(layout.model_settings.read_text(encoding="utf-8"))
    return None


def weights_hash(layout: RunLayout, epoch: int, epochs: int) -> str | None:
    """The training-settings hash recorded with the weights after ``epoch``: its checkpoint's, or, for the
    last epoch, the exported model's. None before training or for weights that record none."""
    if epoch < 1:
        return None
    state = layout.checkpoint(epoch) / STATE
    if state.is_file():
        return json.loads(state.read_text(encoding="utf-8")).get("settings_hash")
    if epoch == epochs and layout.model_settings.is_file():
        return json.loads(layout.model_settings.read_text(encoding="utf-8")).get("settings_hash")
    return None


def changes(record: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The training settings that differ between ``record`` (a state.json) and ``cfg`` ([]: none, or a
    record written before hashes existed)."""
    if "settings_hash" not in record:
        return []
    now = training_settings(cfg)
    if record["settings_hash"] == settings_hash(now):
        return []
    recorded = _upgraded(record.get("settings", {}))
    if settings_hash(recorded) == settings_hash(now):  # the same settings, as an older version wrote them
        return []
    return diff_settings(recorded, now) or [
        f"(settings hash {record['settings_hash']} -> {settings_hash(now)})"]


def conflict(where: Path, record: dict[str, Any], cfg: RunConfig) -> str | None:
    """The refusal text when ``record`` (a state.json) was trained with other settings than ``cfg``'s:
    what a stage that is handed such weights directly says (a run sets them aside first)."""
    changed = changes(record, cfg)
    if not changed:
        return None
    return (f"{where} was trained with other settings than this config: " + "; ".join(changed)
            + ". Rerun with `orpo-distill run` (it sets the old outputs aside and trains again), use a new "
            "run_dir, or pass --reuse to use these weights on purpose.")


def check_trained_outputs(layout: RunLayout, cfg: RunConfig, reuse: bool, writer: bool) -> list[str]:
    """Before a run starts: when the folder's weights were trained with other settings than ``cfg``'s, set
    them and everything they made aside (``NAME.old``) and say so, or with ``reuse`` keep them and warn.
    Returns the changed settings when they were set aside ([] otherwise). Weights recording no settings
    (written by an older version) are kept, with a warning."""
    found = recorded_settings(layout)
    if found is None:
        return []
    where, record = found
    if "settings_hash" not in record:
        if writer:
            print(f"orpo-distill: warning: {where} records no training settings (written by an older version); "
                  "resuming from it as it is", file=sys.stderr)
        return []
    changed = changes(record, cfg)
    if not changed:
        return []
    if reuse:
        if writer:
            print(f"orpo-distill: warning: --reuse: keeping {where}, trained with other settings ("
                  + "; ".join(changed) + ")", file=sys.stderr)
        return []
    if writer:
        moved = set_aside_trained_outputs(layout)
        print(f"orpo-distill: the training settings changed since {where} was written (" + "; ".join(changed)
              + "): set aside " + ", ".join(p.name for p in moved) + "; training again (--reuse keeps them)",
              file=sys.stderr)
    return changed


def set_aside_trained_outputs(layout: RunLayout) -> list[Path]:
    """Rename checkpoints/, model/, pairs/, eval/ to ``NAME.old`` (``.old.1``, ...), and the refresh samples
    ``student/epoch_E.jsonl`` (E >= 2, drawn from the old weights) to ``epoch_E.jsonl.old``."""
    moved = []
    for path in layout.trained_outputs():
        if path.exists():
            dest = free_name(path.with_name(path.name + ".old"))
            os.replace(path, dest)
            moved.append(dest)
    return moved


def stored_hash(path: Path) -> str | None:
    """The settings hash on the first line of a trace store (None: no store, or an empty one)."""
    if not Path(path).is_file():
        return None
    with Path(path).open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return json.loads(raw).get("settings")
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    return None
    return None
