"""``metrics.jsonl``: one JSON line per logged step or event, appended and flushed as it happens."""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .memory import interval_peak_rss_mib


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLog:
    """``listeners``: callables given each event's name and fields after it is written (the experiment
    trackers, ``trackers.Forwarder``)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, event: str, **fields: Any) -> None:
        """Append one event; it carries ``peak_rss_mib``, the process's peak resident memory since the event
        before it (``memory.py``), so a stage's peak is the largest over its events."""
        if not self.enabled:
            return
        row = {"event": event, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()},
               "peak_rss_mib": round(interval_peak_rss_mib(), 1)}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
        for listener in list(self.listeners):
            try:
                listener(event, fields)
            except Exception as e:  # a tracker's failure (a dead server) must not stop training on one rank
                self.listeners.remove(listener)
                warnings.warn(f"an experiment tracker failed ({type(e).__name__}: {e}); it gets no more figures, "
                              "and metrics.jsonl carries on", stacklevel=2)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a kill
    return rows


def latest_events(events: Iterable[dict[str, Any]], event: str, key: str) -> dict[Any, dict[str, Any]]:
    """The ``event`` lines of ``events``, the last one per value of ``key``: a resumed run logs again
    what the killed one had logged (a step, an epoch), and the later line is the one that stands."""
    out: dict[Any, dict[str, Any]] = {}
    for e in events:
        if e.get("event") == event:
            out[e[key]] = e
    return out


def stage_name(event: dict[str, Any]) -> str:
    """The stage an event closes, for :func:`stage_costs`."""
    kind = event.get("event")
    if kind == "sampling":
        stage = str(event.get("stage", ""))
        if stage.startswith("student/epoch_") and stage != "student/epoch_1":
            return f"refresh before epoch {stage.rsplit('_', 1)[1]}"
        return {"teacher": "teacher traces", "student/epoch_1": "initial student samples",
                "teacher/dev": "teacher dev traces"}.get(stage, f"sampling {stage}")
    if kind == "eval":
        return f"evaluation {event.get('key')}"
    if kind in ("train", "epoch"):
        return f"training epoch {event.get('epoch')}"
    return "other (pairs, refresh bookkeeping, loading)"


def stage_costs(events: Sequence[dict[str, Any]], since: float) -> list[tuple[str, float, float]]:
    """(stage, seconds, peak RSS MiB) for the events logged at or after ``since`` (a ``time.time()``), in the
    order the stages first appear. Each event closes the interval since the event before it (or since
    ``since``), and its ``peak_rss_mib`` is that interval's peak; a stage sums its intervals' seconds and
    takes their largest peak. Events without a peak (logged before peaks were) count as 0 MiB."""
    out: dict[str, list[float]] = {}
    last = since
    for e in events:
        t = float(e.get("time", 0.0))
        if t < since:
            continue
        cost = out.setdefault(stage_name(e), [0.0, 0.0])
        cost[0] += max(0.0, t - last)
        cost[1] = max(cost[1], float(e.get("peak_rss_mib") or 0.0))
        last = t
    return [(name, s, peak) for name, (s, peak) in out.items()]
