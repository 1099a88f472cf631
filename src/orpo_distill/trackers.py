"""Experiment trackers (``train.report_to``): the training stage's figures sent to TensorBoard, Weights &
Biases, trackio, MLflow and the others Accelerate knows, beside ``metrics.jsonl``.

Accelerate does the trackers' work (``Accelerator(log_with=...)``, ``init_trackers``, ``log``,
``end_training``; main process only). What is ours: a missing package refused before training starts,
with its pip command; the run's training settings as the tracker's configuration; and which events of
``metrics.jsonl`` become which scalars. The same figures, nothing computed twice: a listener on the
run's :class:`~orpo_distill.metrics.MetricsLog` forwards

* ``train`` events (every logged optimizer step) as ``train/<name>`` at that step;
* ``epoch`` events as ``epoch/seconds`` and ``epoch/tokens`` at the epoch's last step;
* ``eval`` events made during training (the per-epoch evaluations) as ``eval/<split>/accuracy`` (and
  ``eval/<split>/chosen_logp`` on the dev split) at the step after which they were made.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable, Sequence

from .errors import UserError

# Accelerate's tracker name -> the module it imports, and what to pip install for it
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
}


def check_installed(names: Sequence[str]) -> None:
    """A UserError naming the pip command for every tracker in ``names`` whose package is missing."""
    missing = [PACKAGES[n][1] for n in names if importlib.util.find_spec(PACKAGES[n][0]) is None]
    if missing:
        raise UserError(f"train.report_to names {', '.join(n for n in names if PACKAGES[n][1] in missing)}, whose "
                        f"package is not installed: pip install {' '.join(missing)}")


def tracker_config(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The training settings flattened to ``section.key`` with values a tracker takes (bool, int, float, str,
    None): anything else (a list, a phi ramp) as its text."""
    out: dict[str, Any] = {}
    for k, v in settings.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(tracker_config(v, key + "."))
        else:
            out[key] = v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
    return out


class Forwarder:
    """A :class:`MetricsLog` listener that sends the tracked events to ``log(values, step)``."""

    def __init__(self, log: Callable[[dict[str, float], int], None], step: int = 0):
        self.log = log
        self.step = step  # the last optimizer step logged (the step of epoch and evaluation figures)

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event == "train":
            self.step = int(fields.get("step", self.step))
            values = {f"train/{k}": float(v) for k, v in fields.items()
                      if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.log(values, self.step)
        elif event == "epoch":
            self.log({"epoch/seconds": float(fields.get("seconds", 0.0)), "epoch/tokens": float(fields.get("tokens", 0))},
                     self.step)
        elif event == "eval" and isinstance(fields.get("accuracy"), (int, float)):
            split = str(fields.get("key", "eval")).rsplit("_epoch_", 1)[0]
            values = {f"eval/{split}/accuracy": float(fields["accuracy"])}
            if isinstance(fields.get("chosen_logp"), (int, float)):
                values[f"eval/{split}/chosen_logp"] = float(fields["chosen_logp"])
            self.log(values, self.step)

