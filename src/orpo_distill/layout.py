"""Every path and name in a run folder and a comparison folder, spelled once.

The stages never build a path by hand: they ask a :class:`RunLayout` (one run) or a
:class:`CompareLayout` (a comparison of runs). Some of these names also enter the trace stores' settings
hashes (the student generator's name ``hf:student@epoch_N``), so a name spelled two ways would silently
invalidate a cache; spelling it here once keeps them stable. See docs/architecture.md for what each file
holds and which stage writes it.

Run folder::

    config.yaml               the resolved configuration
    metrics.jsonl             one JSON event a line (sampling, pairs, train steps, evals, ...)
    prompts/student.jsonl     the exact prompts, student side (prompts/teacher.jsonl: teacher side)
    teacher/traces.jsonl      teacher samples, verified
    student/epoch_E.jsonl     student samples drawn before epoch E (1: the initial student)
    pairs/epoch_E.jsonl       what epoch E trained on
    checkpoints/epoch_E/      the state after epoch E (state.json last: a folder without it is incomplete)
    model/                    the exported student (save_pretrained)
    model/removed.json        in place of the weights, where ``compare`` removed them from a finished run
    eval/SPLIT_epoch_E.jsonl  per-question evaluation after epoch E (0: before training)
    eval/summary.json         every evaluation's summary, keyed by eval key
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
STATE = "state.json"  # in a checkpoint folder, written last
MODEL_SETTINGS = "training_settings.json"  # in model/: the training settings of the exported weights
MODEL_REMOVED = "removed.json"  # in model/: the weights were exported, then removed (compare's default)
# what was made by the trained weights; set aside together when the training settings change
TRAINED_OUTPUTS = ("checkpoints", "model", "pairs", "eval")


def eval_key(split: str, epoch: int) -> str:
    """The key of one evaluation in ``eval/summary.json`` and the stem of its per-question file."""
    return f"{split}_epoch_{epoch}"


def eval_key_epoch(key: str, split: str) -> int | None:
    """The epoch of an eval key of ``split`` (the inverse of :func:`eval_key`); None for any other key."""
    prefix = eval_key(split, 0)[:-1]
    number = key[len(prefix):] if key.startswith(prefix) else ""
    return int(number) if number.isdigit() else None


def student_generator_name(epoch: int) -> str:
    """The name of the student generator with the weights after ``epoch``; it enters the settings hash of
    the samples it draws (the refresh before epoch ``epoch + 1``, and evaluations)."""
    return f"hf:student@epoch_{epoch}"


def epoch_of(path: Path) -> int | None:
    """``epoch_3`` (a checkpoint folder) or ``epoch_3.jsonl`` -> 3; anything else -> None."""
    stem = Path(path).name.split(".")[0]
    prefix, _, number = stem.partition("_")
    return int(number) if prefix == "epoch" and number.isdigit() else None


@dataclass(frozen=True)
class _Folder:
    """A folder of this tool's making, with the report ``orpo-distill report`` writes into it."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    def plot(self, name: str) -> Path:
        return self.root / "plots" / f"{name}.png"


@dataclass(frozen=True)
class RunLayout(_Folder):
    """The files of one run folder."""

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    def prompts(self, side: str) -> Path:
        """``side``: "student" or "teacher"."""
        return self.root / "prompts" / f"{side}.jsonl"

    @property
    def teacher_traces(self) -> Path:
        return self.root / "teacher" / "traces.jsonl"

    @property
    def teacher_dev_traces(self) -> Path:
        """One teacher trace per dev question (``dataset.dev_size``): the held-out positives whose
        log-probability the per-epoch dev evaluation tracks (``chosen_logp.py``)."""
        return self.root / "teacher" / "dev_traces.jsonl"

    @property
    def student_dir(self) -> Path:
        return self.root / "student"

    def student_samples(self, epoch: int) -> Path:
        """The student's samples drawn before ``epoch`` (1: the initial student)."""
        return self.student_dir / f"epoch_{epoch}.jsonl"

    def refresh_samples(self) -> list[Path]:
        """The samples drawn from trained weights (before epoch 2 and later), oldest first."""
        found = [(epoch_of(p), p) for p in self.student_dir.glob("epoch_*.jsonl")]
        return [p for e, p in sorted((e, p) for e, p in found if e is not None and e >= 2)]

    def pairs(self, epoch: int) -> Path:
        return self.root / "pairs" / f"epoch_{epoch}.jsonl"

    @property
    def trackers(self) -> Path:
        """Where file-based experiment trackers write (TensorBoard's event files; ``train.report_to``)."""
        return self.root / "trackers"

    @property
    def chosen_reference(self) -> Path:
        """Each positive's mean log-probability under the weights the odds-ratio term started from
        (``train.protect_chosen``), written once at the term's first epoch."""
        return self.root / "pairs" / "chosen_reference.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch}"

    @property
    def model(self) -> Path:
        return self.root / "model"

    def has_model(self) -> bool:
        """Whether the exported student is complete (its config is written with the weights)."""
        return (self.model / "config.json").is_file()

    @property
    def model_settings(self) -> Path:
        return self.model / MODEL_SETTINGS

    @property
    def model_removed(self) -> Path:
        """The note ``compare`` leaves in ``model/`` when it removes a finished run's weights."""
        return self.model / MODEL_REMOVED

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_rows(self, split: str, epoch: int) -> Path:
        return self.eval_dir / f"{eval_key(split, epoch)}.jsonl"

    @property
    def eval_summary(self) -> Path:
        return self.eval_dir / "summary.json"

    def eval_summaries(self) -> dict[str, Any]:
        """``eval/summary.json``: every evaluation's summary by eval key ({} before the first)."""
        path = self.eval_summary
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def trained_outputs(self) -> list[Path]:
        """What the trained weights made: set aside together when the training settings change."""
        return [self.root / name for name in TRAINED_OUTPUTS] + self.refresh_samples()


@dataclass(frozen=True)
class CompareLayout(_Folder):
    """The files of a comparison folder: one run folder per variant and seed, and what they share."""

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    def shared(self, seed: int) -> RunLayout:
        """The run that samples the teacher, the initial student and evaluates the base model for ``seed``."""
        return RunLayout(self.root / "shared" / f"seed_{seed}")

    def run(self, variant: str, seed: int) -> RunLayout:
        return RunLayout(self.root / variant / f"seed_{seed}")

    @property
    def comparison_json(self) -> Path:
        return self.root / "comparison.json"

    @property
    def comparison_md(self) -> Path:
        return self.root / "comparison.md"
