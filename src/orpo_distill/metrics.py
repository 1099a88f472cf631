"""``metrics.jsonl``: one JSON line per logged step or event, appended and flushed as it happens."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        row = {"event": event, "time": round(time.time(), 3), **{k: _clean(v) for k, v in fields.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()


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
